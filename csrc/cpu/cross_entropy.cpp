// Cross-entropy CPU kernels (the "cpp" backend of fastft.ops.cross_entropy).
// grad_out (forward and backward): the gradient goes there instead of a new buffer; it may be the logits
// themselves (the in-place gradient of fastft.ops.cross_entropy and the fused linear cross-entropy's chunk).
//
// Per counted row (x softcapped when softcap > 0, w = class weights or ones, W = sum w, eps = smoothing):
//   loss = (1-eps) w_y (lse - x_y) + (eps/V) (W lse - sum_c w_c x_c) + z lse^2
//   dloss/dx_j = p_j ((1-eps) w_y + (eps/V) W + 2 z lse) - (eps/V) w_j - [j==y] (1-eps) w_y
//   (times 1 - tanh(x_j/softcap)^2 through the cap).
// A row of a 32k vocabulary is 128 KB of fp32: it stays in L2 while we sweep it. Forward with the fused
// gradient reads each logit from memory once (max pass), then from cache: exp(x - max) is computed once
// per logit and parked in the gradient row, which the last sweep rescales in place. So memory traffic is
// one read of the logits and one write of the gradient, and one exp per logit.
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_buffer_cache.h"
#include "cpu/_row_softmax.h"
#include "_cross_entropy_grad_out.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastft {
namespace {

using at::vec::Vectorized;
using namespace row_softmax;  // acc_t, row_values, row_max, row_sum_exp, store_row, fill_row, Scratch,
                              // store_streaming, for_each_chunk_aligned, zero_row

struct CEOptions {
  int64_t ignore_index;
  double smoothing;
  double z_loss;
  double softcap;  // 0: off
};

// Gradient sweep: g_j = (e_j * a - c * w_j) * softcap'(x_j), with e_j = e[j] when given, else
// exp(xs_j - shift); the target column also has -b. Reduced precision is staged in tmp (which may
// alias e: each chunk reads its exps before writing) and converted at the end.
template <typename scalar_t, typename acc>
void write_grad_row(scalar_t* out, const acc* xs, const acc* e, acc shift, acc a, acc c, acc b, const acc* w,
                    int64_t V, int64_t y, acc softcap, acc* tmp) {
  using Vec = Vectorized<acc>;
  const Vec av(a), cv(c), sh(shift);
  const Vec inv_cap2(softcap != acc(0) ? acc(1) / (softcap * softcap) : acc(0)), one(acc(1));
  acc* dst;
  if constexpr (std::is_same_v<scalar_t, acc>) dst = out; else dst = tmp;
  // The target column, in full precision, before the sweep can overwrite the exps it needs.
  acc gy = 0;
  if (y >= 0) {
    const acc ey = e ? e[y] : std::exp(xs[y] - shift);
    gy = ey * a - c * (w ? w[y] : acc(1)) - b;
    if (softcap != acc(0)) gy *= acc(1) - xs[y] * xs[y] / (softcap * softcap);
  }
  for_each_chunk_aligned<acc>(dst, V, [&](int64_t j, int64_t n) {
    Vec ev = e ? Vec::loadu(e + j, n) : (Vec::loadu(xs + j, n) - sh).exp_u20();
    Vec g = w ? ev * av - cv * Vec::loadu(w + j, n) : ev * av - cv;
    if (softcap != acc(0)) {
      Vec xv = Vec::loadu(xs + j, n);
      g = g * (one - xv * xv * inv_cap2);  // tanh(x/s) = x_capped / s
    }
    if (y >= j && y < j + n) {  // patch the target lane before the (streaming) store
      acc lanes[Vec::size()];
      g.store(lanes);
      lanes[y - j] = gy;
      g = Vec::loadu(lanes);
    }
    store_streaming(dst + j, g, n);
  });
  if constexpr (!std::is_same_v<scalar_t, acc>) store_row<scalar_t, acc>(out, tmp, V);
}

// The gradient's buffer: grad_out when given (it may be logits itself: every sweep reads a chunk of the row
// before it stores that chunk's gradient, and the target's logit before the first store), else a new one.
// grad_out's storage is then the gradient; the third output is an empty tensor (outputs must not alias inputs).
at::Tensor gradient_buffer(const at::Tensor& logits, const c10::optional<at::Tensor>& grad_out, const char* op) {
  if (!grad_out.has_value()) return cached_empty("cross_entropy.grad", {logits.size(0), logits.size(1)}, logits.options());
  check_grad_out(logits, *grad_out, op);
  return *grad_out;
}

void check_common(const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy: logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.stride(1) == 1, "cross_entropy: logits' last dimension must be contiguous");
  TORCH_CHECK(target.dim() == 1 && target.size(0) == logits.size(0), "cross_entropy: target must be [N]");
  TORCH_CHECK(target.scalar_type() == at::kLong, "cross_entropy: target must be int64");
  if (weight.has_value()) {
    TORCH_CHECK(weight->dim() == 1 && weight->size(0) == logits.size(1) && weight->is_contiguous() &&
                    (weight->scalar_type() == at::kFloat || weight->scalar_type() == at::kDouble),
                "cross_entropy: weight must be a contiguous fp32 (or fp64) [V] tensor");
  }
}

// Per-thread scratch (row_softmax::Scratch): [0, V) row values, [V, 2V) parked exps / converted gradient.
std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cpu(
    const at::Tensor& logits, const at::Tensor& target, const c10::optional<at::Tensor>& weight,
    const c10::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, const c10::optional<at::Tensor>& grad_out) {
  check_common(logits, target, weight);
  TORCH_CHECK(!grad_out.has_value() || grad_scale.has_value(),
              "cross_entropy_fwd: grad_out is the gradient's buffer; it needs grad_scale");
  const int64_t N = logits.size(0), V = logits.size(1);
  const bool has_grad = grad_scale.has_value();
  // Row losses and logsumexps in the accumulation type (fp32; fp64 for fp64 logits).
  auto acc_opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor loss = at::empty({N}, acc_opts), lse = at::empty({N}, acc_opts);
  at::Tensor grad = has_grad ? gradient_buffer(logits, grad_out, "cross_entropy_fwd") : at::empty({0}, logits.options());
  const CEOptions o{ignore_index, label_smoothing, z_loss, softcap};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor w_acc = weight.has_value() ? weight->to(c10::CppTypeToScalarType<acc>::value) : at::Tensor();
    const acc* w = weight.has_value() ? w_acc.data_ptr<acc>() : nullptr;
    const acc W = w ? static_cast<acc>(w_acc.sum().item<double>()) : static_cast<acc>(V);
    const acc scale = has_grad ? static_cast<acc>(grad_scale->item<double>()) : acc(0);
    const acc eps = static_cast<acc>(o.smoothing), cap = static_cast<acc>(o.softcap), z = static_cast<acc>(o.z_loss);
    const scalar_t* x0 = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const at::Tensor target_c = target.contiguous();  // rows are read by index: a strided view would misread
    const int64_t* tgt = target_c.data_ptr<int64_t>();
    acc* loss_p = loss.data_ptr<acc>();
    acc* lse_p = lse.data_ptr<acc>();
    scalar_t* g0 = has_grad ? grad.data_ptr<scalar_t>() : nullptr;

    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        const scalar_t* x = x0 + i * row_stride;
        scalar_t* g = has_grad ? g0 + i * V : nullptr;
        const int64_t y = tgt[i];
        if (y == o.ignore_index) {  // padding: never read the row; its lse is unused (reported as 0)
          loss_p[i] = acc(0);
          lse_p[i] = acc(0);
          if (has_grad) zero_row(g, V);
          continue;
        }
        const bool valid = y >= 0 && y < V;
        // [0, V): converted / softcapped row (unused for plain fp32); [V, 2V): parked exps, which
        // stay in cache for the gradient sweep.
        acc* buf = scratch.get(2 * V);
        const acc* xs = row_values<scalar_t, acc>(x, V, cap, buf);
        const acc m = row_max(xs, V);
        const acc sum_wx = eps != acc(0) ? row_weighted_sum(xs, w, V) : acc(0);
        acc* e = has_grad && valid ? buf + V : nullptr;
        const acc s = row_sum_exp(xs, V, m, e);
        const acc lse_i = m + std::log(s);
        lse_p[i] = lse_i;
        if (!valid) {
          loss_p[i] = std::numeric_limits<acc>::quiet_NaN();
          if (has_grad) fill_row(g, V, std::numeric_limits<double>::quiet_NaN());
          continue;
        }
        const acc w_y = w ? w[y] : acc(1);
        acc l = (acc(1) - eps) * w_y * (lse_i - xs[y]) + z * lse_i * lse_i;
        if (eps != acc(0)) l += eps / V * (W * lse_i - sum_wx);
        loss_p[i] = l;
        if (has_grad) {
          const acc a = scale * ((acc(1) - eps) * w_y + eps / V * W + acc(2) * z * lse_i) / s;
          const acc c = scale * eps / V;
          const acc b = scale * (acc(1) - eps) * w_y;
          write_grad_row<scalar_t, acc>(g, xs, e, m, a, c, b, w, V, y, cap, buf + V);
        }
      }
      FASTFT_STREAM_FENCE();  // order this thread's streaming stores before the gradient is handed out
    });
  });
  if (grad_out.has_value()) return {loss, lse, at::empty({0}, logits.options())};
  return {loss, lse, grad};
}

at::Tensor cross_entropy_bwd_cpu(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                 const c10::optional<at::Tensor>& weight, const at::Tensor& lse,
                                 int64_t ignore_index, double label_smoothing, double z_loss, double softcap,
                                 const c10::optional<at::Tensor>& grad_out) {
  check_common(logits, target, weight);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(grad_loss.numel() == N && grad_loss.scalar_type() == acc_type && grad_loss.is_contiguous(),
              "cross_entropy_bwd: grad_loss must be a contiguous [N] tensor of the accumulation type");
  TORCH_CHECK(lse.numel() == N && lse.scalar_type() == acc_type && lse.is_contiguous(),
              "cross_entropy_bwd: lse must be a contiguous [N] tensor of the accumulation type");
  at::Tensor grad = gradient_buffer(logits, grad_out, "cross_entropy_bwd");
  const CEOptions o{ignore_index, label_smoothing, z_loss, softcap};

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    const at::Tensor w_acc = weight.has_value() ? weight->to(c10::CppTypeToScalarType<acc>::value) : at::Tensor();
    const acc* w = weight.has_value() ? w_acc.data_ptr<acc>() : nullptr;
    const acc W = w ? static_cast<acc>(w_acc.sum().item<double>()) : static_cast<acc>(V);
    const acc eps = static_cast<acc>(o.smoothing), cap = static_cast<acc>(o.softcap), z = static_cast<acc>(o.z_loss);
    const scalar_t* x0 = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const at::Tensor target_c = target.contiguous();  // rows are read by index: a strided view would misread
    const int64_t* tgt = target_c.data_ptr<int64_t>();
    const acc* gl = grad_loss.data_ptr<acc>();
    const acc* lse_p = lse.data_ptr<acc>();
    scalar_t* g0 = grad.data_ptr<scalar_t>();
    constexpr bool same = std::is_same_v<scalar_t, acc>;

    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g = g0 + i * V;
        const int64_t y = tgt[i];
        if (y == o.ignore_index) {
          zero_row(g, V);
          continue;
        }
        if (y < 0 || y >= V) {
          fill_row(g, V, std::numeric_limits<double>::quiet_NaN());
          continue;
        }
        acc* buf = (same && cap == acc(0)) ? nullptr : scratch.get(2 * V);
        const acc* xs = row_values<scalar_t, acc>(x0 + i * row_stride, V, cap, buf);
        const acc lse_i = lse_p[i], go = gl[i];
        const acc w_y = w ? w[y] : acc(1);
        const acc a = go * ((acc(1) - eps) * w_y + eps / V * W + acc(2) * z * lse_i);
        write_grad_row<scalar_t, acc>(g, xs, nullptr, lse_i, a, go * eps / V, go * (acc(1) - eps) * w_y, w, V, y,
                                      cap, buf ? buf + V : nullptr);
      }
      FASTFT_STREAM_FENCE();
    });
  });
  if (grad_out.has_value()) return at::empty({0}, logits.options());
  return grad;
}

// grad *= scale, skipped when scale == 1 (reading a CPU scalar costs nothing here).
void scale_if_not_one_cpu(at::Tensor& grad, const at::Tensor& scale) {
  TORCH_CHECK(scale.numel() == 1, "scale_if_not_one_: scale must have one element");
  const double s = scale.item<double>();
  if (s == 1.0 || grad.numel() == 0) return;
  grad.mul_(s);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("cross_entropy_fwd_kernel", &cross_entropy_fwd_cpu);
  m.impl("cross_entropy_bwd_kernel", &cross_entropy_bwd_cpu);
  m.impl("scale_if_not_one_kernel_", &scale_if_not_one_cpu);
}

}  // namespace fastft
