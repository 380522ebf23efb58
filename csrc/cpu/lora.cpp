// LoRA linear CPU kernels (the "cpp" backend of fastft.ops.lora_linear).
//
//   y = x W^T + b + s * u B^T,   u = drop(x) A^T            (drop(x) = x * mask / (1-p), or x)
//   g = dy B;  dx = dy W + s * drop'(g A);  dA = s g^T drop(x);  dB = s dy^T u;  dW = dy^T x;  db = sum dy
//
// The big and thin products are BLAS calls (MKL through at::mm / addmm). Arrangement (why it is fast):
// the small LoRA term is written FIRST into the output (y = b + s u B^T with K = r: a write-only pass,
// by expand_low_rank below, not BLAS), and the big GEMM then accumulates onto it (beta = 1, free inside
// a compute-bound GEMM). The eager order (GEMM,
// then a separate LoRA GEMM, then an add) reads and writes the full output two more times; the same
// holds for dx in backward. The thin products (u, g, dA, dB) each stream x or dy once; they are
// memory-bound and small next to the two big GEMMs.
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

#include <tuple>

namespace fastft {
namespace {

using at::vec::Vectorized;

// out[i, :] = init[:] + sum_k coef[i, k] * basis[k, :]  for a SMALL k (the LoRA rank): y's LoRA term
// (coef = s u, basis = B^T) and dx's (coef = s g, basis = A). MKL's GEMM with K = r is far from the
// memory bound here (measured ~10x slower than writing the output once); this is one write of the
// output, the [r, C] basis staying in L2 while the rows stream by.
template <typename scalar_t>
void expand_low_rank(const scalar_t* coef, const scalar_t* basis, const scalar_t* init, scalar_t* out, int64_t rows,
                     int64_t rank, int64_t cols) {
  using Vec = Vectorized<scalar_t>;
  constexpr int64_t kVec = Vec::size();
  at::parallel_for(0, rows, 16, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) {
      const scalar_t* c = coef + i * rank;
      scalar_t* o = out + i * cols;
      int64_t j = 0;
      for (; j + kVec <= cols; j += kVec) {
        Vec acc = init ? Vec::loadu(init + j) : Vec(scalar_t(0));
        for (int64_t k = 0; k < rank; ++k) acc = at::vec::fmadd(Vec(c[k]), Vec::loadu(basis + k * cols + j), acc);
        acc.store(o + j);
      }
      for (; j < cols; ++j) {
        scalar_t acc = init ? init[j] : scalar_t(0);
        for (int64_t k = 0; k < rank; ++k) acc += c[k] * basis[k * cols + j];
        o[j] = acc;
      }
    }
  });
}

// init + coef @ basis, [N, C]: the vector kernel for fp32/fp64, one BLAS call otherwise.
at::Tensor low_rank_product(const at::Tensor& coef, const at::Tensor& basis, const std::optional<at::Tensor>& init) {
  const bool has_init = init.has_value() && init->defined();
  if (coef.scalar_type() != at::kFloat && coef.scalar_type() != at::kDouble) {
    return has_init ? at::addmm(*init, coef, basis) : at::mm(coef, basis);
  }
  at::Tensor c = coef.contiguous(), b = basis.contiguous();
  at::Tensor bias = has_init ? init->contiguous() : at::Tensor();
  at::Tensor out = at::empty({c.size(0), b.size(1)}, c.options());
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "lora_expand_low_rank", [&] {
    expand_low_rank<scalar_t>(c.data_ptr<scalar_t>(), b.data_ptr<scalar_t>(),
                              has_init ? bias.data_ptr<scalar_t>() : nullptr, out.data_ptr<scalar_t>(), c.size(0),
                              c.size(1), b.size(1));
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
  at::Tensor y = low_rank_product(u * scaling, lora_B.t(), bias);
  y.addmm_(x, weight.t());  // the base GEMM accumulates onto the LoRA term (beta = 1)
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
    dx = low_rank_product(g_scaled, lora_A, std::nullopt);  // the LoRA term first (K = r) ...
    if (drop) apply_dropout_(dx, dropout_p, drop_seed);
    dx.addmm_(dy, weight);  // ... then the big GEMM accumulates onto it
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
