// RMSNorm CUDA kernels (the "cuda" backend of fastft.ops.rms_norm). The schemas live in csrc/schemas.cpp;
// this file registers the CUDA implementations, with the same C++ signatures. Math and casting modes: that
// file's header and fastft/ops/rms_norm.py. Per row x of width H, r = 1 / sqrt(mean(x^2) + eps), s = offset + w:
//   forward   y = round_x(x r) s   ("llama")   or   y = x r s  ("gemma", fp32 throughout, rounded on store)
//   backward  g = dy s,  dx = r g - (r^3 / H) (g . x) x,  dw = sum over rows of dy round_x(x r)
// Layout: fp32 math; forward one thread block per row (the sum of squares via block_allreduce; r saved).
// Backward runs a grid of at most kBackwardBlocks blocks, each striding over rows; thread t of a block always
// owns the same columns, so it accumulates its columns' dw into the block's own fp32 row of a [blocks, H]
// partial buffer without atomics (deterministic), and one ATen sum over the blocks finishes dw on the stream.
#include "cuda/_block_reduce.cuh"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <tuple>

namespace fastft {
namespace {

using cuda_rows::Add;
using cuda_rows::block_allreduce;
using cuda_rows::threads_for_row;

// Rows' blocks in backward: a few per SM keeps the GPU busy while the partial buffer stays small (8 MB at H = 4096).
constexpr int64_t kBackwardBlocks = 512;

// v rounded to T's precision and back ("llama" rounds the normalised row to x's dtype, as Hugging Face does).
template <typename T>
__device__ __forceinline__ float round_to(float v) {
  return static_cast<float>(static_cast<T>(v));
}

// x [N, H] with row stride x_stride, y [N, H] contiguous of the output dtype out_t, scale [H] fp32.
template <typename T, typename out_t>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads)
    rms_norm_fwd_kernel(const T* __restrict__ x, int64_t x_stride, int64_t H, const float* __restrict__ scale,
                        float eps, bool gemma, out_t* __restrict__ y, float* __restrict__ rstd) {
  const int64_t row = blockIdx.x;
  const T* xr = x + row * x_stride;
  out_t* yr = y + row * H;
  float squares = 0.f;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    const float v = static_cast<float>(xr[j]);
    squares += v * v;
  }
  squares = block_allreduce(squares, Add{});
  const float r = 1.f / sqrtf(squares / static_cast<float>(H) + eps);
  if (threadIdx.x == 0) rstd[row] = r;
  for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
    float normed = static_cast<float>(xr[j]) * r;
    if (!gemma) normed = round_to<T>(normed);
    yr[j] = static_cast<out_t>(normed * scale[j]);
  }
}

// grad_y (out_t, row stride g_stride) and x (T, row stride x_stride); dx (nullptr: not wanted) [N, H] contiguous
// of T; partial (nullptr: not wanted) [gridDim.x, H] fp32, zeroed.
template <typename T, typename out_t>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads)
    rms_norm_bwd_kernel(const out_t* __restrict__ grad_y, int64_t g_stride, const T* __restrict__ x,
                        int64_t x_stride, int64_t N, int64_t H, const float* __restrict__ rstd,
                        const float* __restrict__ scale, bool gemma, T* __restrict__ dx, float* __restrict__ partial) {
  float* dw = partial != nullptr ? partial + static_cast<int64_t>(blockIdx.x) * H : nullptr;
  const float inv_h = 1.f / static_cast<float>(H);
  for (int64_t row = blockIdx.x; row < N; row += gridDim.x) {  // block-uniform: block_allreduce is safe inside
    const T* xr = x + row * x_stride;
    const out_t* gr = grad_y + row * g_stride;
    const float r = rstd[row];
    float dot = 0.f;  // (dy s) . x
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      const float xv = static_cast<float>(xr[j]), gv = static_cast<float>(gr[j]);
      dot += gv * scale[j] * xv;
      if (dw != nullptr) {
        float normed = xv * r;
        if (!gemma) normed = round_to<T>(normed);
        dw[j] += gv * normed;
      }
    }
    if (dx == nullptr) continue;
    const float c = r * r * r * inv_h * block_allreduce(dot, Add{});
    T* dxr = dx + row * H;
    for (int64_t j = threadIdx.x; j < H; j += blockDim.x) {
      dxr[j] = static_cast<T>(r * static_cast<float>(gr[j]) * scale[j] - c * static_cast<float>(xr[j]));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

void check_x(const char* op, const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.is_cuda(), op, ": ", name, " must be a CUDA tensor, got one on ", x.device());
  TORCH_CHECK(x.dim() == 2, op, ": ", name, " must be [N, H], got ", x.sizes());
  TORCH_CHECK(x.numel() == 0 || x.size(1) == 1 || x.stride(1) == 1, op, ": ", name,
              "'s last dimension must be contiguous");
  TORCH_CHECK(x.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", x.size(0), ")");
}

void check_weight(const char* op, const at::Tensor& x, const at::Tensor& weight) {
  const auto dt = x.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": x must be float32, float16 or bfloat16 (fp64 goes to the reference or cpp backend), got ", dt);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == x.size(1), op, ": weight must be [H] = [", x.size(1), "], got ",
              weight.sizes());
  TORCH_CHECK(weight.device() == x.device(), op, ": weight is on ", weight.device(), ", x on ", x.device());
}

// The output dtype: x's for "gemma"; for "llama" torch's promotion of x and the weight (as csrc/cpu/rms_norm.cpp).
at::ScalarType output_type(const at::Tensor& x, const at::Tensor& weight, bool gemma) {
  return gemma ? x.scalar_type() : at::promote_types(x.scalar_type(), weight.scalar_type());
}

// Runs Launch<T, out_t>::run(args...) for x's dtype T and an output dtype out_t that is T or fp32; other pairs
// are rejected (the Python op never sends them).
template <template <typename, typename> class Launch, typename... Args>
void dispatch_x_out(const char* op, at::ScalarType x_type, at::ScalarType out_type, Args&&... args) {
  FASTFT_ROWS_DISPATCH(x_type, "rms_norm_cuda", [&] {
    if (out_type == x_type) {
      Launch<scalar_t, scalar_t>::run(args...);
    } else {
      TORCH_CHECK(out_type == at::kFloat, op, ": unsupported dtype pair: x ", x_type, " with output ", out_type);
      Launch<scalar_t, float>::run(args...);
    }
  });
}

template <typename T, typename out_t>
struct LaunchForward {
  static void run(const at::Tensor& x, const at::Tensor& scale, double eps, bool gemma, at::Tensor& y,
                  at::Tensor& rstd) {
    const int64_t N = x.size(0), H = x.size(1);
    rms_norm_fwd_kernel<T, out_t><<<static_cast<unsigned>(N), threads_for_row(H, sizeof(T)), 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<T>(), x.stride(0), H, scale.const_data_ptr<float>(), static_cast<float>(eps), gemma,
        y.mutable_data_ptr<out_t>(), rstd.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

// dx / partial: undefined when not wanted; partial has one row per block.
template <typename T, typename out_t>
struct LaunchBackward {
  static void run(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& scale,
                  bool gemma, int64_t blocks, at::Tensor& dx, at::Tensor& partial) {
    const int64_t N = x.size(0), H = x.size(1);
    rms_norm_bwd_kernel<T, out_t><<<static_cast<unsigned>(blocks), threads_for_row(H, sizeof(T)), 0,
                                    c10::cuda::getCurrentCUDAStream()>>>(
        grad_y.const_data_ptr<out_t>(), grad_y.stride(0), x.const_data_ptr<T>(), x.stride(0), N, H,
        rstd.const_data_ptr<float>(), scale.const_data_ptr<float>(), gemma,
        dx.defined() ? dx.mutable_data_ptr<T>() : nullptr,
        partial.defined() ? partial.mutable_data_ptr<float>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cuda(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                     double offset, bool gemma) {
  constexpr const char* op = "fastft::rms_norm_fwd_kernel (CUDA)";
  check_x(op, x, "x");
  check_weight(op, x, weight);
  const int64_t N = x.size(0), H = x.size(1);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor y = at::empty({N, H}, x.options().dtype(output_type(x, weight, gemma)));
  at::Tensor rstd = at::empty({N}, x.options().dtype(at::kFloat));
  if (N == 0) return {y, rstd};
  const at::Tensor scale = (weight.to(at::kFloat) + offset).contiguous();  // [H]: offset + w, once
  dispatch_x_out<LaunchForward>(op, x.scalar_type(), y.scalar_type(), x, scale, eps, gemma, y, rstd);
  return {y, rstd};
}

// (dx, dw); an empty (0,) tensor for the one not asked for.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cuda(const at::Tensor& grad_y, const at::Tensor& x,
                                                     const at::Tensor& weight, const at::Tensor& rstd, double offset,
                                                     bool gemma, bool need_input, bool need_weight) {
  constexpr const char* op = "fastft::rms_norm_bwd_kernel (CUDA)";
  check_x(op, x, "x");
  check_x(op, grad_y, "grad_y");
  check_weight(op, x, weight);
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(grad_y.size(0) == N && grad_y.size(1) == H, op, ": grad_y must be [", N, ", ", H, "], got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.device() == x.device(), op, ": grad_y is on ", grad_y.device(), ", x on ", x.device());
  TORCH_CHECK(grad_y.scalar_type() == output_type(x, weight, gemma), op, ": grad_y must be ",
              output_type(x, weight, gemma), ", got ", grad_y.scalar_type());
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == N && rstd.is_contiguous() && rstd.scalar_type() == at::kFloat &&
                  rstd.device() == x.device(),
              op, ": rstd must be a contiguous float32 [N] tensor on x's device");
  const c10::cuda::CUDAGuard guard(x.device());
  // Distinct empties: a custom op's outputs must not alias each other.
  at::Tensor dx = need_input ? at::empty({N, H}, x.options()) : at::empty({0}, x.options());
  if (N == 0 || !(need_input || need_weight)) {
    return {dx, need_weight ? at::zeros({H}, weight.options()) : at::empty({0}, weight.options())};
  }
  const int64_t blocks = need_weight ? std::min(N, kBackwardBlocks) : N;
  at::Tensor partial = need_weight ? at::zeros({blocks, H}, x.options().dtype(at::kFloat)) : at::Tensor();
  const at::Tensor scale = (weight.to(at::kFloat) + offset).contiguous();
  at::Tensor dx_out = need_input ? dx : at::Tensor();
  dispatch_x_out<LaunchBackward>(op, x.scalar_type(), grad_y.scalar_type(), grad_y, x, rstd, scale, gemma, blocks,
                                 dx_out, partial);
  return {dx, need_weight ? partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options())};
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("rms_norm_fwd_kernel", &fastft::rms_norm_fwd_cuda);
  m.impl("rms_norm_bwd_kernel", &fastft::rms_norm_bwd_cuda);
}
