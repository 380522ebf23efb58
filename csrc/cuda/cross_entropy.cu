// CUDA kernels for fastft cross-entropy (ignore_index, class weights, label smoothing, z-loss,
// logit softcapping). The schemas live in csrc/schemas.cpp; this file only registers the
// CUDA implementations. Contract and math: fastft/ops/cross_entropy.py, fastft/reference/cross_entropy.py.
//
// Per counted row (target y, softcapped logits x, lse = logsumexp(x), weights w (ones when absent),
// W = sum(w), eps = label_smoothing, p = softmax(x)):
//   loss    = (1-eps) w_y (lse - x_y) + (eps/V) (W lse - sum_c w_c x_c) + z_loss lse^2
//   dloss/dx_j = p_j ((1-eps) w_y + (eps/V) W + 2 z_loss lse) - (eps/V) w_j - [j == y] (1-eps) w_y,
//             times (1 - tanh(raw_j / softcap)^2) when softcap > 0.
// Ignored rows (y == ignore_index) are not read: loss 0, lse 0, zero gradient row. A target outside [0, V) that is
// not ignore_index is never read through: loss NaN and a NaN gradient row.
//
// Layout: one thread block per row, fp32 math throughout. Sweep 1 reads the row once (16-byte loads)
// and computes lse with an online softmax; when a gradient is wanted, sweep 2 reads the row again
// (typically still in L2) and writes the gradient. No host synchronisation anywhere: scalars that
// live on the device (grad_scale, the scale of scale_if_not_one_) are read by the kernels.
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "_cross_entropy_grad_out.h"
#include "cuda/_block_reduce.cuh"

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>

namespace fastft {
namespace {

// Block reductions, the online softmax (MaxSum, online_add, CombineMaxSum) and threads_for_row are shared
// with the other row kernels (kl.cu).
using namespace cuda_rows;

// ------------------------------------------------------------------------------------------------
// Row sweeps with 16-byte vector access
// ------------------------------------------------------------------------------------------------

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

// Number of leading elements of p[0, n) before the first 16-byte boundary (n when p is not even
// element-aligned, which a tensor never is, so everything then goes the scalar way).
template <typename T>
__device__ __forceinline__ int64_t aligned_head(const T* p, int64_t n) {
  const auto addr = reinterpret_cast<uintptr_t>(p);
  if (addr % sizeof(T) != 0) return n;
  const auto head = static_cast<int64_t>((16 - addr % 16) % 16 / sizeof(T));
  return head < n ? head : n;
}

// f(j, x_j) for the elements of row x[0, n) owned by this thread (block-strided): a scalar head up
// to the first 16-byte boundary, 16-byte packs, a scalar tail. In-row indices are 32-bit (n + kMaxThreads
// < 2^31, checked by the launchers): 64-bit ones cost the forward the registers that kept it from 2 blocks/SM.
template <typename T, typename F>
__device__ __forceinline__ void row_read(const T* __restrict__ x, int64_t n, F&& f) {
  constexpr int kVec = Pack<T>::kSize;
  const int head = static_cast<int>(aligned_head(x, n));
  const int npack = (n - head) / kVec;
  const int tail = head + npack * kVec;
  for (int j = threadIdx.x; j < head; j += blockDim.x) f(j, static_cast<float>(x[j]));
  const auto* packs = reinterpret_cast<const Pack<T>*>(x + head);
  for (int k = threadIdx.x; k < npack; k += blockDim.x) {
    const Pack<T> p = packs[k];
#pragma unroll
    for (int e = 0; e < kVec; ++e) f(head + k * kVec + e, static_cast<float>(p.v[e]));
  }
  for (int j = tail + threadIdx.x; j < n; j += blockDim.x) f(j, static_cast<float>(x[j]));
}

// out[j] = f(j, x_j) for the whole row; 16-byte packs when x and out are equally misaligned (always
// so for a contiguous logits tensor and its contiguous gradient), else element by element. out may be x
// (the gradient written over the logits): each thread reads an element or pack before it stores the same
// one, and no other thread touches it, so the pointers are not __restrict__.
template <typename T, typename F>
__device__ __forceinline__ void row_map(const T* x, T* out, int64_t n, F&& f) {
  constexpr int kVec = Pack<T>::kSize;
  if ((reinterpret_cast<uintptr_t>(x) - reinterpret_cast<uintptr_t>(out)) % 16 != 0) {
    for (int j = threadIdx.x; j < n; j += blockDim.x) out[j] = static_cast<T>(f(j, static_cast<float>(x[j])));
    return;
  }
  const int head = static_cast<int>(aligned_head(x, n));
  const int npack = (n - head) / kVec;
  const int tail = head + npack * kVec;
  for (int j = threadIdx.x; j < head; j += blockDim.x) out[j] = static_cast<T>(f(j, static_cast<float>(x[j])));
  const auto* in_packs = reinterpret_cast<const Pack<T>*>(x + head);
  auto* out_packs = reinterpret_cast<Pack<T>*>(out + head);
  for (int k = threadIdx.x; k < npack; k += blockDim.x) {
    const Pack<T> p = in_packs[k];
    Pack<T> q;
#pragma unroll
    for (int e = 0; e < kVec; ++e) q.v[e] = static_cast<T>(f(head + k * kVec + e, static_cast<float>(p.v[e])));
    out_packs[k] = q;
  }
  for (int j = tail + threadIdx.x; j < n; j += blockDim.x) out[j] = static_cast<T>(f(j, static_cast<float>(x[j])));
}

template <typename T>
__device__ __forceinline__ void row_fill(T* __restrict__ out, int64_t n, float value) {
  const T v = static_cast<T>(value);
  for (int64_t j = threadIdx.x; j < n; j += blockDim.x) out[j] = v;
}

// ------------------------------------------------------------------------------------------------
// Kernels
// ------------------------------------------------------------------------------------------------

struct Options {
  int64_t ignore_index;
  float eps;      // label_smoothing
  float z_loss;
  float softcap;  // 0: off
};

// Writes the gradient row g = scale * dloss/dx (see the top of the file) for row x with target y.
template <typename T>
__device__ __forceinline__ void write_grad_row(const T* x, T* g, int64_t V, int64_t y,
                                               const float* __restrict__ weight, float W, float lse, float scale,
                                               const Options& o) {
  if (y == o.ignore_index) {
    row_fill(g, V, 0.f);
    return;
  }
  if (y < 0 || y >= V) {
    row_fill(g, V, __int_as_float(0x7fc00000));  // quiet NaN
    return;
  }
  const float w_y = weight != nullptr ? weight[y] : 1.f;
  const float eps_v = o.eps / static_cast<float>(V);
  const float b = (1.f - o.eps) * w_y;
  const float a = b + (o.eps > 0.f ? eps_v * W : 0.f) + (o.z_loss > 0.f ? 2.f * o.z_loss * lse : 0.f);
  const float softcap = o.softcap;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const int y_col = static_cast<int>(y);  // in [0, V): the in-row indices are 32-bit
  row_map(x, g, V, [&](int j, float v) {
    float t = 0.f;
    if (softcap > 0.f) {
      t = tanhf(v * inv_cap);
      v = softcap * t;
    }
    float d = __expf(v - lse) * a;
    if (o.eps > 0.f) d -= eps_v * (weight != nullptr ? weight[j] : 1.f);
    if (j == y_col) d -= b;
    if (softcap > 0.f) d *= 1.f - t * t;
    return d * scale;
  });
}

// Two 1024-thread row blocks per SM (at most 32 registers per thread), as kl.cu's row kernels: unbounded, ptxas gave
// the 16-bit forward 54 registers on sm_90, one block (32 warps) per SM, stalled at every block reduction. Bounded,
// it spilled 20 bytes until the in-row indices (row_read, row_map, the target's column) became 32-bit.
constexpr int kMinFwdBlocksPerSM = 2;

// One block per row: loss, lse and, when grad != nullptr, grad = (*grad_scale) * dloss/dx.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads, kMinFwdBlocksPerSM)
    cross_entropy_fwd_kernel(const T* logits, int64_t row_stride, int64_t V,
                             const int64_t* __restrict__ target, const float* __restrict__ weight,
                             const float* __restrict__ grad_scale, Options o, float* __restrict__ loss,
                             float* __restrict__ lse_out, T* grad) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * row_stride;
  const float softcap = o.softcap;
  const float inv_cap = softcap > 0.f ? 1.f / softcap : 0.f;
  const bool smooth = o.eps > 0.f;
  const int64_t y = target[row];
  if (y == o.ignore_index) {  // block-uniform: padding / prompt rows are never read (lse unused: 0)
    if (threadIdx.x == 0) {
      loss[row] = 0.f;
      lse_out[row] = 0.f;
    }
    if (grad != nullptr) row_fill(grad + row * V, V, 0.f);
    return;
  }

  // The target's logit, read before the block reductions below (each ends in __syncthreads): grad may
  // be the logits themselves, and sweep 2 may overwrite x[y] as soon as a thread gets there.
  const bool in_range = y >= 0 && y < V;
  const float x_y_raw = threadIdx.x == 0 && in_range ? static_cast<float>(x[y]) : 0.f;

  // Sweep 1: online softmax; with label smoothing also sum_c w_c x_c and W = sum_c w_c.
  MaxSum ms{-INFINITY, 0.f};
  float sum_wx = 0.f;
  float sum_w = 0.f;
  row_read(x, V, [&](int j, float v) {
    if (softcap > 0.f) v = softcap * tanhf(v * inv_cap);
    online_add(ms, v);
    if (smooth) {
      const float w = weight != nullptr ? weight[j] : 1.f;
      sum_wx += w * v;
      sum_w += w;
    }
  });
  ms = block_allreduce(ms, CombineMaxSum{});
  const float lse = ms.m + logf(ms.s);
  float W = static_cast<float>(V);
  if (smooth) {  // block-uniform branch
    sum_wx = block_allreduce(sum_wx, Add{});
    if (weight != nullptr) W = block_allreduce(sum_w, Add{});
  }

  if (threadIdx.x == 0) {
    float l = 0.f;
    {
      if (!in_range) {
        l = __int_as_float(0x7fc00000);  // quiet NaN: out-of-range target, nothing read
      } else {
        float x_y = x_y_raw;
        if (softcap > 0.f) x_y = softcap * tanhf(x_y * inv_cap);
        const float w_y = weight != nullptr ? weight[y] : 1.f;
        l = (1.f - o.eps) * w_y * (lse - x_y);
        if (smooth) l += o.eps / static_cast<float>(V) * (W * lse - sum_wx);
        if (o.z_loss > 0.f) l += o.z_loss * lse * lse;
      }
    }
    loss[row] = l;
    lse_out[row] = lse;
  }
  if (grad == nullptr) return;
  // Sweep 2: the gradient, already scaled by the reduction (1/denominator for "mean").
  write_grad_row(x, grad + row * V, V, y, weight, W, lse, *grad_scale, o);
}

// One block per row: grad = grad_loss[row] * dloss/dx, from the lse saved by forward.
template <typename T>
__global__ void __launch_bounds__(kMaxThreads)
    cross_entropy_bwd_kernel(const float* __restrict__ grad_loss, const T* logits, int64_t row_stride,
                             int64_t V, const int64_t* __restrict__ target, const float* __restrict__ weight,
                             const float* __restrict__ lse, Options o, T* grad) {
  const int64_t row = blockIdx.x;
  const int64_t y = target[row];
  float W = static_cast<float>(V);
  const bool counted = y != o.ignore_index && y >= 0 && y < V;  // block-uniform
  if (counted && o.eps > 0.f && weight != nullptr) {
    float s = 0.f;
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) s += weight[j];
    W = block_allreduce(s, Add{});
  }
  write_grad_row(logits + row * row_stride, grad + row * V, V, y, weight, W, lse[row], grad_loss[row], o);
}

// g *= *scale, elementwise over a contiguous buffer; returns at once when *scale == 1.
template <typename T>
__global__ void scale_if_not_one_kernel(T* __restrict__ g, int64_t n, const float* __restrict__ scale) {
  const float s = *scale;
  if (s == 1.f) return;  // the usual loss.backward(): no memory traffic
  constexpr int kVec = Pack<T>::kSize;
  const int64_t start = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t head = aligned_head(g, n);
  const int64_t npack = (n - head) / kVec;
  const int64_t tail = head + npack * kVec;
  for (int64_t j = start; j < head; j += stride) g[j] = static_cast<T>(static_cast<float>(g[j]) * s);
  auto* packs = reinterpret_cast<Pack<T>*>(g + head);
  for (int64_t k = start; k < npack; k += stride) {
    Pack<T> p = packs[k];
#pragma unroll
    for (int e = 0; e < kVec; ++e) p.v[e] = static_cast<T>(static_cast<float>(p.v[e]) * s);
    packs[k] = p;
  }
  for (int64_t j = tail + start; j < n; j += stride) g[j] = static_cast<T>(static_cast<float>(g[j]) * s);
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

void check_logits(const at::Tensor& logits, const char* op) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be a CUDA tensor, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be 2-D [N, V], got shape ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16 (fp64 goes to the reference), got ", dt);
  TORCH_CHECK(logits.size(1) > 0, op, ": logits have 0 classes");
  TORCH_CHECK(logits.size(1) == 1 || logits.stride(1) == 1, op, ": logits' last dimension must have stride 1, got strides ",
              logits.strides());
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", logits.size(0), ")");
  // row_read / row_map index within a row with 32-bit ints (fewer registers: see kMinFwdBlocksPerSM)
  TORCH_CHECK(logits.size(1) <= std::numeric_limits<int32_t>::max() - kMaxThreads, op, ": too many classes (",
              logits.size(1), ")");
}

void check_vector(const at::Tensor& t, const char* op, const char* name, int64_t n, at::ScalarType dtype,
                  const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but logits are on ", like.device());
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ", t.scalar_type());
  TORCH_CHECK(t.dim() == 1 && t.size(0) == n, op, ": ", name, " must have shape [", n, "], got ", t.sizes());
}

void check_scalar(const at::Tensor& t, const char* op, const char* name, const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device(), op, ": ", name, " is on ", t.device(), " but must be on ", like.device(),
              " (it is read by the kernel)");
  TORCH_CHECK(t.scalar_type() == at::kFloat, op, ": ", name, " must be float32, got ", t.scalar_type());
  TORCH_CHECK(t.numel() == 1, op, ": ", name, " must hold one value, got shape ", t.sizes());
}

// grad_out when given (it may be the logits themselves; the kernels read each element before storing its
// gradient), else a new [N, V] tensor. The contract is csrc/_cross_entropy_grad_out.h, shared with the CPU kernels.
at::Tensor gradient_buffer(const at::Tensor& logits, const std::optional<at::Tensor>& grad_out, const char* op) {
  if (!grad_out.has_value()) return at::empty({logits.size(0), logits.size(1)}, logits.options());
  check_grad_out(logits, *grad_out, op);
  return *grad_out;
}

Options make_options(int64_t ignore_index, double label_smoothing, double z_loss, double softcap) {
  return Options{ignore_index, static_cast<float>(label_smoothing), static_cast<float>(z_loss),
                 static_cast<float>(softcap)};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> cross_entropy_fwd_cuda(
    const at::Tensor& logits, const at::Tensor& target, const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& grad_scale, int64_t ignore_index, double label_smoothing, double z_loss,
    double softcap, const std::optional<at::Tensor>& grad_out) {
  constexpr const char* op = "fastft::cross_entropy_fwd_kernel (CUDA)";
  check_logits(logits, op);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  check_vector(target, op, "target", N, at::kLong, logits);
  const at::Tensor t = target.contiguous();
  at::Tensor w;
  if (weight.has_value() && weight->defined()) {
    check_vector(*weight, op, "weight", V, at::kFloat, logits);
    w = weight->contiguous();
  }
  const bool want_grad = grad_scale.has_value() && grad_scale->defined();
  if (want_grad) check_scalar(*grad_scale, op, "grad_scale", logits);
  TORCH_CHECK(want_grad || !grad_out.has_value(), op, ": grad_out is the gradient's buffer; it needs grad_scale");

  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor loss = at::empty({N}, f32);
  at::Tensor lse = at::empty({N}, f32);
  at::Tensor grad = want_grad ? gradient_buffer(logits, grad_out, op) : at::empty({0}, logits.options());
  // With grad_out the gradient is there; the third output stays a distinct (empty) tensor.
  at::Tensor grad_result = grad_out.has_value() ? at::empty({0}, logits.options()) : grad;
  if (N == 0) return {loss, lse, grad_result};

  const Options o = make_options(ignore_index, label_smoothing, z_loss, softcap);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTFT_ROWS_DISPATCH(logits.scalar_type(), "cross_entropy_fwd_cuda", [&] {
    cross_entropy_fwd_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0, stream>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), V, t.const_data_ptr<int64_t>(),
        w.defined() ? w.const_data_ptr<float>() : nullptr,
        want_grad ? grad_scale->const_data_ptr<float>() : nullptr, o, loss.mutable_data_ptr<float>(),
        lse.mutable_data_ptr<float>(), want_grad ? grad.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {loss, lse, grad_result};
}

at::Tensor cross_entropy_bwd_cuda(const at::Tensor& grad_loss, const at::Tensor& logits, const at::Tensor& target,
                                  const std::optional<at::Tensor>& weight, const at::Tensor& lse, int64_t ignore_index,
                                  double label_smoothing, double z_loss, double softcap,
                                  const std::optional<at::Tensor>& grad_out) {
  constexpr const char* op = "fastft::cross_entropy_bwd_kernel (CUDA)";
  check_logits(logits, op);
  const int64_t N = logits.size(0);
  const int64_t V = logits.size(1);
  check_vector(grad_loss, op, "grad_loss", N, at::kFloat, logits);
  check_vector(target, op, "target", N, at::kLong, logits);
  check_vector(lse, op, "lse", N, at::kFloat, logits);
  const at::Tensor gl = grad_loss.contiguous();
  const at::Tensor t = target.contiguous();
  const at::Tensor l = lse.contiguous();
  at::Tensor w;
  if (weight.has_value() && weight->defined()) {
    check_vector(*weight, op, "weight", V, at::kFloat, logits);
    w = weight->contiguous();
  }

  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad = gradient_buffer(logits, grad_out, op);
  at::Tensor grad_result = grad_out.has_value() ? at::empty({0}, logits.options()) : grad;
  if (N == 0) return grad_result;

  const Options o = make_options(ignore_index, label_smoothing, z_loss, softcap);
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  FASTFT_ROWS_DISPATCH(logits.scalar_type(), "cross_entropy_bwd_cuda", [&] {
    cross_entropy_bwd_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0, stream>>>(
        gl.const_data_ptr<float>(), logits.const_data_ptr<scalar_t>(), logits.stride(0), V,
        t.const_data_ptr<int64_t>(), w.defined() ? w.const_data_ptr<float>() : nullptr, l.const_data_ptr<float>(), o,
        grad.mutable_data_ptr<scalar_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return grad_result;
}

void scale_if_not_one_cuda_(at::Tensor& grad, const at::Tensor& scale) {  // at::Tensor&: the schema's Tensor(a!), as on the CPU
  constexpr const char* op = "fastft::scale_if_not_one_kernel_ (CUDA)";
  TORCH_CHECK(grad.is_cuda(), op, ": grad must be a CUDA tensor, got one on ", grad.device());
  check_scalar(scale, op, "scale", grad);
  const auto dt = grad.scalar_type();
  const c10::cuda::CUDAGuard guard(grad.device());
  if (!grad.is_contiguous() || !(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16)) {
    grad.mul_(scale.reshape({}));  // not the fused gradient buffer: plain multiply (still no host sync)
    return;
  }
  const int64_t n = grad.numel();
  if (n == 0) return;
  constexpr int kThreads = 256;
  FASTFT_ROWS_DISPATCH(dt, "scale_if_not_one_cuda_", [&] {
    constexpr int64_t per_block = kThreads * Pack<scalar_t>::kSize;
    const int64_t blocks = std::min<int64_t>((n + per_block - 1) / per_block, 8192);  // grid-stride beyond
    scale_if_not_one_kernel<scalar_t><<<static_cast<unsigned>(blocks), kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad.mutable_data_ptr<scalar_t>(), n, scale.const_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("cross_entropy_fwd_kernel", &fastft::cross_entropy_fwd_cuda);
  m.impl("cross_entropy_bwd_kernel", &fastft::cross_entropy_bwd_cuda);
  m.impl("scale_if_not_one_kernel_", &fastft::scale_if_not_one_cuda_);
}
