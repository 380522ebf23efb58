// SwiGLU gated-product CUDA kernels (the "cuda" backend of fastft.ops.swiglu). The schemas live in
// csrc/schemas.cpp; this file registers the CUDA implementations, with the same C++ signatures. Element-wise
// over flat tensors, fp32 math, a = gate, b = up:
//   forward   out = round(silu(a)) b,   silu(a) = a sigmoid(a)   (round: to the inputs' dtype, as eager
//                                                                  F.silu(gate) * up rounds between its two ops)
//   backward  d_up = dout silu(a),   d_gate = dout b sigmoid(a) (1 + a (1 - sigmoid(a)))
// sigmoid(a) is recomputed in backward from the saved inputs. Grid-stride loops over a capped grid.
#include "cuda/_block_reduce.cuh"  // FASTFT_ROWS_DISPATCH

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <tuple>

namespace fastft {
namespace {

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // grid-stride beyond

unsigned blocks_for(int64_t n) {
  return static_cast<unsigned>(std::min<int64_t>((n + kThreads - 1) / kThreads, kMaxBlocks));
}

__device__ __forceinline__ float sigmoid(float a) { return 1.f / (1.f + expf(-a)); }

template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_fwd_kernel(const T* __restrict__ gate, const T* __restrict__ up, T* __restrict__ out, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float a = static_cast<float>(gate[i]);
    const float act = static_cast<float>(static_cast<T>(a * sigmoid(a)));  // rounded, as eager silu's output
    out[i] = static_cast<T>(act * static_cast<float>(up[i]));
  }
}

// d_gate / d_up: nullptr when not wanted (up is then read only for d_gate).
template <typename T>
__global__ void __launch_bounds__(kThreads)
    swiglu_bwd_kernel(const T* __restrict__ grad_out, const T* __restrict__ gate, const T* __restrict__ up,
                      T* __restrict__ d_gate, T* __restrict__ d_up, int64_t n) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += stride) {
    const float g = static_cast<float>(grad_out[i]), a = static_cast<float>(gate[i]);
    const float sig = sigmoid(a);
    if (d_up != nullptr) d_up[i] = static_cast<T>(g * a * sig);
    if (d_gate != nullptr) {
      d_gate[i] = static_cast<T>(g * static_cast<float>(up[i]) * sig * (1.f + a * (1.f - sig)));
    }
  }
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

void check_pair(const char* op, const at::Tensor& gate, const char* other_name, const at::Tensor& other) {
  TORCH_CHECK(gate.is_cuda(), op, ": gate must be a CUDA tensor, got one on ", gate.device());
  const auto dt = gate.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": gate must be float32, float16 or bfloat16 (fp64 goes to the reference or cpp backend), got ", dt);
  TORCH_CHECK(gate.sizes() == other.sizes(), op, ": gate and ", other_name, " must have one shape, got ",
              gate.sizes(), " and ", other.sizes());
  TORCH_CHECK(gate.scalar_type() == other.scalar_type(), op, ": gate and ", other_name, " must have one dtype, got ",
              gate.scalar_type(), " and ", other.scalar_type());
  TORCH_CHECK(gate.device() == other.device(), op, ": gate is on ", gate.device(), ", ", other_name, " on ",
              other.device());
}

at::Tensor swiglu_fwd_cuda(const at::Tensor& gate_in, const at::Tensor& up_in) {
  constexpr const char* op = "fastft::swiglu_fwd_kernel (CUDA)";
  check_pair(op, gate_in, "up", up_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor gate = gate_in.contiguous(), up = up_in.contiguous();
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  const int64_t n = gate.numel();
  if (n == 0) return out;
  FASTFT_ROWS_DISPATCH(gate.scalar_type(), "swiglu_fwd_cuda", [&] {
    swiglu_fwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(), out.mutable_data_ptr<scalar_t>(), n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

// (d_gate, d_up); an empty (0,) tensor for the one not asked for.
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cuda(const at::Tensor& grad_out_in, const at::Tensor& gate_in,
                                                   const at::Tensor& up_in, bool need_gate, bool need_up) {
  constexpr const char* op = "fastft::swiglu_bwd_kernel (CUDA)";
  check_pair(op, gate_in, "up", up_in);
  check_pair(op, gate_in, "grad_out", grad_out_in);
  const c10::cuda::CUDAGuard guard(gate_in.device());
  const at::Tensor grad_out = grad_out_in.contiguous(), gate = gate_in.contiguous(), up = up_in.contiguous();
  // Distinct empties: a custom op's outputs must not alias each other.
  at::Tensor d_gate = need_gate ? at::empty(gate.sizes(), gate.options()) : at::empty({0}, gate.options());
  at::Tensor d_up = need_up ? at::empty(gate.sizes(), gate.options()) : at::empty({0}, gate.options());
  const int64_t n = gate.numel();
  if (n == 0 || !(need_gate || need_up)) return {d_gate, d_up};
  FASTFT_ROWS_DISPATCH(gate.scalar_type(), "swiglu_bwd_cuda", [&] {
    swiglu_bwd_kernel<scalar_t><<<blocks_for(n), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_out.const_data_ptr<scalar_t>(), gate.const_data_ptr<scalar_t>(), up.const_data_ptr<scalar_t>(),
        need_gate ? d_gate.mutable_data_ptr<scalar_t>() : nullptr,
        need_up ? d_up.mutable_data_ptr<scalar_t>() : nullptr, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {d_gate, d_up};
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("swiglu_fwd_kernel", &fastft::swiglu_fwd_cuda);
  m.impl("swiglu_bwd_kernel", &fastft::swiglu_bwd_cuda);
}
