// LoRA linear on CUDA (the "cuda" backend of fastft.ops.lora_linear). The schemas live in csrc/schemas.cpp;
// this file registers the CUDA implementations with the same C++ signatures. Math (as on the CPU):
//
//   y = x W^T + b + s * u B^T,   u = drop(x) A^T            (drop(x) = x * keep * keep_scale, or x)
//   g = s * dy B;  dx = dy W + drop'(g A);  dA = g^T drop(x);  dB = s dy^T u;  dW = dy^T x;  db = sum dy
//
// One C++ call per forward and per backward. The big products are cuBLAS GEMMs (bf16/fp16 with fp32
// accumulation), and the low-rank term goes into the output FIRST: y = b + s * u B^T (addmm, beta = 0 without
// a bias), then the base GEMM accumulates onto it, y.addmm_(x, W^T) with beta = 1, so the [N, out] output is the
// only [N, out] buffer. Backward likewise: dx = drop'(g A) (a GEMM, then the mask in place), then
// dx.addmm_(dy, W). Dropout is inline, never a dropped copy of x: the two thin products that read drop(x)
// (u = drop(x) A^T and dA = g^T drop(x)) are our kernels below, which apply csrc/_dropout.h's counter-based
// mask while they load x tiles, from the device-side seed (no host sync). The mask is the one every backend
// draws (reference, cpp, Triton), so forward and backward agree without storing it.
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
__global__ void dropout_kernel(const T* in, const T* add, T* out,  // in and out may alias (in place)
                               int64_t n, const int64_t* __restrict__ seed,
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

// Thin products over drop(x) [N, K] (K = in_features), r = rank, fp32 accumulation; tiles in shared memory.
constexpr int kThinRows = 32;   // rows of x per tile
constexpr int kThinK = 64;      // columns of x per tile
constexpr int kThinRanks = 16;  // ranks per block

// One element of drop(x) as the accumulation type: x[n, k] * keep * keep_scale (or x without dropout).
template <typename T, typename acc>
__device__ __forceinline__ acc dropped_value(const T* x, int64_t n, int64_t k, int64_t K, bool drop, uint64_t seed,
                                             uint32_t threshold, acc keep_scale) {
  const acc v = static_cast<acc>(x[n * K + k]);
  if (!drop) return v;
  return dropout::keep(seed, static_cast<uint64_t>(n * K + k), threshold) ? v * keep_scale : acc(0);
}

// u[n, j] = sum_k drop(x)[n, k] A[j, k]   (x [N, K] and A [r, K] contiguous; u [N, r] contiguous).
// Block: kThinRows rows x kThinRanks ranks of u, 256 threads, 2 outputs each; grid (ceil(N / 32), ceil(r / 16)).
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_down_kernel(const T* __restrict__ x, const T* __restrict__ A,
                                                             T* __restrict__ u, int64_t N, int64_t K, int64_t r,
                                                             const int64_t* __restrict__ seed, uint32_t threshold,
                                                             float keep_scale) {
  using acc = at::opmath_type<T>;
  __shared__ acc xs[kThinRows][kThinK + 1];
  __shared__ acc as[kThinRanks][kThinK + 1];
  const bool drop = threshold > 0;
  const uint64_t s = drop ? static_cast<uint64_t>(*seed) : 0;
  const int64_t row0 = static_cast<int64_t>(blockIdx.x) * kThinRows, rank0 = static_cast<int64_t>(blockIdx.y) * kThinRanks;
  const int tid = threadIdx.x;
  acc sum[2] = {acc(0), acc(0)};
  for (int64_t k0 = 0; k0 < K; k0 += kThinK) {
    for (int e = tid; e < kThinRows * kThinK; e += kThreads) {
      const int i = e / kThinK, c = e % kThinK;
      const int64_t n = row0 + i, k = k0 + c;
      xs[i][c] = (n < N && k < K) ? dropped_value<T, acc>(x, n, k, K, drop, s, threshold, acc(keep_scale)) : acc(0);
    }
    for (int e = tid; e < kThinRanks * kThinK; e += kThreads) {
      const int j = e / kThinK, c = e % kThinK;
      const int64_t rank = rank0 + j, k = k0 + c;
      as[j][c] = (rank < r && k < K) ? static_cast<acc>(A[rank * K + k]) : acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < 2; ++o) {
      const int out = tid + o * kThreads, i = out / kThinRanks, j = out % kThinRanks;
      acc t = acc(0);
#pragma unroll 16
      for (int c = 0; c < kThinK; ++c) t += xs[i][c] * as[j][c];
      sum[o] += t;
    }
    __syncthreads();
  }
#pragma unroll
  for (int o = 0; o < 2; ++o) {
    const int out = tid + o * kThreads, i = out / kThinRanks, j = out % kThinRanks;
    const int64_t n = row0 + i, rank = rank0 + j;
    if (n < N && rank < r) u[n * r + rank] = static_cast<T>(sum[o]);
  }
}

// partial[split, j, k] = sum over the split's rows n of g[n, j] drop(x)[n, k]   (g [N, r], x [N, K] contiguous;
// partial fp32 [splits, r, K]). Block: kThinRanks ranks x kThinK columns, 256 threads, 4 outputs each;
// grid (ceil(K / 64), ceil(r / 16), splits).
template <typename T>
__global__ void __launch_bounds__(kThreads) lora_down_grad_kernel(const T* __restrict__ g, const T* __restrict__ x,
                                                                  float* __restrict__ partial, int64_t N, int64_t K,
                                                                  int64_t r, int64_t rows_per_split,
                                                                  const int64_t* __restrict__ seed,
                                                                  uint32_t threshold, float keep_scale) {
  using acc = at::opmath_type<T>;
  __shared__ acc xs[kThinRows][kThinK + 1];
  __shared__ acc gs[kThinRows][kThinRanks + 1];
  const bool drop = threshold > 0;
  const uint64_t s = drop ? static_cast<uint64_t>(*seed) : 0;
  const int64_t k0 = static_cast<int64_t>(blockIdx.x) * kThinK, rank0 = static_cast<int64_t>(blockIdx.y) * kThinRanks;
  const int64_t first = static_cast<int64_t>(blockIdx.z) * rows_per_split;
  const int64_t last = first + rows_per_split < N ? first + rows_per_split : N;
  const int tid = threadIdx.x;
  acc sum[4] = {acc(0), acc(0), acc(0), acc(0)};
  for (int64_t n0 = first; n0 < last; n0 += kThinRows) {
    for (int e = tid; e < kThinRows * kThinK; e += kThreads) {
      const int i = e / kThinK, c = e % kThinK;
      const int64_t n = n0 + i, k = k0 + c;
      xs[i][c] = (n < last && k < K) ? dropped_value<T, acc>(x, n, k, K, drop, s, threshold, acc(keep_scale)) : acc(0);
    }
    for (int e = tid; e < kThinRows * kThinRanks; e += kThreads) {
      const int i = e / kThinRanks, j = e % kThinRanks;
      const int64_t n = n0 + i, rank = rank0 + j;
      gs[i][j] = (n < last && rank < r) ? static_cast<acc>(g[n * r + rank]) : acc(0);
    }
    __syncthreads();
#pragma unroll
    for (int o = 0; o < 4; ++o) {
      const int out = tid + o * kThreads, j = out / kThinK, c = out % kThinK;
      acc t = acc(0);
#pragma unroll 8
      for (int i = 0; i < kThinRows; ++i) t += gs[i][j] * xs[i][c];
      sum[o] += t;
    }
    __syncthreads();
  }
#pragma unroll
  for (int o = 0; o < 4; ++o) {
    const int out = tid + o * kThreads, j = out / kThinK, c = out % kThinK;
    const int64_t rank = rank0 + j, k = k0 + c;
    if (rank < r && k < K) partial[(static_cast<int64_t>(blockIdx.z) * r + rank) * K + k] = static_cast<float>(sum[o]);
  }
}

uint32_t drop_threshold_of(double p) { return p > 0.0 ? static_cast<uint32_t>(dropout::threshold_of(p)) : 0u; }

// u = drop(x) A^T as a new [N, r] tensor (seed: on x's device, read only with dropout).
at::Tensor down_product(const at::Tensor& x, const at::Tensor& A, const at::Tensor& seed, double p) {
  const int64_t N = x.size(0), K = x.size(1), r = A.size(0);
  at::Tensor u = at::empty({N, r}, x.options());
  if (N == 0) return u;
  const at::Tensor Ac = A.contiguous();
  const uint32_t threshold = drop_threshold_of(p);
  const float keep_scale = threshold ? static_cast<float>(dropout::keep_scale(threshold)) : 1.f;
  const dim3 grid(static_cast<unsigned>((N + kThinRows - 1) / kThinRows),
                  static_cast<unsigned>((r + kThinRanks - 1) / kThinRanks));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_down_cuda", [&] {
    lora_down_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        x.const_data_ptr<scalar_t>(), Ac.const_data_ptr<scalar_t>(), u.mutable_data_ptr<scalar_t>(), N, K, r,
        threshold ? seed.const_data_ptr<int64_t>() : nullptr, threshold, keep_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return u;
}

// g^T drop(x) as a new [r, K] tensor in x's dtype (fp32 partial sums over row splits, reduced once).
at::Tensor down_grad(const at::Tensor& g, const at::Tensor& x, const at::Tensor& seed, double p) {
  const int64_t N = x.size(0), K = x.size(1), r = g.size(1);
  if (N == 0) return at::zeros({r, K}, x.options());
  const at::Tensor gc = g.contiguous();
  const int64_t splits = std::max<int64_t>(1, std::min<int64_t>(32, (N + 511) / 512));
  const int64_t rows_per_split = (N + splits - 1) / splits;
  at::Tensor partial = at::empty({splits, r, K}, x.options().dtype(at::kFloat));
  const uint32_t threshold = drop_threshold_of(p);
  const float keep_scale = threshold ? static_cast<float>(dropout::keep_scale(threshold)) : 1.f;
  const dim3 grid(static_cast<unsigned>((K + kThinK - 1) / kThinK),
                  static_cast<unsigned>((r + kThinRanks - 1) / kThinRanks), static_cast<unsigned>(splits));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "lora_down_grad_cuda", [&] {
    lora_down_grad_kernel<scalar_t><<<grid, kThreads, 0, c10::cuda::getCurrentCUDAStream()>>>(
        gc.const_data_ptr<scalar_t>(), x.const_data_ptr<scalar_t>(), partial.mutable_data_ptr<float>(), N, K, r,
        rows_per_split, threshold ? seed.const_data_ptr<int64_t>() : nullptr, threshold, keep_scale);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return partial.sum(0).to(x.scalar_type());
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
  const at::Tensor u = down_product(xc, lora_A, drop ? device_seed(seed, xc) : at::Tensor(), dropout_p);
  // The low-rank term first (y = b + s u B^T), then the base GEMM accumulates onto it (beta = 1).
  at::Tensor y = at::empty({xc.size(0), weight.size(0)}, xc.options());
  if (bias.has_value() && bias->defined()) {
    at::addmm_out(y, *bias, u, lora_B.t(), 1.0, scaling);
  } else {
    at::addmm_out(y, y, u, lora_B.t(), 0.0, scaling);  // beta = 0: y's garbage is never read
  }
  y.addmm_(xc, weight.t(), 1.0, 1.0);
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
    dx = at::mm(g_scaled, lora_A);                                              // the low-rank term first,
    if (drop) launch_dropout(dx, at::Tensor(), dx, drop_seed, dropout_p);      // masked in place,
    dx.addmm_(dy, weight, 1.0, 1.0);                                            // then dy W onto it (beta = 1)
  }
  if (need_dA) dA = drop ? down_grad(g_scaled, xc, drop_seed, dropout_p) : at::mm(g_scaled.t(), xc);
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
