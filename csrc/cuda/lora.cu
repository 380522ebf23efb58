// LoRA linear on CUDA (the "cuda" backend of fastft.ops.lora_linear). The schemas live in csrc/cpu/lora.cpp;
// this file registers the CUDA implementations with the same C++ signatures. Math (as on the CPU):
//
//   y = x W^T + b + s * u B^T,   u = drop(x) A^T            (drop(x) = x * keep * keep_scale, or x)
//   g = s * dy B;  dx = dy W + drop'(g A);  dA = g^T drop(x);  dB = s dy^T u;  dW = dy^T x;  db = sum dy
//
// One C++ call per forward and per backward. The products are ATen GEMMs (cuBLAS/cuBLASLt: bf16/fp16 with
// fp32 accumulation; the bias rides in addmm's epilogue, the rank-r term is added onto y in place by
// addmm_ with alpha = s, so there is no [N, out] temporary). Dropout is ours: one element-wise kernel
// draws csrc/_dropout.h's counter-based mask over x's flat [N, in] index from the device-side seed (no host
// sync) and applies it to x (forward, and dA in backward) or adds the masked LoRA term onto dx. The mask is the
// one every backend draws (reference, cpp, Triton), so forward and backward agree without storing it.
#include "_dropout.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/OpMathType.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <tuple>

namespace fastft {
namespace {

constexpr int kThreads = 256;

// out[i] = (add ? add[i] : 0) + (keep_i ? in[i] * keep_scale : 0) over a contiguous n-element tensor; with
// in == nullptr, out[i] = keep_i (the 0/1 mask). keep_i is csrc/_dropout.h's draw for flat index i under *seed.
template <typename T>
__global__ void dropout_kernel(const T* __restrict__ in, const T* add, T* out, int64_t n, const int64_t* __restrict__ seed,
                               uint32_t threshold, double keep_scale) {
  using acc = at::opmath_type<T>;
  const uint64_t s = static_cast<uint64_t>(*seed);
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const bool kept = dropout::keep(s, static_cast<uint64_t>(i), threshold);
    acc v;
    if (in == nullptr) {
      v = kept ? acc(1) : acc(0);
    } else {
      v = kept ? static_cast<acc>(in[i]) * static_cast<acc>(keep_scale) : acc(0);
    }
    if (add != nullptr) v += static_cast<acc>(add[i]);
    out[i] = static_cast<T>(v);
  }
}

// The seed as a one-element int64 tensor on `like`'s device (the kernel reads it there).
at::Tensor device_seed(const std::optional<at::Tensor>& seed, const at::Tensor& like) {
  TORCH_CHECK(seed.has_value() && seed->numel() == 1, "lora (CUDA): dropout needs a one-element seed tensor");
  return seed->to(like.device(), at::kLong).reshape({1});
}

// out = add + masked(in) (see dropout_kernel); `out` may be `add` (in place). All contiguous, same shape.
void launch_dropout(const at::Tensor& in, const at::Tensor& add, at::Tensor& out, const at::Tensor& seed, double p) {
  const int64_t n = out.numel();
  if (n == 0) return;
  const int64_t threshold = dropout::threshold_of(p);
  const double keep_scale = dropout::keep_scale(threshold);
  const int64_t blocks = std::min<int64_t>((n + kThreads - 1) / kThreads, 65536);  // grid-stride beyond
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, out.scalar_type(), "lora_dropout_cuda", [&] {
    dropout_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        in.defined() ? in.const_data_ptr<scalar_t>() : nullptr, add.defined() ? add.const_data_ptr<scalar_t>() : nullptr,
        out.mutable_data_ptr<scalar_t>(), n, seed.const_data_ptr<int64_t>(), static_cast<uint32_t>(threshold),
        keep_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

// drop(x) as a new contiguous tensor.
at::Tensor dropped(const at::Tensor& x, const at::Tensor& seed, double p) {
  at::Tensor out = at::empty(x.sizes(), x.options());
  launch_dropout(x, at::Tensor(), out, seed, p);
  return out;
}

void check_inputs(const char* op, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
                  const at::Tensor& lora_B) {
  TORCH_CHECK(x.is_cuda(), op, ": x must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": x must be 2-D [N, in], got ", x.sizes());
  TORCH_CHECK(weight.dim() == 2 && weight.size(1) == x.size(1), op, ": weight must be [out, ", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(lora_A.dim() == 2 && lora_A.size(1) == x.size(1), op, ": lora_A must be [r, ", x.size(1), "], got ",
              lora_A.sizes());
  TORCH_CHECK(lora_B.dim() == 2 && lora_B.size(0) == weight.size(0) && lora_B.size(1) == lora_A.size(0), op,
              ": lora_B must be [", weight.size(0), ", ", lora_A.size(0), "], got ", lora_B.sizes());
  for (const at::Tensor* t : {&weight, &lora_A, &lora_B}) {
    TORCH_CHECK(t->device() == x.device() && t->scalar_type() == x.scalar_type(), op,
                ": weight, lora_A and lora_B must be on x's device in x's dtype (", x.scalar_type(), ")");
  }
}

std::tuple<at::Tensor, at::Tensor> lora_linear_fwd_cuda(const at::Tensor& x, const at::Tensor& weight,
                                                        const std::optional<at::Tensor>& bias, const at::Tensor& lora_A,
                                                        const at::Tensor& lora_B, double scaling, double dropout_p,
                                                        const std::optional<at::Tensor>& seed) {
  check_inputs("fastft::lora_linear_fwd_kernel (CUDA)", x, weight, lora_A, lora_B);
  const c10::cuda::CUDAGuard guard(x.device());
  const at::Tensor xc = x.contiguous();
  const bool drop = dropout_p > 0.0;
  const at::Tensor u = at::mm(drop ? dropped(xc, device_seed(seed, xc), dropout_p) : xc, lora_A.t());
  at::Tensor y = (bias.has_value() && bias->defined()) ? at::addmm(*bias, xc, weight.t()) : at::mm(xc, weight.t());
  y.addmm_(u, lora_B.t(), 1.0, scaling);
  return {y, u};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> lora_linear_bwd_cuda(
    const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& weight, const at::Tensor& lora_A,
    const at::Tensor& lora_B, const at::Tensor& u, const std::optional<at::Tensor>& seed, double scaling,
    double dropout_p, bool need_dx, bool need_dweight, bool need_dbias, bool need_dA, bool need_dB) {
  check_inputs("fastft::lora_linear_bwd_kernel (CUDA)", x, weight, lora_A, lora_B);
  const c10::cuda::CUDAGuard guard(x.device());
  const bool drop = dropout_p > 0.0;
  const at::Tensor dy = grad_y.contiguous(), xc = x.contiguous();
  const at::Tensor drop_seed = drop ? device_seed(seed, xc) : at::Tensor();
  // Gradients not asked for are distinct empty tensors (custom-op outputs must not alias each other).
  at::Tensor dx = x.new_empty({0}), dweight = x.new_empty({0}), dbias = x.new_empty({0}), dA = x.new_empty({0}),
             dB = x.new_empty({0});
  at::Tensor g_scaled;  // s * dy B  [N, r]
  if (need_dx || need_dA) g_scaled = at::mm(dy, lora_B).mul_(scaling);
  if (need_dx) {
    dx = at::mm(dy, weight);
    if (drop) {
      launch_dropout(at::mm(g_scaled, lora_A), dx, dx, drop_seed, dropout_p);  // dx += drop'(g A), in place
    } else {
      dx.addmm_(g_scaled, lora_A);
    }
  }
  if (need_dA) dA = at::mm(g_scaled.t(), drop ? dropped(xc, drop_seed, dropout_p) : xc);
  if (need_dB) dB = at::mm(dy.t(), u).mul_(scaling);
  if (need_dweight) dweight = at::mm(dy.t(), xc);
  if (need_dbias) dbias = dy.sum(0);
  return {dx, dweight, dbias, dA, dB};
}

// The keep-mask (as 0/1 in `like`'s dtype) that the kernels above draw for `seed`: for tests.
at::Tensor lora_dropout_mask_cuda(const at::Tensor& like, double dropout_p, const at::Tensor& seed) {
  TORCH_CHECK(like.is_cuda(), "fastft::lora_dropout_mask_kernel (CUDA): like must be a CUDA tensor");
  const c10::cuda::CUDAGuard guard(like.device());
  at::Tensor out = at::empty(like.sizes(), like.options());
  launch_dropout(at::Tensor(), at::Tensor(), out, device_seed(seed, like), dropout_p);
  return out;
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("lora_linear_fwd_kernel", &fastft::lora_linear_fwd_cuda);
  m.impl("lora_linear_bwd_kernel", &fastft::lora_linear_bwd_cuda);
  m.impl("lora_dropout_mask_kernel", &fastft::lora_dropout_mask_cuda);
}
