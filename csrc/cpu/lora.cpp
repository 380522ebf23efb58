// LoRA linear CPU kernels (the "cpp" backend of fastft.ops.lora_linear).
//
//   y = x W^T + b + s * u B^T,   u = drop(x) A^T            (drop(x) = x * mask / (1-p), or x)
//   g = dy B;  dx = dy W + s * drop'(g A);  dA = s g^T drop(x);  dB = s dy^T u;  dW = dy^T x;  db = sum dy
//
// The big and thin products are BLAS calls (MKL through at::mm / addmm). The rank-r term s u B^T (and
// s g A in backward) is NOT a BLAS call: MKL's GEMM with K = r = 16 ran ~10x off the memory bound, so
// expand_low_rank adds it to the GEMM's output in place, one read + one write of y (dx), with the [r, C]
// basis in L2. (Writing that term first and letting the big GEMM accumulate onto it with beta = 1 was
// measured too: MKL's beta = 1 path was no faster here.) The eager order (GEMM, a separate LoRA GEMM into
// a new [N, out] tensor, then an add) allocates and streams two more full-size tensors. The thin products
// (u, g, dA, dB) each stream x or dy once; they are memory-bound and small next to the two big GEMMs.
//
// Dropout: the keep-mask is drawn from a CPU generator seeded with `seed` (drawn by the caller from the
// global generator, so torch.manual_seed reproduces it). Backward re-draws the same mask from the same
// seed instead of keeping a full-size copy. MKL's Bernoulli stream skips ahead per chunk, so the mask
// does not depend on the thread count.
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)

#include <ATen/ATen.h>
#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

namespace fastft {
namespace {

using at::vec::Vectorized;

// out[i, :] = init[:] + sum_k coef[i, k] * basis[k, :]  for a SMALL k (the LoRA rank): y's LoRA term
// (coef = s u, basis = B^T) and dx's (coef = s g, basis = A). MKL's GEMM with K = r is far from the
// memory bound here (measured ~10x slower than writing the output once); this is one write of the
// output, the [r, C] basis staying in L2 while the rows stream by.
template <typename scalar_t>
void expand_low_rank(const scalar_t* coef, const scalar_t* basis, const scalar_t* init, int64_t init_row_stride,
                     scalar_t* out, int64_t rows, int64_t rank, int64_t cols) {
  // Blocked so the basis is read from registers, not re-streamed per row: for each vector of columns,
  // up to kGroup basis vectors are loaded once and applied to a block of rows (their outputs stay in L1).
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  constexpr int64_t kGroup = 8;
  constexpr int64_t kRowBlock = 32;
  const int64_t vec_cols = cols - cols % kVec;
  at::parallel_for(0, rows, kRowBlock, [&](int64_t begin, int64_t end) {
    for (int64_t r0 = begin; r0 < end; r0 += kRowBlock) {
      const int64_t r1 = std::min(end, r0 + kRowBlock);
      for (int64_t j = 0; j < vec_cols; j += kVec) {
        for (int64_t k0 = 0; k0 < rank; k0 += kGroup) {
          const int64_t kn = std::min(kGroup, rank - k0);
          Vec bv[kGroup];
          for (int64_t k = 0; k < kGroup; ++k) bv[k] = k < kn ? Vec::loadu(basis + (k0 + k) * cols + j) : Vec(0);
          for (int64_t i = r0; i < r1; ++i) {
            const scalar_t* c = coef + i * rank + k0;
            // first group starts from init (bias row or the GEMM output, possibly out itself), later ones from out
            const scalar_t* src = k0 == 0 ? (init ? init + i * init_row_stride : nullptr) : out + i * cols;
            Vec acc = src ? Vec::loadu(src + j) : Vec(scalar_t(0));
            for (int64_t k = 0; k < kGroup; ++k) {
              if (k < kn) acc = at::vec::fmadd(Vec(c[k]), bv[k], acc);
            }
            acc.store(out + i * cols + j);
          }
        }
      }
      for (int64_t i = r0; i < r1; ++i) {  // columns past the last full vector
        const scalar_t* c = coef + i * rank;
        const scalar_t* in = init ? init + i * init_row_stride : nullptr;
        for (int64_t j = vec_cols; j < cols; ++j) {
          scalar_t acc = in ? in[j] : scalar_t(0);
          for (int64_t k = 0; k < rank; ++k) acc += c[k] * basis[k * cols + j];
          out[i * cols + j] = acc;
        }
      }
    }
  });
}

bool has_vector_kernel(const at::Tensor& t) {
  return t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble;
}

// target += coef @ basis in place ([N, C] contiguous): one read and one write of target.
void add_low_rank_(at::Tensor& target, const at::Tensor& coef, const at::Tensor& basis) {
  if (!has_vector_kernel(target) || !target.is_contiguous()) {
    target.addmm_(coef, basis);
    return;
  }
  at::Tensor c = coef.contiguous(), b = basis.contiguous();
  AT_DISPATCH_FLOATING_TYPES(target.scalar_type(), "lora_add_low_rank", [&] {
    expand_low_rank<scalar_t>(c.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), target.data_ptr<scalar_t>(),
                              target.size(1), target.data_ptr<scalar_t>(), c.size(0), c.size(1), b.size(1));
  });
}

// coef @ basis, [N, C], freshly written (for the dropout path, where the mask applies to this term only).
at::Tensor low_rank_product(const at::Tensor& coef, const at::Tensor& basis) {
  if (!has_vector_kernel(coef)) return at::mm(coef, basis);
  at::Tensor c = coef.contiguous(), b = basis.contiguous();
  at::Tensor out = at::empty({c.size(0), b.size(1)}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "lora_expand_low_rank", [&] {
    expand_low_rank<scalar_t>(c.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(), nullptr, 0, out.data_ptr<scalar_t>(),
                              c.size(0), c.size(1), b.size(1));
  });
  return out;
}

// drop(x) = x * mask / (1 - p), mask ~ Bernoulli(1 - p) from `seed`; one temporary of x's size.
at::Tensor dropped_input(const at::Tensor& x, double p, int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const double keep = 1.0 - p;
  at::Tensor out = at::empty_like(x, at::MemoryFormat::Contiguous).bernoulli_(keep, gen);
  return out.mul_(x).mul_(1.0 / keep);
}

// The same keep-mask, applied in place to `t` (same shape as the x it was drawn for).
void apply_dropout_(at::Tensor& t, double p, int64_t seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed));
  const double keep = 1.0 - p;
  at::Tensor mask = at::empty_like(t).bernoulli_(keep, gen);
  t.mul_(mask).mul_(1.0 / keep);
}

int64_t seed_value(const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(seed.has_value() && seed->numel() == 1, "lora: dropout needs a one-element seed tensor");
  return seed->item<int64_t>();
}


std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cpu(const at::Tensor& x, const at::Tensor& weight,
                                                       const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                       const at::Tensor& lora_B, double scaling, double dropout_p,
                                                       const std::optional<at::Tensor>& seed) {
  TORCH_CHECK(x.dim() == 2, "lora_linear_fwd_kernel: x must be 2-D [N, in]");
  const bool drop = dropout_p > 0.0;
  // Operand layouts measured with MKL at [2048, 4096] x r = 16: a contiguous A^T makes x A^T ~2.5x faster
  // than the transposed view, and likewise u^T / g^T made contiguous for dB / dA below (copies of [N, r]).
  at::Tensor a_t = lora_A.t().contiguous();
  at::Tensor u = drop ? at::mm(dropped_input(x, dropout_p, seed_value(seed)), a_t) : at::mm(x, a_t);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  add_low_rank_(y, u * scaling, lora_B.t());
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cpu(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& u, const std::optional<at::Tensor>& seed, double scaling,
    double dropout_p, bool need_dx, bool need_dweight, bool need_dbias, bool need_dA, bool need_dB) {
  const bool drop = dropout_p > 0.0;
  const int64_t drop_seed = drop ? seed_value(seed) : 0;
  at::Tensor dy = grad_y.contiguous();
  // Gradients not asked for are distinct empty tensors (custom-op outputs must not alias each other).
  at::Tensor dx = x.new_empty({0}), dweight = x.new_empty({0}), dbias = x.new_empty({0}), dA = x.new_empty({0}),
             dB = x.new_empty({0});
  at::Tensor g_scaled;  // s * dy B  [N, r]
  if (need_dx || need_dA) g_scaled = at::mm(dy, lora_B).mul_(scaling);
  if (need_dx) {
    dx = at::mm(dy, weight);
    if (drop) {
      at::Tensor lora_term = low_rank_product(g_scaled, lora_A);
      apply_dropout_(lora_term, dropout_p, drop_seed);
      dx.add_(lora_term);
    } else {
      add_low_rank_(dx, g_scaled, lora_A);
    }
  }
  if (need_dA) {
    at::Tensor g_t = g_scaled.t().contiguous();
    dA = drop ? at::mm(g_t, dropped_input(x, dropout_p, drop_seed)) : at::mm(g_t, x);
  }
  if (need_dB) dB = at::mm((u.t() * scaling).contiguous(), dy).t().contiguous();
  if (need_dweight) dweight = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dweight, dbias, dA, dB};
}

// The keep-mask (as 0/1 in `like`'s dtype) that the kernels above draw for `seed`: for tests.
at::Tensor lora_dropout_mask_cpu(const at::Tensor& like, double dropout_p, const at::Tensor& seed) {
  auto gen = at::make_generator<at::CPUGeneratorImpl>(static_cast<uint64_t>(seed.item<int64_t>()));
  return at::empty_like(like, at::MemoryFormat::Contiguous).bernoulli_(1.0 - dropout_p, gen);
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastft, m) {
  m.def(
      "lora_linear_fwd_kernel(Tensor x, Tensor weight, Tensor? bias, Tensor lora_A, Tensor lora_B, float scaling, "
      "float dropout_p, Tensor? seed) -> (Tensor, Tensor)");
  m.def(
      "lora_linear_bwd_kernel(Tensor grad_y, Tensor x, Tensor weight, Tensor lora_A, Tensor lora_B, Tensor u, "
      "Tensor? seed, float scaling, float dropout_p, bool need_dx, bool need_dweight, bool need_dbias, bool need_dA, "
      "bool need_dB) -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lora_dropout_mask_kernel(Tensor like, float dropout_p, Tensor seed) -> Tensor");
}

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("lora_linear_fwd_kernel", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd_kernel", &lora_linear_bwd_cpu);
  m.impl("lora_dropout_mask_kernel", &lora_dropout_mask_cpu);
}

}  // namespace fastft
