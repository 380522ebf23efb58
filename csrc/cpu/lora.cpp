// LoRA linear CPU kernels (the "cpp" backend of fastft.ops.lora_linear).
//
//   y = x W^T + b + s * u B^T,   u = drop(x) A^T            (drop(x) = x * mask / (1-p), or x)
//   g = dy B;  dx = dy W + s * drop'(g A);  dA = s g^T drop(x);  dB = s dy^T u;  dW = dy^T x;  db = sum dy
//
// The two big GEMMs (x W^T, dy W) are MKL calls. Everything thin is ours (csrc/cpu/_low_rank.h), because
// MKL ran those shapes ~2x off the memory bound (K = r GEMMs ~10x):
//   forward:  u = drop(x) A^T (project, one pass over x); y += s u B^T in place (expand: one read + one write
//             of y, the [r, out] basis in L1);
//   backward: one pass over dy gives both g_scaled = s dy B (project) and dB^T = s u^T dy (accumulate_outer,
//             per-thread partials); one pass over dx and x gives dx += g_scaled A in place (expand, x's block
//             prefetched meanwhile) and dA = g_scaled^T x (accumulate_outer). With dropout, dx's term is
//             masked on its own and dA reads the re-drawn drop(x).
// So the LoRA branch adds four streaming passes (x, y, dy, dx + x) to the base layer's two GEMMs and never
// allocates an [N, out] temporary (the eager order allocates and streams two more).
//
// Dropout: the keep-mask is csrc/_dropout.h's counter-based hash of (seed, flat index into x [N, in]), the
// mask every backend draws (reference, Triton, CUDA); `seed` is drawn by the caller from the global generator,
// so torch.manual_seed reproduces it. Backward re-draws the same mask from the seed instead of keeping a
// full-size copy; it does not depend on the thread count.
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_low_rank.h"
#include "_dropout.h"

#include <ATen/ATen.h>
#include <ATen/OpMathType.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>
#include <vector>

namespace fastft {
namespace {

// Rows per task: a [16, 4096] fp32 block (256 KB) stays in L2 between the products that share it (8, 32 and
// 64 measured slower).
constexpr int64_t kRowBlock = 16;

// fn(row0, rows) over [0, N) in blocks of kRowBlock, in parallel.
template <typename F>
void for_row_blocks(int64_t N, const F& fn) {
  at::parallel_for(0, (N + kRowBlock - 1) / kRowBlock, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) fn(b * kRowBlock, std::min(kRowBlock, N - b * kRowBlock));
  });
}

// alpha * rows @ basis_t  ([N, K] x [K, n] -> [N, n], n small), one pass over rows.
at::Tensor project(const at::Tensor& rows, const at::Tensor& basis_t, double alpha) {
  const int64_t N = rows.size(0), K = rows.size(1), n = basis_t.size(1);
  if (!low_rank::covers(rows)) return at::mm(rows, basis_t).mul_(alpha);
  at::Tensor x = rows.contiguous();
  at::Tensor out = at::empty({N, n}, rows.options());
  AT_DISPATCH_FLOATING_TYPES(rows.scalar_type(), "lora_project", [&] {
    const at::Tensor bt = low_rank::projection_operand<scalar_t>(basis_t);
    const scalar_t *xp = x.data_ptr<scalar_t>(), *bp = bt.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_row_blocks(N, [&](int64_t i0, int64_t m) {
      low_rank::project_rows<scalar_t>(xp + i0 * K, K, m, bp, bt.size(1), K, n, static_cast<scalar_t>(alpha), nullptr,
                                       op + i0 * n, n);
    });
  });
  return out;
}

// target += coef @ basis in place ([N, C] contiguous, coef [N, r], basis [r, C]): one read and one write of
// target, the basis panel in L1. Without `target` (undefined), a fresh coef @ basis.
at::Tensor expand(at::Tensor target, const at::Tensor& coef, const at::Tensor& basis) {
  const bool fresh = !target.defined();
  if (!low_rank::covers(coef) || (!fresh && !target.is_contiguous())) {
    return fresh ? at::mm(coef, basis) : target.addmm_(coef, basis);
  }
  at::Tensor c = coef.contiguous();
  const int64_t N = c.size(0), n = c.size(1), C = basis.size(1);
  at::Tensor out = fresh ? at::empty({N, C}, coef.options()) : target;
  AT_DISPATCH_FLOATING_TYPES(c.scalar_type(), "lora_expand", [&] {
    // basis is often a transposed weight view (B^T): copied by the blocked transpose, not contiguous()
    const at::Tensor b = basis.is_contiguous() ? basis : low_rank::transposed<scalar_t>(basis.t(), C);
    const scalar_t *cp = c.data_ptr<scalar_t>(), *bp = b.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    for_row_blocks(N, [&](int64_t i0, int64_t m) {
      scalar_t* o = op + i0 * C;
      low_rank::expand_rows<scalar_t>(cp + i0 * n, n, m, bp, C, n, C, scalar_t(1), fresh ? nullptr : o, C, o, C);
    });
  });
  return out;
}

// One pass over the row blocks of `rows` ([N, C]) that returns coef^T @ rows ([N, n]^T x [N, C] -> [n, C];
// per-thread partial sums, added at the end) and, on each block before that, optionally:
//   project_basis_t given: project_alpha * rows @ project_basis_t ([N, np], the second result). Backward's
//                          g = s dy B beside dB^T = u^T dy: dy is read from memory once.
//   expand_target given:   expand_target += coef @ expand_basis in place ([N, C']), with the rows block
//                          prefetched into L2 meanwhile. Backward's dx += g A beside dA = g^T x.
std::tuple<at::Tensor, at::Tensor> outer_pass(const at::Tensor& coef, const at::Tensor& rows,
                                              const at::Tensor& project_basis_t, double project_alpha,
                                              at::Tensor expand_target, const at::Tensor& expand_basis) {
  const bool with_project = project_basis_t.defined(), with_expand = expand_target.defined();
  if (!low_rank::covers(rows) || (with_expand && !expand_target.is_contiguous())) {
    if (with_expand) expand(expand_target, coef, expand_basis);
    return {at::mm(coef.t(), rows), with_project ? at::mm(rows, project_basis_t).mul_(project_alpha) : at::Tensor()};
  }
  at::Tensor c = coef.contiguous(), x = rows.contiguous();
  at::Tensor eb = with_expand ? expand_basis.contiguous() : at::Tensor();
  const int64_t N = x.size(0), C = x.size(1), n = c.size(1);
  const int64_t np = with_project ? project_basis_t.size(1) : 0, ce = with_expand ? eb.size(1) : 0;
  at::Tensor projected = with_project ? at::empty({N, np}, rows.options()) : at::Tensor();
  std::vector<at::Tensor> partial(at::get_num_threads());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "lora_outer_pass", [&] {
    const at::Tensor bt = with_project ? low_rank::projection_operand<scalar_t>(project_basis_t) : at::Tensor();
    const scalar_t *cp = c.data_ptr<scalar_t>(), *xp = x.data_ptr<scalar_t>();
    for_row_blocks(N, [&](int64_t i0, int64_t m) {
      at::Tensor& d = partial[at::get_thread_num()];
      if (!d.defined()) d = at::zeros({n, C}, rows.options());
      const scalar_t* block = xp + i0 * C;
      if (with_project) {
        low_rank::project_rows<scalar_t>(block, C, m, bt.data_ptr<scalar_t>(), bt.size(1), C, np,
                                         static_cast<scalar_t>(project_alpha), nullptr,
                                         projected.data_ptr<scalar_t>() + i0 * np, np);
      }
      if (with_expand) {
        scalar_t* t = expand_target.data_ptr<scalar_t>() + i0 * ce;
        low_rank::expand_rows<scalar_t>(cp + i0 * n, n, m, eb.data_ptr<scalar_t>(), ce, n, ce, scalar_t(1), t, ce, t,
                                        ce, block, C);
      }
      low_rank::accumulate_outer<scalar_t>(cp + i0 * n, n, block, C, m, n, C, d.data_ptr<scalar_t>(), C);
    });
  });
  at::Tensor total;
  for (auto& d : partial) {
    if (!d.defined()) continue;
    if (total.defined()) total.add_(d); else total = d;
  }
  if (!total.defined()) total = at::zeros({n, C}, rows.options());  // N == 0
  return {total, projected};
}

// t *= keep * keep_scale in place (csrc/_dropout.h's mask; element e of the contiguous t has flat index e):
// the mask LoRA draws over x [N, in], applied to x (forward, dA) or to dx's LoRA term (same shape).
void apply_dropout_(at::Tensor& t, double p, int64_t seed) {
  TORCH_CHECK(t.is_contiguous(), "lora: dropout target must be contiguous");
  const int64_t threshold = dropout::threshold_of(p);
  const uint64_t s = static_cast<uint64_t>(seed);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, t.scalar_type(), "lora_dropout", [&] {
    using acc = at::opmath_type<scalar_t>;
    const acc scale = static_cast<acc>(dropout::keep_scale(threshold));
    scalar_t* d = t.data_ptr<scalar_t>();
    at::parallel_for(0, t.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
      for (int64_t i = begin; i < end; ++i) {
        const bool kept = dropout::keep(s, static_cast<uint64_t>(i), static_cast<uint32_t>(threshold));
        d[i] = kept ? static_cast<scalar_t>(static_cast<acc>(d[i]) * scale) : scalar_t(0);
      }
    });
  });
}

// drop(x) = x * keep * keep_scale as a new contiguous tensor.
at::Tensor dropped_input(const at::Tensor& x, double p, int64_t seed) {
  at::Tensor out = x.clone(at::MemoryFormat::Contiguous);
  apply_dropout_(out, p, seed);
  return out;
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
  at::Tensor u = project(drop ? dropped_input(x, dropout_p, seed_value(seed)) : x, lora_A.t(), 1.0);
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, x, weight.t()) : at::mm(x, weight.t());
  expand(y, u * scaling, lora_B.t());
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
  // One pass over dy: g_scaled = s * dy B ([N, r]) and, when asked, dB^T = s * u^T dy.
  const bool need_g = need_dx || need_dA;
  at::Tensor g_scaled;
  if (need_dB) {
    auto [dBt, g] = outer_pass(u, dy, need_g ? lora_B : at::Tensor(), scaling, at::Tensor(), at::Tensor());
    dB = low_rank::covers(dBt) ? AT_DISPATCH_FLOATING_TYPES(dBt.scalar_type(), "lora_dB", [&] {
      return low_rank::transposed<scalar_t>(dBt.mul_(scaling), dBt.size(0));
    }) : dBt.mul_(scaling).t().contiguous();
    g_scaled = g;
  } else if (need_g) {
    g_scaled = project(dy, lora_B, scaling);
  }
  if (need_dx) dx = at::mm(dy, weight);
  if (need_dx && drop) {
    at::Tensor lora_term = expand(at::Tensor(), g_scaled, lora_A);
    apply_dropout_(lora_term, dropout_p, drop_seed);
    dx.add_(lora_term);
  }
  if (need_dA) {
    // Without dropout dx's LoRA term rides along in dA's pass over x (x prefetched while dx is updated).
    const bool fuse_dx = need_dx && !drop;
    dA = std::get<0>(outer_pass(g_scaled, drop ? dropped_input(x, dropout_p, drop_seed) : x, at::Tensor(), 0.0,
                                fuse_dx ? dx : at::Tensor(), lora_A));
  } else if (need_dx && !drop) {
    expand(dx, g_scaled, lora_A);
  }
  if (need_dweight) dweight = at::mm(dy.t(), x);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dweight, dbias, dA, dB};
}

// The keep-mask (as 0/1 in `like`'s dtype) that the kernels above draw for `seed`: for tests.
at::Tensor lora_dropout_mask_cpu(const at::Tensor& like, double dropout_p, const at::Tensor& seed) {
  const int64_t threshold = dropout::threshold_of(dropout_p);
  const uint64_t s = static_cast<uint64_t>(seed.item<int64_t>());
  at::Tensor keep = at::empty(like.sizes(), like.options().dtype(at::kBool));
  bool* k = keep.data_ptr<bool>();
  at::parallel_for(0, keep.numel(), 1 << 14, [&](int64_t begin, int64_t end) {
    for (int64_t i = begin; i < end; ++i) k[i] = dropout::keep(s, static_cast<uint64_t>(i), static_cast<uint32_t>(threshold));
  });
  return keep.to(like.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("lora_linear_fwd_kernel", &lora_linear_fwd_cpu);
  m.impl("lora_linear_bwd_kernel", &lora_linear_bwd_cpu);
  m.impl("lora_dropout_mask_kernel", &lora_dropout_mask_cpu);
}

}  // namespace fastft
