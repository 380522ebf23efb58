// Bottleneck adapter on CUDA (the "cuda" backend of fastft.ops.adapter). The schemas live in
// csrc/schemas.cpp; this file registers the CUDA implementations with the same C++ signatures.
// Math (as on the CPU): y = x + scale * (h W_up^T + b_up), h = dropout(act(pre)), pre = x W_down^T + b_down.
//
//   forward:  pre = addmm(b_down, x, W_down^T);  h = [act(pre) * keep * keep_scale | 1]  (our kernel; the ones
//             column when there is an up bias);  y = addmm(x, h, [W_up | b_up]^T, alpha = scale): residual, bias
//             and scale in one GEMM.
//   backward: grad_h = g W_up;  grad_pre = scale * grad_h * act'(pre) * keep * keep_scale and h again (our
//             kernel, one pass over the [N, r] bottleneck);  dx = addmm(g, grad_pre, W_down);
//             dW_down = grad_pre^T x;  db_down = sum grad_pre;  [dW_up | db_up] = scale * g^T [h | 1].
// One C++ call per forward and per backward; the GEMMs are ATen's (cuBLAS, fp32 accumulation for fp16/bf16).
// Only pre [N, r] and the seed are saved. The mask is csrc/_dropout.h's hash of (seed, i * r + j) read from the
// device-side seed (no host sync): the same elements drop on every backend.
#include "_dropout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastft {
namespace {

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };  // as csrc/cpu/adapter.cpp
constexpr int kThreads = 256;

// act(p) and, when d != nullptr, *d = act'(p); the formulas of csrc/cpu/adapter.cpp's Act.
template <typename acc>
__device__ __forceinline__ acc activate(int64_t kind, acc p, acc* d) {
  const acc one(1), half(0.5);
  switch (kind) {
    case kRelu:
      if (d) *d = p > acc(0) ? one : acc(0);
      return p > acc(0) || p != p ? p : acc(0);  // NaN stays NaN, as torch.relu
    case kGelu: {
      const acc cdf = half * (one + erf(p * acc(0.70710678118654752440)));
      if (d) *d = cdf + p * acc(0.39894228040143267794) * exp(acc(-0.5) * p * p);
      return p * cdf;
    }
    case kGeluTanh: {
      const acc c = acc(0.79788456080286535588), k = acc(0.044715);
      const acc p2 = p * p;
      const acc t = tanh(c * p * (one + k * p2));
      if (d) *d = half * (one + t) + half * p * (one - t * t) * c * (one + acc(3) * k * p2);
      return half * p * (one + t);
    }
    default: {  // kSilu
      const acc s = one / (one + exp(-p));
      if (d) *d = s * (one + p * (one - s));
      return p * s;
    }
  }
}

// Over the [N, r] bottleneck (element e = i * r + j, the dropout index):
//   h[i, j] = act(pre) * keep * keep_scale (h rows have `width` = r or r + 1 columns; column r = 1 when
//   width > r); with grad_h: grad_pre = grad_scale * grad_h * act'(pre) * keep * keep_scale. h == nullptr: no h.
template <typename T>
__global__ void act_dropout_kernel(const T* __restrict__ pre, const T* __restrict__ grad_h, T* __restrict__ h,
                                   T* __restrict__ grad_pre, int64_t N, int64_t r, int64_t width, int64_t activation,
                                   const int64_t* __restrict__ seed, uint32_t threshold, double keep_scale,
                                   double grad_scale) {
  using acc = at::opmath_type<T>;
  const bool drop = threshold > 0;
  const uint64_t s = drop ? static_cast<uint64_t>(*seed) : 0;
  const int64_t n = N * r;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t e = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; e < n; e += stride) {
    const int64_t i = e / r, j = e - i * r;
    const acc k = !drop ? acc(1) : dropout::keep(s, static_cast<uint64_t>(e), threshold) ? acc(keep_scale) : acc(0);
    acc d;
    const acc a = activate<acc>(activation, static_cast<acc>(pre[e]), grad_pre != nullptr ? &d : nullptr);
    if (h != nullptr) {
      h[i * width + j] = static_cast<T>(a * k);
      if (width > r && j == 0) h[i * width + r] = T(1);
    }
    if (grad_pre != nullptr) grad_pre[e] = static_cast<T>(acc(grad_scale) * static_cast<acc>(grad_h[e]) * d * k);
  }
}

void launch_act_dropout(const at::Tensor& pre, const at::Tensor& grad_h, const at::Tensor& h,
                        const at::Tensor& grad_pre, int64_t activation, const at::Tensor& seed, int64_t threshold,
                        double grad_scale) {
  const int64_t N = pre.size(0), r = pre.size(1);
  if (N * r == 0) return;
  const double keep_scale = threshold > 0 ? dropout::keep_scale(threshold) : 1.0;
  const int64_t blocks = std::min<int64_t>((N * r + kThreads - 1) / kThreads, 65536);  // grid-stride beyond
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adapter_act_dropout_cuda", [&] {
    act_dropout_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        pre.const_data_ptr<scalar_t>(), grad_h.defined() ? grad_h.const_data_ptr<scalar_t>() : nullptr,
        h.defined() ? h.mutable_data_ptr<scalar_t>() : nullptr,
        grad_pre.defined() ? grad_pre.mutable_data_ptr<scalar_t>() : nullptr, N, r, h.defined() ? h.size(1) : r,
        activation, threshold > 0 ? seed.const_data_ptr<int64_t>() : nullptr, static_cast<uint32_t>(threshold),
        keep_scale, grad_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

void check_common(const char* op, const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& up_weight,
                  int64_t activation, int64_t drop_threshold) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be [N, H], got ", x.sizes());
  const int64_t H = x.size(1);
  TORCH_CHECK(down_weight.dim() == 2 && down_weight.size(1) == H, op, ": down_weight must be [r, ", H, "], got ",
              down_weight.sizes());
  TORCH_CHECK(up_weight.dim() == 2 && up_weight.size(0) == H && up_weight.size(1) == down_weight.size(0), op,
              ": up_weight must be [", H, ", ", down_weight.size(0), "], got ", up_weight.sizes());
  TORCH_CHECK(activation >= kRelu && activation <= kSilu, op, ": unknown activation code ", activation);
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold < (int64_t(1) << dropout::kDropBits), op,
              ": drop_threshold must be in [0, 2^24), got ", drop_threshold);
}

// The seed where the kernel reads it: a one-element int64 tensor on x's device (undefined without dropout).
at::Tensor device_seed(const at::Tensor& seed, const at::Tensor& x, int64_t drop_threshold) {
  if (drop_threshold == 0) return at::Tensor();
  TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong, "adapter (CUDA): seed must be a one-element int64 tensor");
  return seed.to(x.device()).reshape({1});
}

std::tuple<at::Tensor, at::Tensor> adapter_fwd_cuda(const at::Tensor& x, const at::Tensor& down_weight,
                                                    const c10::optional<at::Tensor>& down_bias,
                                                    const at::Tensor& up_weight,
                                                    const c10::optional<at::Tensor>& up_bias, const at::Tensor& seed,
                                                    int64_t activation, int64_t drop_threshold, double scale) {
  check_common("fastft::adapter_fwd_kernel (CUDA)", x, down_weight, up_weight, activation, drop_threshold);
  at::NoGradGuard no_grad;  // the GEMMs below are the kernel's internals, not autograd ops
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), r = down_weight.size(0);
  const bool has_up_bias = up_bias.has_value() && up_bias->defined();
  const at::Tensor xc = x.contiguous();
  const at::Tensor pre = (down_bias.has_value() && down_bias->defined()) ? at::addmm(*down_bias, xc, down_weight.t())
                                                                         : at::mm(xc, down_weight.t());
  at::Tensor h = at::empty({N, r + (has_up_bias ? 1 : 0)}, x.options());
  launch_act_dropout(pre, at::Tensor(), h, at::Tensor(), activation, device_seed(seed, x, drop_threshold),
                     drop_threshold, 1.0);
  // [W_up | b_up]^T ([width, H]): [h | 1] @ it adds the up bias inside the product.
  const at::Tensor up_aug_t = (has_up_bias ? at::cat({up_weight, up_bias->unsqueeze(1)}, 1) : up_weight).t();
  at::Tensor y = at::addmm(xc, h, up_aug_t, 1.0, scale);
  return {y, pre};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> adapter_bwd_cuda(
    const at::Tensor& grad, const at::Tensor& x, const at::Tensor& down_weight, const at::Tensor& up_weight,
    const at::Tensor& pre, const at::Tensor& seed, int64_t activation, int64_t drop_threshold, double scale,
    bool has_down_bias, bool has_up_bias, bool need_input, bool need_down, bool need_up) {
  constexpr const char* op = "fastft::adapter_bwd_kernel (CUDA)";
  check_common(op, x, down_weight, up_weight, activation, drop_threshold);
  TORCH_CHECK(grad.sizes() == x.sizes(), op, ": grad ", grad.sizes(), " must match x ", x.sizes());
  TORCH_CHECK(pre.dim() == 2 && pre.size(0) == x.size(0) && pre.size(1) == down_weight.size(0), op,
              ": pre must be [N, r], got ", pre.sizes());
  at::NoGradGuard no_grad;
  const c10::cuda::CUDAGuard guard(x.device());
  const int64_t N = x.size(0), r = down_weight.size(0);
  const auto opts = x.options();
  const at::Tensor gc = grad.contiguous(), xc = x.contiguous(), pc = pre.contiguous();
  // Outputs of a custom op may not alias each other: one distinct empty tensor per gradient not computed.
  at::Tensor dx = at::empty({0}, opts), dwd = at::empty({0}, opts), dbd = at::empty({0}, opts),
             dwu = at::empty({0}, opts), dbu = at::empty({0}, opts);
  if (!(need_input || need_down || need_up)) return {dx, dwd, dbd, dwu, dbu};

  const at::Tensor grad_h = at::mm(gc, up_weight);  // [N, r]
  at::Tensor grad_pre = at::empty({N, r}, opts);
  at::Tensor h = need_up ? at::empty({N, r + (has_up_bias ? 1 : 0)}, opts) : at::Tensor();
  launch_act_dropout(pc, grad_h, h, grad_pre, activation, device_seed(seed, x, drop_threshold), drop_threshold, scale);
  if (need_input) dx = at::addmm(gc, grad_pre, down_weight);  // residual gradient + grad_pre @ W_down
  if (need_down) {
    dwd = at::mm(grad_pre.t(), xc);
    if (has_down_bias) dbd = grad_pre.sum(0);
  }
  if (need_up) {
    const at::Tensor up_aug = at::mm(gc.t(), h).mul_(scale);  // [H, width] = [dW_up | db_up]
    // Copies, never views: custom-op outputs may not alias each other.
    dwu = has_up_bias ? up_aug.narrow(1, 0, r).contiguous() : up_aug;
    if (has_up_bias) dbu = up_aug.select(1, r).contiguous();
  }
  return {dx, dwd, dbd, dwu, dbu};
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("adapter_fwd_kernel", &fastft::adapter_fwd_cuda);
  m.impl("adapter_bwd_kernel", &fastft::adapter_bwd_cuda);
}
