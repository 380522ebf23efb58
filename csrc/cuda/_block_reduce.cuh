// Block-wide reductions and the online softmax for the row kernels of csrc/cuda (one thread block per row).
// Used by cross_entropy.cu and kl.cu.
#pragma once

#include <ATen/Dispatch.h>

#include <cmath>
#include <cstdint>

namespace fastft {
namespace cuda_rows {

constexpr int kMaxThreads = 1024;
constexpr int kWarp = 32;

// Enough threads for about one 16-byte pack of the row each (a multiple of a warp, 32..1024).
inline int threads_for_row(int64_t V, int64_t elem_size) {
  const int64_t packs = (V * elem_size + 15) / 16;
  const int64_t warps = (packs + kWarp - 1) / kWarp;
  const int64_t capped = warps < 1 ? 1 : (warps > kMaxThreads / kWarp ? kMaxThreads / kWarp : warps);
  return static_cast<int>(capped * kWarp);
}

struct Add {
  __device__ __forceinline__ static float identity() { return 0.f; }
  __device__ __forceinline__ float operator()(float a, float b) const { return a + b; }
};

// Online softmax (Milakov & Gimelshein 2018): a running max m and s = sum exp(v - m), rescaled when m grows.
struct MaxSum {
  float m;
  float s;
};

__device__ __forceinline__ void online_add(MaxSum& a, float v) {
  if (v > a.m) {
    // exp(-inf) = 0 covers the first element. A +inf logit makes s NaN (as exp(inf - inf) does in the
    // other backends): the loss and gradient of its row are NaN, never a silently finite value.
    a.s = v == INFINITY ? __int_as_float(0x7fc00000) : a.s * expf(a.m - v) + 1.f;
    a.m = v;
  } else if (v != -INFINITY) {  // -inf (a banned token) adds nothing; NaN lands here and poisons s
    a.s += expf(v - a.m);
  }
}

// Merging two online-softmax states (any struct with the running max m): a becomes the one with the larger max,
// and merge(a, b, r) rescales b's sums by r = exp(b.m - a.m) onto a's. A side that saw nothing (m = -inf) is
// dropped first, which avoids (-inf) - (-inf).
template <typename State, typename Merge>
__device__ __forceinline__ State combine_online(State a, State b, Merge merge) {
  if (b.m > a.m) {
    const State t = a;
    a = b;
    b = t;
  }
  if (b.m == -INFINITY) return a;
  return merge(a, b, expf(b.m - a.m));
}

struct CombineMaxSum {
  __device__ __forceinline__ static MaxSum identity() { return {-INFINITY, 0.f}; }
  __device__ __forceinline__ MaxSum operator()(MaxSum a, MaxSum b) const {
    return combine_online(a, b, [](MaxSum x, MaxSum y, float r) { return MaxSum{x.m, x.s + y.s * r}; });
  }
};

__device__ __forceinline__ float shfl_xor(float v, int lane_mask) { return __shfl_xor_sync(0xffffffffu, v, lane_mask); }
__device__ __forceinline__ MaxSum shfl_xor(MaxSum v, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, v.m, lane_mask), __shfl_xor_sync(0xffffffffu, v.s, lane_mask)};
}

template <typename T, typename Op>
__device__ __forceinline__ T warp_allreduce(T v, Op op) {
#pragma unroll
  for (int o = kWarp / 2; o > 0; o /= 2) v = op(v, shfl_xor(v, o));
  return v;
}

// Reduce v over the whole block; every thread gets the result. blockDim.x must be a multiple of 32, and
// every thread of the block must call it (callers branch only on block-uniform values).
template <typename T, typename Op>
__device__ __forceinline__ T block_allreduce(T v, Op op) {
  constexpr int kResult = kMaxThreads / kWarp;
  __shared__ T partial[kMaxThreads / kWarp + 1];
  const int lane = threadIdx.x % kWarp;
  const int warp = threadIdx.x / kWarp;
  v = warp_allreduce(v, op);
  __syncthreads();  // an earlier call may still be reading partial[kResult]
  if (lane == 0) partial[warp] = v;
  __syncthreads();
  if (warp == 0) {
    T w = lane < static_cast<int>(blockDim.x / kWarp) ? partial[lane] : Op::identity();
    w = warp_allreduce(w, op);
    if (lane == 0) partial[kResult] = w;
  }
  __syncthreads();
  return partial[kResult];
}

}  // namespace cuda_rows
}  // namespace fastft

// fp32 / fp16 / bf16 (the row kernels compute in fp32; fp64 goes to the reference or the C++ backend).
#define FASTFT_ROWS_DISPATCH(TYPE, NAME, ...)                  \
  AT_DISPATCH_SWITCH(TYPE, NAME,                               \
                     AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) \
                     AT_DISPATCH_CASE(at::kHalf, __VA_ARGS__)  \
                     AT_DISPATCH_CASE(at::kBFloat16, __VA_ARGS__))
