// Bottleneck adapter on the CPU (the "cpp" backend of fastft.ops.adapter), forward and backward fused.
//
// y = x + scale * (h W_up^T + b_up), h = dropout(act(pre)), pre = x W_down^T + b_down; x is [N, H], the
// bottleneck r (64 typically). The rows are processed in blocks of kRows: a block of x (and, backward, of the
// upstream gradient) is read from memory once and stays in L2 while every product that needs it runs on it
// (fp32/fp64: csrc/cpu/_low_rank.h's register-blocked kernels, ~1.4x faster than MKL on these thin shapes;
// fp16/bf16: BLAS on the block), with the element-wise work between them done here on [kRows, r]:
//   forward:  pre = x W_down^T + b_down;  h = act(pre) * keep / (1 - p) with a ones column when there is an up
//             bias;  y = x + scale * [h | 1] [W_up | b_up]^T  (bias, scale and residual in one product).
//   backward: grad_h = g W_up;  grad_pre = scale * grad_h * act'(pre) * keep / (1 - p);  h recomputed;
//             dx = g + grad_pre W_down;  [dW_up | db_up] += scale * g^T [h | 1];  dW_down += grad_pre^T x.
// Only pre [N, r] and the seed are saved between the passes (never the mask, h, or a full-width activation).
// Full-width memory traffic: forward reads x and writes y; backward reads g and x and writes dx.
// Dropout mask: csrc/_dropout.h's counter-based hash of (seed, flat element index), the same function in the
// reference (fastft/reference/dropout.py), Triton (kernels/dropout.py) and CUDA (csrc/cuda/adapter.cu), so
// backward regenerates the mask and every backend drops the same elements. Element i*r + j is dropped when hash >> 8 < drop_threshold,
// i.e. with probability drop_threshold / 2^24; the keep scale is 2^24 / (2^24 - drop_threshold).
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_low_rank.h"
#include "_dropout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastft {
namespace {

using at::vec::Vectorized;

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };
using dropout::kDropBits;  // the hash's top 24 bits are compared with drop_threshold

// keep[j] = keep_scale or 0 for the r elements of row `row` (a plain loop the compiler vectorizes).
template <typename acc>
void dropout_row(acc* keep, uint64_t seed, int64_t row, int64_t r, uint32_t threshold, acc keep_scale) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(r);
  for (int64_t j = 0; j < r; ++j) {
    keep[j] = dropout::keep(seed, base + static_cast<uint64_t>(j), threshold) ? keep_scale : acc(0);
  }
}

template <typename acc>
struct Act {
  using Vec = Vectorized<acc>;
  static constexpr double kInvSqrt2 = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kGeluC = 0.044715;

  static Vec sigmoid(Vec p) { return Vec(acc(1)) / (Vec(acc(1)) + p.neg().exp()); }

  // act(p); with d != nullptr also *d = act'(p).
  static Vec apply(int64_t kind, Vec p, Vec* d) {
    const Vec zero(acc(0)), one(acc(1)), half(acc(0.5));
    switch (kind) {
      case kRelu: {
        // maximum() propagates NaN, as torch.relu does; the derivative is 0 there, as in torch.
        if (d) *d = Vec::blendv(zero, one, p > zero);
        return at::vec::maximum(p, zero);
      }
      case kGelu: {
        const Vec cdf = half * (one + (p * Vec(acc(kInvSqrt2))).erf());
        if (d) *d = cdf + p * Vec(acc(kInvSqrt2Pi)) * (p * p * Vec(acc(-0.5))).exp();
        return p * cdf;
      }
      case kGeluTanh: {
        const Vec p2 = p * p;
        const Vec t = (Vec(acc(kSqrt2OverPi)) * p * (one + Vec(acc(kGeluC)) * p2)).tanh();
        if (d) {
          const Vec inner_d = Vec(acc(kSqrt2OverPi)) * (one + Vec(acc(3 * kGeluC)) * p2);
          *d = half * (one + t) + half * p * (one - t * t) * inner_d;
        }
        return half * p * (one + t);
      }
      default: {  // kSilu
        const Vec s = sigmoid(p);
        if (d) *d = s * (one + p * (one - s));
        return p * s;
      }
    }
  }
};

// The [N, r] bottleneck is walked row by row: a row is loaded into `acc` precision, the activation (and its
// derivative) is computed in Vectorized<acc> chunks, and the result is stored with an optional ones column.
template <typename scalar_t, typename acc>
void load_row(acc* dst, const scalar_t* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc>(src[j]);
}

template <typename scalar_t, typename acc>
void store_row(scalar_t* dst, const acc* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

struct DropoutSpec {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;
};

DropoutSpec dropout_spec(const at::Tensor& seed, int64_t drop_threshold) {
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold < (int64_t(1) << kDropBits),
              "adapter: drop_threshold must be in [0, 2^24), got ", drop_threshold);
  DropoutSpec s{drop_threshold > 0, 0, static_cast<uint32_t>(drop_threshold), 1.0};
  if (s.on) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                "adapter: seed must be a one-element int64 CPU tensor");
    s.seed = static_cast<uint64_t>(seed.item<int64_t>());
    s.keep_scale = dropout::keep_scale(drop_threshold);
  }
  return s;
}

void check_bottleneck(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "adapter: ", name, " must be [N, r], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "adapter: ", name, " must be contiguous");
}

template <typename acc>
struct RowScratch {
  std::vector<acc> buf;
  acc* get(int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  }
};

// h rows [row0, row0 + n) of the bottleneck: act(pre) * keep, with a ones column when append_ones.
// Pointers address the block's first row; row0 is its global index (the dropout hash counts from it).
template <typename scalar_t, typename acc>
void act_dropout_rows_fwd(const scalar_t* pre, scalar_t* h, int64_t row0, int64_t n, int64_t r, bool append_ones,
                          int64_t activation, const DropoutSpec& drop, RowScratch<acc>& scratch) {
  using Vec = Vectorized<acc>;
  const int64_t width = r + (append_ones ? 1 : 0);
  acc* p = scratch.get(3 * r);
  acc* out = p + r;
  acc* keep = p + 2 * r;
  for (int64_t i = 0; i < n; ++i) {
    load_row(p, pre + i * r, r);
    if (drop.on) dropout_row(keep, drop.seed, row0 + i, r, drop.threshold, static_cast<acc>(drop.keep_scale));
    for (int64_t j = 0; j < r; j += Vec::size()) {
      const int64_t m = std::min<int64_t>(Vec::size(), r - j);
      Vec a = Act<acc>::apply(activation, Vec::loadu(p + j, m), nullptr);
      if (drop.on) a = a * Vec::loadu(keep + j, m);
      a.store(out + j, m);
    }
    store_row(h + i * width, out, r);
    if (append_ones) h[i * width + r] = scalar_t(1);
  }
}

// grad_pre = grad_scale * grad_h * act'(pre) * keep for rows [row0, row0 + n), and h again when h != nullptr.
template <typename scalar_t, typename acc>
void act_dropout_rows_bwd(const scalar_t* pre, const scalar_t* grad_h, scalar_t* grad_pre, scalar_t* h, int64_t row0,
                          int64_t n, int64_t r, bool append_ones, int64_t activation, const DropoutSpec& drop,
                          acc grad_scale, RowScratch<acc>& scratch) {
  using Vec = Vectorized<acc>;
  const int64_t width = r + (append_ones ? 1 : 0);
  const Vec gscale(grad_scale);
  acc* p = scratch.get(5 * r);
  acc* g = p + r;
  acc* keep = p + 2 * r;
  acc* out_g = p + 3 * r;
  acc* out_h = p + 4 * r;
  for (int64_t i = 0; i < n; ++i) {
    load_row(p, pre + i * r, r);
    load_row(g, grad_h + i * r, r);
    if (drop.on) dropout_row(keep, drop.seed, row0 + i, r, drop.threshold, static_cast<acc>(drop.keep_scale));
    for (int64_t j = 0; j < r; j += Vec::size()) {
      const int64_t m = std::min<int64_t>(Vec::size(), r - j);
      Vec d;
      Vec a = Act<acc>::apply(activation, Vec::loadu(p + j, m), &d);
      Vec gd = gscale * Vec::loadu(g + j, m) * d;
      if (drop.on) {
        const Vec k = Vec::loadu(keep + j, m);
        gd = gd * k;
        a = a * k;
      }
      gd.store(out_g + j, m);
      a.store(out_h + j, m);
    }
    store_row(grad_pre + i * r, out_g, r);
    if (h != nullptr) {
      store_row(h + i * width, out_h, r);
      if (append_ones) h[i * width + r] = scalar_t(1);
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Whole adapter, fused by row blocks. A block of kRows rows of x (and of the gradient) is read from
// memory once and then stays in L2 while every product that needs it runs on it, so forward reads x once
// and writes y once, and backward reads g and x once and writes dx once; the eager block makes ~15
// full-width passes for the pair, this makes 5.
// ------------------------------------------------------------------------------------------------
constexpr int64_t kRows = 128;  // 128 x 1024 fp32 = 512 KB per full-width block: fits L2 with room

// fp32/fp64 run the products of each block in csrc/cpu/_low_rank.h's register-blocked kernels; fp16/bf16 go
// through BLAS (at::mm_out / addmm_out on the block), which accumulates them in fp32.
template <typename scalar_t>
constexpr bool kOwnKernels = low_rank::kCovers<scalar_t>;

std::tuple<at::Tensor, at::Tensor> adapter_fwd_cpu(const at::Tensor& x, const at::Tensor& down_weight,
                                                   const c10::optional<at::Tensor>& down_bias,
                                                   const at::Tensor& up_weight,
                                                   const c10::optional<at::Tensor>& up_bias, const at::Tensor& seed,
                                                   int64_t activation, int64_t drop_threshold, double scale) {
  TORCH_CHECK(x.dim() == 2, "adapter: x must be [N, H], got ", x.sizes());
  at::NoGradGuard no_grad;  // the BLAS calls below are the kernel's internals, not autograd ops
  TORCH_CHECK(activation >= kRelu && activation <= kSilu, "adapter: unknown activation code ", activation);
  const int64_t N = x.size(0), H = x.size(1), r = down_weight.size(0);
  const bool has_up_bias = up_bias.has_value();
  const int64_t width = r + (has_up_bias ? 1 : 0);
  const at::Tensor xc = x.contiguous();
  at::Tensor y = at::empty({N, H}, x.options());
  at::Tensor pre = at::empty({N, r}, x.options());
  const DropoutSpec drop = dropout_spec(seed, drop_threshold);
  const int64_t blocks = (N + kRows - 1) / kRows;

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_fwd_cpu", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    const at::Tensor down_t =
        kOwnKernels<scalar_t> ? low_rank::projection_operand<scalar_t>(down_weight.t()) : down_weight.t();
    const at::Tensor down_b = down_bias.has_value() ? down_bias->contiguous() : at::Tensor();
    // [W_up | b_up]^T ([width, H]): [h | 1] @ it adds the up bias inside the product.
    at::Tensor up_aug_t;
    if constexpr (kOwnKernels<scalar_t>) {
      up_aug_t = at::empty({width, H}, x.options());
      low_rank::transpose_into<scalar_t>(up_weight, up_aug_t.data_ptr<scalar_t>(), H);
      if (has_up_bias) up_aug_t.select(0, r).copy_(*up_bias);
    } else {
      up_aug_t = (has_up_bias ? at::cat({up_weight, up_bias->unsqueeze(1)}, 1) : up_weight).t().contiguous();
    }
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_in_worker;  // grad mode is thread-local: worker threads need their own guard
      RowScratch<acc> scratch;
      at::Tensor h = at::empty({kRows, width}, x.options());
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kRows, n = std::min(kRows, N - i0);
        if constexpr (kOwnKernels<scalar_t>) {
          const scalar_t* x_b = xc.data_ptr<scalar_t>() + i0 * H;
          scalar_t* pre_b = pre.data_ptr<scalar_t>() + i0 * r;
          low_rank::project_rows<scalar_t>(x_b, H, n, down_t.data_ptr<scalar_t>(), down_t.size(1), H, r, scalar_t(1),
                                           down_b.defined() ? down_b.data_ptr<scalar_t>() : nullptr, pre_b, r);
          act_dropout_rows_fwd<scalar_t, acc>(pre_b, h.data_ptr<scalar_t>(), i0, n, r, has_up_bias, activation, drop,
                                              scratch);
          scalar_t* y_b = y.data_ptr<scalar_t>() + i0 * H;  // residual + scale * (h W^T + b)
          low_rank::expand_rows<scalar_t>(h.data_ptr<scalar_t>(), width, n, up_aug_t.data_ptr<scalar_t>(), H, width, H,
                                          static_cast<scalar_t>(scale), x_b, H, y_b, H);
        } else {
          const at::Tensor x_b = xc.narrow(0, i0, n);
          at::Tensor pre_b = pre.narrow(0, i0, n);
          if (down_b.defined()) at::addmm_out(pre_b, down_b, x_b, down_t); else at::mm_out(pre_b, x_b, down_t);
          act_dropout_rows_fwd<scalar_t, acc>(pre_b.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), i0, n, r,
                                              has_up_bias, activation, drop, scratch);
          at::Tensor y_b = y.narrow(0, i0, n);
          at::addmm_out(y_b, x_b, h.narrow(0, 0, n), up_aug_t, 1, scale);
        }
      }
    });
  });
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cpu(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& up_weight,
    const at::Tensor& pre, const at::Tensor& seed, int64_t activation, int64_t drop_threshold, double scale,
    bool has_down_bias, bool has_up_bias, bool need_input, bool need_down, bool need_up) {
  at::NoGradGuard no_grad;
  TORCH_CHECK(x.dim() == 2 && grad.sizes() == x.sizes(), "adapter: grad ", grad.sizes(), " must match x ", x.sizes());
  check_bottleneck(pre, "pre");
  TORCH_CHECK(activation >= kRelu && activation <= kSilu, "adapter: unknown activation code ", activation);
  const int64_t N = x.size(0), H = x.size(1), r = down_weight.size(0);
  const int64_t width = r + (has_up_bias ? 1 : 0);
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous();
  const at::Tensor up_c = up_weight.contiguous(), down_c = down_weight.contiguous();
  const DropoutSpec drop = dropout_spec(seed, drop_threshold);
  const int64_t blocks = (N + kRows - 1) / kRows;
  auto opts = x.options();
  at::Tensor dx = need_input ? at::empty({N, H}, opts) : at::empty({0}, opts);
  // fp32/fp64: weight gradients accumulate per thread over the blocks, in the blocks' own pass, as
  // [W_up | b_up]^T and W_down ([width, H], [r, H]). fp16/bf16: one GEMM over all rows afterwards (BLAS
  // accumulates in fp32 and rounds once, as eager does), from the full grad_pre and h kept for it.
  const bool low = !low_rank::covers(x);  // fp16/bf16 (the dispatch below admits no other types)
  at::Tensor grad_pre_all = (need_down && low) ? at::empty({N, r}, opts) : at::Tensor();
  at::Tensor h_all = (need_up && low) ? at::empty({N, width}, opts) : at::Tensor();
  const int64_t threads = at::get_num_threads();
  std::vector<at::Tensor> acc_up(threads), acc_down(threads), acc_dbd(threads);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "adapter_bwd_cpu", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    // W_up [H, r] is already project_rows' [K, n] operand (padded when r is not a whole number of vectors)
    const at::Tensor up_proj = kOwnKernels<scalar_t> ? low_rank::projection_operand<scalar_t>(up_c) : up_c;
    at::parallel_for(0, blocks, 1, [&](int64_t b0, int64_t b1) {
      at::NoGradGuard no_grad_in_worker;  // grad mode is thread-local: worker threads need their own guard
      const int64_t t = at::get_thread_num();
      RowScratch<acc> scratch;
      at::Tensor gh = at::empty({kRows, r}, opts);
      at::Tensor gp_local = at::empty({kRows, r}, opts);
      at::Tensor h_local = at::empty({kRows, width}, opts);
      if (!low) {
        if (need_up) acc_up[t] = at::zeros({width, H}, opts);
        if (need_down) acc_down[t] = at::zeros({r, H}, opts);
        if (need_down && has_down_bias) acc_dbd[t] = at::zeros({r}, opts);
      }
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t i0 = b * kRows, n = std::min(kRows, N - i0);
        const at::Tensor g_b = gc.narrow(0, i0, n);
        at::Tensor gh_b = gh.narrow(0, 0, n);
        if constexpr (kOwnKernels<scalar_t>) {
          low_rank::project_rows<scalar_t>(g_b.data_ptr<scalar_t>(), H, n, up_proj.data_ptr<scalar_t>(),
                                           up_proj.size(1), H, r, scalar_t(1), nullptr, gh_b.data_ptr<scalar_t>(), r);
        } else {
          at::mm_out(gh_b, g_b, up_proj);
        }
        at::Tensor gp_b = low && need_down ? grad_pre_all.narrow(0, i0, n) : gp_local.narrow(0, 0, n);
        at::Tensor h_b = low && need_up ? h_all.narrow(0, i0, n) : h_local.narrow(0, 0, n);
        act_dropout_rows_bwd<scalar_t, acc>(pre.data_ptr<scalar_t>() + i0 * r, gh_b.data_ptr<scalar_t>(),
                                            gp_b.data_ptr<scalar_t>(), need_up ? h_b.data_ptr<scalar_t>() : nullptr,
                                            i0, n, r, has_up_bias, activation, drop, static_cast<acc>(scale), scratch);
        if (need_input) {  // residual gradient + grad_pre @ W_down
          at::Tensor dx_b = dx.narrow(0, i0, n);
          if constexpr (kOwnKernels<scalar_t>) {
            // x's block is read next (dW_down): prefetched into L2 while this runs.
            low_rank::expand_rows<scalar_t>(gp_b.data_ptr<scalar_t>(), r, n, down_c.data_ptr<scalar_t>(), H, r, H,
                                            scalar_t(1), g_b.data_ptr<scalar_t>(), H, dx_b.data_ptr<scalar_t>(), H,
                                            need_down ? xc.data_ptr<scalar_t>() + i0 * H : nullptr, H);
          } else {
            at::addmm_out(dx_b, g_b, gp_b, down_c);
          }
        }
        if constexpr (kOwnKernels<scalar_t>) {
          if (need_up) {
            low_rank::accumulate_outer<scalar_t>(h_b.data_ptr<scalar_t>(), width, g_b.data_ptr<scalar_t>(), H, n,
                                                 width, H, acc_up[t].data_ptr<scalar_t>(), H);
          }
          if (need_down) {
            low_rank::accumulate_outer<scalar_t>(gp_b.data_ptr<scalar_t>(), r, xc.data_ptr<scalar_t>() + i0 * H, H, n,
                                                 r, H, acc_down[t].data_ptr<scalar_t>(), H);
          }
          if (need_down && has_down_bias) acc_dbd[t].add_(gp_b.sum(0));
        }
      }
    });
  });

  auto reduce = [&](std::vector<at::Tensor>& parts) {
    at::Tensor total;
    for (auto& part : parts) {
      if (!part.defined()) continue;
      if (total.defined()) total.add_(part); else total = part;
    }
    return total;
  };
  // Outputs of a custom op may not alias each other: one distinct empty tensor per gradient not computed.
  at::Tensor dwd = at::empty({0}, opts), dbd = at::empty({0}, opts), dwu = at::empty({0}, opts),
             dbu = at::empty({0}, opts);
  if (need_down) {
    if (low) {
      dwd = at::mm(grad_pre_all.t(), xc);
      if (has_down_bias) dbd = grad_pre_all.sum(0);
    } else {
      dwd = reduce(acc_down);
      if (has_down_bias) dbd = reduce(acc_dbd);
    }
    if (!dwd.defined()) dwd = at::zeros({r, H}, opts);  // N == 0
    if (has_down_bias && !dbd.defined()) dbd = at::zeros({r}, opts);
  }
  if (need_up) {
    at::Tensor up_aug_t = low ? at::mm(h_all.t(), gc) : reduce(acc_up);  // [width, H] = [W_up | b_up]^T's gradient
    if (!up_aug_t.defined()) up_aug_t = at::zeros({width, H}, opts);
    up_aug_t.mul_(scale);
    // Copies, never views: custom-op outputs may not alias each other (a [1, H] slice's transpose is contiguous).
    dwu = low ? up_aug_t.narrow(0, 0, r).t().clone(at::MemoryFormat::Contiguous)
              : AT_DISPATCH_FLOATING_TYPES(up_aug_t.scalar_type(), "adapter_dwu", [&] {
                  return low_rank::transposed<scalar_t>(up_aug_t.narrow(0, 0, r), r);
                });
    if (has_up_bias) dbu = up_aug_t.select(0, r).clone();
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("adapter_fwd_kernel", &adapter_fwd_cpu);
  m.impl("adapter_bwd_kernel", &adapter_bwd_cpu);
}

}  // namespace fastft
