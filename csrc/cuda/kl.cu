// CUDA kernels of the KL family (the "cuda" backend of fastft.ops.full_kl / selective_log_softmax /
// linear_full_kl). The schemas live in csrc/schemas.cpp; this file registers the CUDA implementations, with the
// same C++ signatures. Contract and math: csrc/cpu/kl.cpp's header, fastft/ops/kl.py.
//
// full_kl, per counted row, a = x_p / T, b = x_r / T, pi = softmax(a), rho = softmax(b):
//   lse_p, lse_r, c = sum_j pi_j (a_j - b_j),  KL = c - lse_p + lse_r
//   dKL/dx_p,j = pi_j ((x_p,j - x_r,j) / T - c) / T     (0 where pi_j = 0: a banned token counts 0, never 0 * inf)
//   dKL/dx_r,j = (rho_j - pi_j) / T
// Forward with grad_scale writes k * dKL/dx with k = *grad_scale (read on the device: no host sync);
// backward writes grad_kl[row] * dKL/dx from the saved lse_p, lse_r and KL (c = lse_p - lse_r + KL).
// reverse_weight w > 0 (kernels instantiated with REVERSE): the row loss (1 - w) KL(pi || rho) + w KL(rho || pi);
// sweep 1 also carries D_r = sum_j f_j (x_r,j - x_p,j) under the reference's running max (c_r = D_r / (T S_r),
// KL_rev = c_r - lse_r + lse_p), and the gradients are csrc/cpu/kl.cpp's (kl_mixed_grad_row). w == 0 instantiates
// the one-direction kernels, unchanged.
// selective_log_softmax: logp = x_y / T - lse(x / T), the entropy H = log S - D / S (EntropySums), and
// d/dx_j = (g_logp ([j == y] - p_j) - g_H p_j (log p_j + H)) / T; an index outside [0, V) gives NaN (its logp and
// gradient row), one equal to ignore_index zeros (the row is not read), as on the CPU.
//
// Layout: one thread block per row, fp32 math. Sweep 1 reads both rows once with an online softmax
// (Milakov & Gimelshein 2018) that also carries D = sum_j e_j (x_p,j - x_r,j) under the running max, so
// c = D / (T S_p) needs no second read; the gradient sweep reads the rows again (in L2). Masked rows are not read.
// Every sweep moves 16 bytes per load / store (8 bf16, 4 fp32): a scalar head up to the rows' first 16-byte
// boundary, 16-byte packs, a scalar tail; element by element only when the rows of one sweep sit at different
// offsets from a 16-byte boundary (a strided view).
// Hostile values, as on every backend (kernels/kl.py's header): -inf anywhere is ordinary; NaN, +inf or an all
// -inf row give NaN (KL, logp) and NaN gradient rows; a +inf KL (policy mass on a reference -inf) a NaN policy
// gradient row and the finite (rho - pi) / T for the reference.
#include "cuda/_block_reduce.cuh"
#include "_cross_entropy_grad_out.h"

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <limits>
#include <optional>
#include <tuple>
#include <type_traits>

namespace fastft {
namespace {

using cuda_rows::block_allreduce;
using cuda_rows::combine_online;
using cuda_rows::CombineMaxSum;
using cuda_rows::MaxSum;
using cuda_rows::online_add;
using cuda_rows::threads_for_row;

// Two 1024-thread row blocks per SM (sm_90: 65,536 registers -> at most 32 per thread): with the 16-byte packs the
// bf16 forward and backward wanted 44-45 registers, i.e. one block (32 warps) per SM, stalled at every block
// reduction; ptxas fits them in 32 without spilling (checked with -Xptxas -v).
constexpr int kMinRowBlocksPerSM = 2;

// d * r, 0 where the factor r underflowed to 0 also for d = +inf (a token the reference bans, its policy mass
// negligible against a later maximum): +inf * 0 would make the KL NaN instead of the fp32 value.
__device__ __forceinline__ float scaled(float d, float r) { return r > 0.f ? d * r : 0.f; }

// The policy side of sweep 1: running max m of a, S = sum exp(a - m), D = sum exp(a - m) (x_p - x_r); with
// REVERSE also the reference side (roles swapped: max of b, D_r = sum exp(b - m_b) (x_r - x_p)).
struct PolicySums {
  float m;
  float s;
  float d;
};

__device__ __forceinline__ void policy_add(PolicySums& st, float a, float delta) {
  if (a > st.m) {
    const float r = expf(st.m - a);  // 0 for the first element (m = -inf)
    st.s = st.s * r + 1.f;
    st.d = scaled(st.d, r) + delta;
    st.m = a;
  } else if (a != -INFINITY) {  // pi_j = 0 adds nothing to S or D
    const float e = expf(a - st.m);
    st.s += e;
    st.d += e * delta;
  }
}

struct CombinePolicySums {
  __device__ __forceinline__ static PolicySums identity() { return {-INFINITY, 0.f, 0.f}; }
  __device__ __forceinline__ PolicySums operator()(PolicySums a, PolicySums b) const {
    return combine_online(a, b, [](PolicySums x, PolicySums y, float r) {
      return PolicySums{x.m, x.s + y.s * r, x.d + scaled(y.d, r)};
    });
  }
};

// Found by argument-dependent lookup from cuda_rows::warp_allreduce.
__device__ __forceinline__ PolicySums shfl_xor(PolicySums v, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, v.m, lane_mask), __shfl_xor_sync(0xffffffffu, v.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, v.d, lane_mask)};
}

// ------------------------------------------------------------------------------------------------
// 16-byte row sweeps
// ------------------------------------------------------------------------------------------------

template <typename T>
struct alignas(16) Pack {
  static constexpr int kSize = 16 / sizeof(T);
  T v[kSize];
};

__device__ __forceinline__ uintptr_t offset16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16; }

// True when every given row (nullptr: absent) sits at the same offset from a 16-byte boundary as `a`, so one
// scalar head brings all of them to alignment.
__device__ __forceinline__ bool aligned_alike(const void* a, const void* b, const void* c = nullptr,
                                              const void* d = nullptr) {
  const uintptr_t o = offset16(a);
  return offset16(b) == o && (c == nullptr || offset16(c) == o) && (d == nullptr || offset16(d) == o);
}

// Calls scalar(j) for this thread's elements (block-strided) of the head before `anchor`'s first 16-byte
// boundary and of the tail, and packed(j) for the first element j of each of its 16-byte packs in between
// (anchor + j, and every row aligned alike, are then 16-byte aligned). alike == false: all scalar.
template <typename T, typename Scalar, typename Packed>
__device__ __forceinline__ void sweep16(const T* anchor, bool alike, int64_t n, Scalar&& scalar, Packed&& packed) {
  constexpr int kVec = Pack<T>::kSize;
  int64_t head = n;
  if (alike && reinterpret_cast<uintptr_t>(anchor) % sizeof(T) == 0) {
    head = static_cast<int64_t>((16 - offset16(anchor)) % 16 / sizeof(T));
    head = head < n ? head : n;
  }
  const int64_t npack = (n - head) / kVec;
  const int64_t tail = head + npack * kVec;
  for (int64_t j = threadIdx.x; j < head; j += blockDim.x) scalar(j);
  for (int64_t k = threadIdx.x; k < npack; k += blockDim.x) packed(head + k * kVec);
  for (int64_t j = tail + threadIdx.x; j < n; j += blockDim.x) scalar(j);
}

template <typename T>
__device__ __forceinline__ Pack<T> load_pack(const T* p) {
  return *reinterpret_cast<const Pack<T>*>(p);
}

template <typename T>
__device__ __forceinline__ void zero_row(T* g, int64_t V) {
  Pack<T> zeros;
#pragma unroll
  for (int e = 0; e < Pack<T>::kSize; ++e) zeros.v[e] = T(0.f);
  sweep16(g, true, V, [&](int64_t j) { g[j] = T(0.f); },
          [&](int64_t j) { *reinterpret_cast<Pack<T>*>(g + j) = zeros; });
}

// log-sum-exp from the online (max, sum): a +inf logit has no softmax (inf / inf), so NaN, not +inf; a row with
// no finite logit gives -inf + log(0) = -inf (its KL is then 0 / 0 = NaN, its logp NaN).
__device__ __forceinline__ float lse_of(float m, float s) {
  return m == INFINITY ? __int_as_float(0x7fc00000) : m + logf(s);
}

// The gradient sweep of a row pair: grads(x_p, x_r, g_p&, g_r&) per element, stored to gp / gr (nullptr: not
// wanted) in 16-byte packs where the rows allow.
template <typename T, typename Grads>
__device__ __forceinline__ void write_grad_rows(const T* __restrict__ xp, const T* __restrict__ xr,
                                                T* __restrict__ gp, T* __restrict__ gr, int64_t V, Grads&& grads) {
  auto scalar = [&](int64_t j) {
    float g_p, g_r;
    grads(static_cast<float>(xp[j]), static_cast<float>(xr[j]), g_p, g_r);
    if (gp != nullptr) gp[j] = static_cast<T>(g_p);
    if (gr != nullptr) gr[j] = static_cast<T>(g_r);
  };
  auto packed = [&](int64_t j) {
    const Pack<T> p = load_pack(xp + j), r = load_pack(xr + j);
    Pack<T> out_p, out_r;
#pragma unroll
    for (int e = 0; e < Pack<T>::kSize; ++e) {
      float g_p, g_r;
      grads(static_cast<float>(p.v[e]), static_cast<float>(r.v[e]), g_p, g_r);
      out_p.v[e] = static_cast<T>(g_p);
      out_r.v[e] = static_cast<T>(g_r);
    }
    if (gp != nullptr) *reinterpret_cast<Pack<T>*>(gp + j) = out_p;
    if (gr != nullptr) *reinterpret_cast<Pack<T>*>(gr + j) = out_r;
  };
  sweep16(xp, aligned_alike(xp, xr, gp, gr), V, scalar, packed);
}

// gp / gr (nullptr: not wanted) = k * dKL/dx of the row (see the top), from lse_p, lse_r, c and KL. A KL that is
// NaN gives NaN rows; c = +inf (KL = +inf) a NaN policy row.
template <typename T>
__device__ __forceinline__ void kl_grad_row(const T* __restrict__ xp, const T* __restrict__ xr, T* __restrict__ gp,
                                            T* __restrict__ gr, int64_t V, float inv_t, float lse_p, float lse_r,
                                            float c, float kl, float k) {
  const float nan = __int_as_float(0x7fc00000);
  const bool policy_defined = isfinite(c), ref_defined = !isnan(kl);
  auto grads = [&](float vp, float vr, float& g_p, float& g_r) {
    const float pi = expf(vp * inv_t - lse_p);
    g_p = !policy_defined ? nan : pi == 0.f ? 0.f : k * pi * ((vp - vr) * inv_t - c);
    g_r = ref_defined ? k * (expf(vr * inv_t - lse_r) - pi) : nan;
  };
  write_grad_rows(xp, xr, gp, gr, V, grads);
}

// The weighted two-direction gradient (REVERSE, w > 0; csrc/cpu/kl.cpp's kl_mixed_grad_row):
//   g_p = k (pi ((1 - w) ((x_p - x_r) / T - c) + w) - w rho),  g_r = k (rho (w ((x_r - x_p) / T - c_r) + 1 - w) - (1 - w) pi)
// with the pi (rho) product 0 where pi (rho) is 0 and a weight-0 direction left out. Poisoned rows, per direction
// of weight > 0: a non-finite c (c_r) -> NaN policy (reference) row, a NaN KL (KL_rev) -> both rows NaN.
template <typename T>
__device__ __forceinline__ void kl_mixed_grad_row(const T* __restrict__ xp, const T* __restrict__ xr,
                                                  T* __restrict__ gp, T* __restrict__ gr, int64_t V, float inv_t,
                                                  float lse_p, float lse_r, float c, float kl, float c_r,
                                                  float kl_rev, float w, float k) {
  const float nan = __int_as_float(0x7fc00000);
  const float wf = 1.f - w;
  const bool fwd = wf > 0.f;
  const bool policy_defined = !(fwd && !isfinite(c)) && !isnan(kl_rev);
  const bool ref_defined = !(fwd && isnan(kl)) && isfinite(c_r);
  const float c_used = fwd ? c : 0.f;
  auto grads = [&](float vp, float vr, float& g_p, float& g_r) {
    const float pi = expf(vp * inv_t - lse_p), rho = expf(vr * inv_t - lse_r);
    const float inner_p = fwd ? wf * ((vp - vr) * inv_t - c_used) + w : w;
    g_p = !policy_defined ? nan : k * ((pi == 0.f ? 0.f : pi * inner_p) - w * rho);
    g_r = !ref_defined ? nan : k * ((rho == 0.f ? 0.f : rho * (w * ((vr - vp) * inv_t - c_r) + wf)) - wf * pi);
  };
  write_grad_rows(xp, xr, gp, gr, V, grads);
}

template <typename T, bool REVERSE>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads, kMinRowBlocksPerSM)
    full_kl_fwd_kernel(const T* __restrict__ policy, int64_t p_stride, const T* __restrict__ ref, int64_t r_stride,
                       int64_t V, const bool* __restrict__ mask, const float* __restrict__ grad_scale, float inv_t,
                       float w, float* __restrict__ kl, float* __restrict__ lse_p_out, float* __restrict__ lse_r_out,
                       float* __restrict__ kl_rev, T* __restrict__ grad_p, T* __restrict__ grad_r) {
  const int64_t row = blockIdx.x;
  T* gp = grad_p != nullptr ? grad_p + row * V : nullptr;
  T* gr = grad_r != nullptr ? grad_r + row * V : nullptr;
  if (mask != nullptr && !mask[row]) {  // block-uniform: a masked row is not read
    if (threadIdx.x == 0) kl[row] = lse_p_out[row] = lse_r_out[row] = 0.f;
    if (REVERSE && threadIdx.x == 0) kl_rev[row] = 0.f;
    if (gp != nullptr) zero_row(gp, V);
    if (gr != nullptr) zero_row(gr, V);
    return;
  }
  const T* xp = policy + row * p_stride;
  const T* xr = ref + row * r_stride;
  PolicySums ps = CombinePolicySums::identity();
  using RefSums = std::conditional_t<REVERSE, PolicySums, MaxSum>;
  RefSums rs{};
  if constexpr (REVERSE) {
    rs = CombinePolicySums::identity();
  } else {
    rs = MaxSum{-INFINITY, 0.f};
  }
  auto add = [&](float vp, float vr) {
    policy_add(ps, vp * inv_t, vp - vr);
    if constexpr (REVERSE) {
      policy_add(rs, vr * inv_t, vr - vp);
    } else {
      online_add(rs, vr * inv_t);
    }
  };
  sweep16(
      xp, aligned_alike(xp, xr), V, [&](int64_t j) { add(static_cast<float>(xp[j]), static_cast<float>(xr[j])); },
      [&](int64_t j) {
        const Pack<T> p = load_pack(xp + j), r = load_pack(xr + j);
#pragma unroll
        for (int e = 0; e < Pack<T>::kSize; ++e) add(static_cast<float>(p.v[e]), static_cast<float>(r.v[e]));
      });
  ps = block_allreduce(ps, CombinePolicySums{});
  if constexpr (REVERSE) {
    rs = block_allreduce(rs, CombinePolicySums{});
  } else {
    rs = block_allreduce(rs, CombineMaxSum{});
  }
  const float lse_p = lse_of(ps.m, ps.s), lse_r = lse_of(rs.m, rs.s);
  const float c = inv_t * ps.d / ps.s;
  const float kl_row = c - lse_p + lse_r;
  float c_r = 0.f, kl_rev_row = 0.f;
  if constexpr (REVERSE) {
    c_r = inv_t * rs.d / rs.s;
    kl_rev_row = c_r - lse_r + lse_p;
  }
  if (threadIdx.x == 0) {
    kl[row] = kl_row;
    lse_p_out[row] = lse_p;
    lse_r_out[row] = lse_r;
    if (REVERSE) kl_rev[row] = kl_rev_row;
  }
  if (gp != nullptr || gr != nullptr) {
    if constexpr (REVERSE) {
      kl_mixed_grad_row(xp, xr, gp, gr, V, inv_t, lse_p, lse_r, c, kl_row, c_r, kl_rev_row, w, *grad_scale * inv_t);
    } else {
      kl_grad_row(xp, xr, gp, gr, V, inv_t, lse_p, lse_r, c, kl_row, *grad_scale * inv_t);
    }
  }
}

template <typename T, bool REVERSE>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads, kMinRowBlocksPerSM)
    full_kl_bwd_kernel(const float* __restrict__ grad_kl, const T* __restrict__ policy, int64_t p_stride,
                       const T* __restrict__ ref, int64_t r_stride, int64_t V, const bool* __restrict__ mask,
                       const float* __restrict__ lse_p, const float* __restrict__ lse_r, const float* __restrict__ kl,
                       const float* __restrict__ kl_rev, float inv_t, float w, T* __restrict__ grad_p,
                       T* __restrict__ grad_r) {
  const int64_t row = blockIdx.x;
  T* gp = grad_p != nullptr ? grad_p + row * V : nullptr;
  T* gr = grad_r != nullptr ? grad_r + row * V : nullptr;
  if (mask != nullptr && !mask[row]) {
    if (gp != nullptr) zero_row(gp, V);
    if (gr != nullptr) zero_row(gr, V);
    return;
  }
  const float c = lse_p[row] - lse_r[row] + kl[row];
  if constexpr (REVERSE) {
    kl_mixed_grad_row(policy + row * p_stride, ref + row * r_stride, gp, gr, V, inv_t, lse_p[row], lse_r[row], c,
                      kl[row], lse_r[row] - lse_p[row] + kl_rev[row], kl_rev[row], w, grad_kl[row] * inv_t);
  } else {
    kl_grad_row(policy + row * p_stride, ref + row * r_stride, gp, gr, V, inv_t, lse_p[row], lse_r[row], c, kl[row],
                grad_kl[row] * inv_t);
  }
}

// Sweep 1 of selective_log_softmax: the online max m and S = sum exp(z - m) with the entropy numerator
// D = sum exp(z - m) (z - m), kept relative to the running max (H = log S - D / S then does not cancel against the
// max at large logits): when m grows to m', D' = r (D + (m - m') S) with r = exp(m - m').
struct EntropySums {
  float m;
  float s;
  float d;
};

struct CombineEntropySums {
  __device__ __forceinline__ static EntropySums identity() { return {-INFINITY, 0.f, 0.f}; }
  __device__ __forceinline__ EntropySums operator()(EntropySums a, EntropySums b) const {
    // b's D moves from b's max to a's: r (D_b + (m_b - m_a) S_b)
    return combine_online(a, b, [](EntropySums x, EntropySums y, float r) {
      return EntropySums{x.m, x.s + y.s * r, x.d + (r > 0.f ? r * (y.d + (y.m - x.m) * y.s) : 0.f)};
    });
  }
};

// One logit z = x / T: merged as the one-element state {z, 1, 0}. That covers the first element (m = -inf), -inf
// (p = 0: dropped, never 0 * -inf), NaN (r = NaN poisons S) and +inf (S = 1 at m = +inf: lse_of gives NaN).
__device__ __forceinline__ void entropy_add(EntropySums& st, float z) { st = CombineEntropySums{}(st, {z, 1.f, 0.f}); }

__device__ __forceinline__ EntropySums shfl_xor(EntropySums v, int lane_mask) {
  return {__shfl_xor_sync(0xffffffffu, v.m, lane_mask), __shfl_xor_sync(0xffffffffu, v.s, lane_mask),
          __shfl_xor_sync(0xffffffffu, v.d, lane_mask)};
}

template <typename T>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads, kMinRowBlocksPerSM)
    selective_log_softmax_fwd_kernel(const T* __restrict__ logits, int64_t stride, int64_t V,
                                     const int64_t* __restrict__ index, float inv_t, int64_t ignore_index,
                                     float* __restrict__ logp, float* __restrict__ lse_out,
                                     float* __restrict__ entropy_out) {
  const int64_t row = blockIdx.x;
  const int64_t y = index[row];
  if (y == ignore_index) {  // block-uniform: an ignored row is not read
    if (threadIdx.x == 0) logp[row] = lse_out[row] = entropy_out[row] = 0.f;
    return;
  }
  const T* x = logits + row * stride;
  EntropySums es = CombineEntropySums::identity();
  sweep16(
      x, true, V, [&](int64_t j) { entropy_add(es, static_cast<float>(x[j]) * inv_t); },
      [&](int64_t j) {
        const Pack<T> p = load_pack(x + j);
#pragma unroll
        for (int e = 0; e < Pack<T>::kSize; ++e) entropy_add(es, static_cast<float>(p.v[e]) * inv_t);
      });
  es = block_allreduce(es, CombineEntropySums{});
  if (threadIdx.x == 0) {
    const float lse = lse_of(es.m, es.s);
    lse_out[row] = lse;
    entropy_out[row] = isnan(lse) || !(es.s > 0.f) ? __int_as_float(0x7fc00000) : logf(es.s) - es.d / es.s;
    logp[row] = (y >= 0 && y < V) ? static_cast<float>(x[y]) * inv_t - lse : std::numeric_limits<float>::quiet_NaN();
  }
}

// dz_j = g_logp ([j == y] - p_j) - g_H p_j (log p_j + H), d/dx = dz / T (0 where p_j = 0). grad may be the logits
// themselves: every element is read before its gradient is stored (the packs are read whole, then written).
template <typename T>
__global__ void __launch_bounds__(cuda_rows::kMaxThreads, kMinRowBlocksPerSM)
    selective_log_softmax_bwd_kernel(const float* __restrict__ grad_logp, const float* __restrict__ grad_entropy,
                                     const T* logits, int64_t stride, int64_t V, const int64_t* __restrict__ index,
                                     const float* __restrict__ lse, const float* __restrict__ entropy, float inv_t,
                                     int64_t ignore_index, T* grad) {
  const int64_t row = blockIdx.x;
  const T* x = logits + row * stride;
  T* g = grad + row * V;
  const int64_t y = index[row];
  if (y == ignore_index) {
    zero_row(g, V);
    return;
  }
  const float l = lse[row], h = entropy[row];
  if (y < 0 || y >= V || isnan(l) || isnan(h)) {  // a row without a distribution has no gradient
    for (int64_t j = threadIdx.x; j < V; j += blockDim.x) g[j] = static_cast<T>(std::numeric_limits<float>::quiet_NaN());
    return;
  }
  const float k = grad_logp[row] * inv_t, kh = grad_entropy != nullptr ? grad_entropy[row] * inv_t : 0.f;
  auto grad_at = [&](int64_t j, float v) {
    const float logp = v * inv_t - l, p = expf(logp);
    const float d = p > 0.f ? p * (k + kh * (logp + h)) : 0.f;
    return static_cast<T>(j == y ? k - d : -d);
  };
  sweep16(
      x, aligned_alike(x, g), V, [&](int64_t j) { g[j] = grad_at(j, static_cast<float>(x[j])); },
      [&](int64_t j) {
        const Pack<T> p = load_pack(x + j);
        Pack<T> out;
#pragma unroll
        for (int e = 0; e < Pack<T>::kSize; ++e) out.v[e] = grad_at(j + e, static_cast<float>(p.v[e]));
        *reinterpret_cast<Pack<T>*>(g + j) = out;
      });
}

// ------------------------------------------------------------------------------------------------
// Host side
// ------------------------------------------------------------------------------------------------

void check_rows(const char* op, const at::Tensor& logits) {
  TORCH_CHECK(logits.is_cuda(), op, ": logits must be CUDA tensors, got one on ", logits.device());
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  const auto dt = logits.scalar_type();
  TORCH_CHECK(dt == at::kFloat || dt == at::kHalf || dt == at::kBFloat16, op,
              ": logits must be float32, float16 or bfloat16 (fp64 goes to the reference or cpp backend), got ", dt);
  TORCH_CHECK(logits.size(0) == 0 || logits.size(1) <= 1 || logits.stride(1) == 1, op,
              ": the vocabulary dimension must be contiguous");
  TORCH_CHECK(logits.size(0) <= std::numeric_limits<int32_t>::max(), op, ": too many rows (", logits.size(0), ")");
}

void check_pair(const char* op, const at::Tensor& policy, const at::Tensor& ref, const std::optional<at::Tensor>& mask) {
  check_rows(op, policy);
  check_rows(op, ref);
  TORCH_CHECK(policy.sizes() == ref.sizes(), op, ": policy and reference logits differ in shape: ", policy.sizes(),
              " vs ", ref.sizes());
  TORCH_CHECK(policy.scalar_type() == ref.scalar_type(), op, ": policy and reference logits differ in dtype");
  TORCH_CHECK(policy.device() == ref.device(), op, ": policy and reference logits are on different devices");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == policy.size(0) &&
                    mask->is_contiguous() && mask->device() == policy.device(),
                op, ": mask must be a contiguous bool [N] tensor on the logits' device");
  }
}

void check_row_vector(const char* op, const char* name, const at::Tensor& t, int64_t n, at::ScalarType dtype,
                      const at::Tensor& like) {
  TORCH_CHECK(t.device() == like.device() && t.scalar_type() == dtype && t.numel() == n && t.is_contiguous(), op,
              ": ", name, " must be a contiguous [", n, "] ", dtype, " tensor on ", like.device(), ", got ", t.sizes(),
              " ", t.scalar_type(), " on ", t.device());
}

std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> full_kl_fwd_cuda(
    const at::Tensor& policy, const at::Tensor& ref, const std::optional<at::Tensor>& mask,
    const std::optional<at::Tensor>& grad_scale, double temperature, bool grad_policy, bool grad_ref,
    double reverse_weight) {
  constexpr const char* op = "fastft::full_kl_fwd_kernel (CUDA)";
  check_pair(op, policy, ref, mask);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(reverse_weight >= 0.0 && reverse_weight <= 1.0, op, ": reverse_weight must be in [0, 1], got ",
              reverse_weight);
  const bool mixed = reverse_weight > 0.0;
  const bool fused = grad_scale.has_value();
  if (fused) check_row_vector(op, "grad_scale", *grad_scale, 1, at::kFloat, policy);
  const bool want_p = fused && grad_policy, want_r = fused && grad_ref;
  const int64_t N = policy.size(0), V = policy.size(1);
  const c10::cuda::CUDAGuard guard(policy.device());
  const auto f32 = policy.options().dtype(at::kFloat);
  at::Tensor kl = at::empty({N}, f32), lse_p = at::empty({N}, f32), lse_r = at::empty({N}, f32);
  at::Tensor kl_rev = at::empty({mixed ? N : 0}, f32);
  // Distinct empties: a custom op's outputs must not alias each other.
  at::Tensor gp = want_p ? at::empty({N, V}, policy.options()) : at::empty({0}, policy.options());
  at::Tensor gr = want_r ? at::empty({N, V}, policy.options()) : at::empty({0}, policy.options());
  if (N == 0) return {kl, lse_p, lse_r, kl_rev, gp, gr};
  const float inv_t = static_cast<float>(1.0 / temperature);
  FASTFT_ROWS_DISPATCH(policy.scalar_type(), "full_kl_fwd_cuda", [&] {
    auto kernel = mixed ? full_kl_fwd_kernel<scalar_t, true> : full_kl_fwd_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0, c10::cuda::getCurrentCUDAStream()>>>(
        policy.const_data_ptr<scalar_t>(), policy.stride(0), ref.const_data_ptr<scalar_t>(), ref.stride(0), V,
        mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
        fused ? grad_scale->const_data_ptr<float>() : nullptr, inv_t, static_cast<float>(reverse_weight),
        kl.mutable_data_ptr<float>(), lse_p.mutable_data_ptr<float>(), lse_r.mutable_data_ptr<float>(),
        mixed ? kl_rev.mutable_data_ptr<float>() : nullptr, want_p ? gp.mutable_data_ptr<scalar_t>() : nullptr,
        want_r ? gr.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {kl, lse_p, lse_r, kl_rev, gp, gr};
}

std::tuple<at::Tensor, at::Tensor> full_kl_bwd_cuda(const at::Tensor& grad_kl, const at::Tensor& policy,
                                                    const at::Tensor& ref, const std::optional<at::Tensor>& mask,
                                                    const at::Tensor& lse_p, const at::Tensor& lse_r,
                                                    const at::Tensor& kl, double temperature, bool grad_policy,
                                                    bool grad_ref, const std::optional<at::Tensor>& kl_rev,
                                                    double reverse_weight) {
  constexpr const char* op = "fastft::full_kl_bwd_kernel (CUDA)";
  check_pair(op, policy, ref, mask);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  TORCH_CHECK(reverse_weight >= 0.0 && reverse_weight <= 1.0, op, ": reverse_weight must be in [0, 1], got ",
              reverse_weight);
  const bool mixed = reverse_weight > 0.0;
  TORCH_CHECK(!mixed || kl_rev.has_value(), op, ": reverse_weight > 0 needs forward's kl_rev");
  const int64_t N = policy.size(0), V = policy.size(1);
  check_row_vector(op, "grad_kl", grad_kl, N, at::kFloat, policy);
  check_row_vector(op, "lse_p", lse_p, N, at::kFloat, policy);
  check_row_vector(op, "lse_r", lse_r, N, at::kFloat, policy);
  check_row_vector(op, "kl", kl, N, at::kFloat, policy);
  if (mixed) check_row_vector(op, "kl_rev", *kl_rev, N, at::kFloat, policy);
  const c10::cuda::CUDAGuard guard(policy.device());
  at::Tensor gp = grad_policy ? at::empty({N, V}, policy.options()) : at::empty({0}, policy.options());
  at::Tensor gr = grad_ref ? at::empty({N, V}, policy.options()) : at::empty({0}, policy.options());
  if (N == 0 || !(grad_policy || grad_ref)) return {gp, gr};
  FASTFT_ROWS_DISPATCH(policy.scalar_type(), "full_kl_bwd_cuda", [&] {
    auto kernel = mixed ? full_kl_bwd_kernel<scalar_t, true> : full_kl_bwd_kernel<scalar_t, false>;
    kernel<<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0, c10::cuda::getCurrentCUDAStream()>>>(
        grad_kl.const_data_ptr<float>(), policy.const_data_ptr<scalar_t>(), policy.stride(0),
        ref.const_data_ptr<scalar_t>(), ref.stride(0), V, mask.has_value() ? mask->const_data_ptr<bool>() : nullptr,
        lse_p.const_data_ptr<float>(), lse_r.const_data_ptr<float>(), kl.const_data_ptr<float>(),
        mixed ? kl_rev->const_data_ptr<float>() : nullptr, static_cast<float>(1.0 / temperature),
        static_cast<float>(reverse_weight), grad_policy ? gp.mutable_data_ptr<scalar_t>() : nullptr,
        grad_ref ? gr.mutable_data_ptr<scalar_t>() : nullptr);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {gp, gr};
}

void check_index(const char* op, const at::Tensor& logits, const at::Tensor& index) {
  check_rows(op, logits);
  TORCH_CHECK(index.dim() == 1 && index.size(0) == logits.size(0) && index.scalar_type() == at::kLong &&
                  index.is_contiguous() && index.device() == logits.device(),
              op, ": index must be a contiguous int64 [N] tensor on the logits' device");
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_log_softmax_fwd_cuda(const at::Tensor& logits,
                                                                              const at::Tensor& index,
                                                                              double temperature,
                                                                              int64_t ignore_index) {
  constexpr const char* op = "fastft::selective_log_softmax_fwd_kernel (CUDA)";
  check_index(op, logits, index);
  TORCH_CHECK(temperature > 0, op, ": temperature must be > 0");
  const int64_t N = logits.size(0), V = logits.size(1);
  const c10::cuda::CUDAGuard guard(logits.device());
  const auto f32 = logits.options().dtype(at::kFloat);
  at::Tensor logp = at::empty({N}, f32), lse = at::empty({N}, f32), entropy = at::empty({N}, f32);
  if (N == 0) return {logp, lse, entropy};
  TORCH_CHECK(V > 0, op, ": logits have 0 classes");
  FASTFT_ROWS_DISPATCH(logits.scalar_type(), "selective_log_softmax_fwd_cuda", [&] {
    selective_log_softmax_fwd_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0,
                                                 c10::cuda::getCurrentCUDAStream()>>>(
        logits.const_data_ptr<scalar_t>(), logits.stride(0), V, index.const_data_ptr<int64_t>(),
        static_cast<float>(1.0 / temperature), ignore_index, logp.mutable_data_ptr<float>(),
        lse.mutable_data_ptr<float>(), entropy.mutable_data_ptr<float>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return {logp, lse, entropy};
}

// grad_out: as the cross-entropy kernels' (csrc/_cross_entropy_grad_out.h); it may be the logits themselves.
at::Tensor selective_log_softmax_bwd_cuda(const at::Tensor& grad_logp, const std::optional<at::Tensor>& grad_entropy,
                                          const at::Tensor& logits, const at::Tensor& index, const at::Tensor& lse,
                                          const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                          const std::optional<at::Tensor>& grad_out) {
  constexpr const char* op = "fastft::selective_log_softmax_bwd_kernel (CUDA)";
  check_index(op, logits, index);
  const int64_t N = logits.size(0), V = logits.size(1);
  check_row_vector(op, "grad_logp", grad_logp, N, at::kFloat, logits);
  if (grad_entropy.has_value()) check_row_vector(op, "grad_entropy", *grad_entropy, N, at::kFloat, logits);
  check_row_vector(op, "lse", lse, N, at::kFloat, logits);
  check_row_vector(op, "entropy", entropy, N, at::kFloat, logits);
  const c10::cuda::CUDAGuard guard(logits.device());
  at::Tensor grad;
  if (grad_out.has_value()) {
    check_grad_out(logits, *grad_out, op);
    grad = *grad_out;
  } else {
    grad = at::empty({N, V}, logits.options());
  }
  if (N > 0 && V > 0) {
    FASTFT_ROWS_DISPATCH(logits.scalar_type(), "selective_log_softmax_bwd_cuda", [&] {
      selective_log_softmax_bwd_kernel<scalar_t><<<static_cast<unsigned>(N), threads_for_row(V, sizeof(scalar_t)), 0,
                                                   c10::cuda::getCurrentCUDAStream()>>>(
          grad_logp.const_data_ptr<float>(),
          grad_entropy.has_value() ? grad_entropy->const_data_ptr<float>() : nullptr,
          logits.const_data_ptr<scalar_t>(), logits.stride(0), V, index.const_data_ptr<int64_t>(),
          lse.const_data_ptr<float>(), entropy.const_data_ptr<float>(), static_cast<float>(1.0 / temperature),
          ignore_index, grad.mutable_data_ptr<scalar_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
    });
  }
  if (grad_out.has_value()) return at::empty({0}, logits.options());
  return grad;
}

}  // namespace
}  // namespace fastft

TORCH_LIBRARY_IMPL(fastft, CUDA, m) {
  m.impl("full_kl_fwd_kernel", &fastft::full_kl_fwd_cuda);
  m.impl("full_kl_bwd_kernel", &fastft::full_kl_bwd_cuda);
  m.impl("selective_log_softmax_fwd_kernel", &fastft::selective_log_softmax_fwd_cuda);
  m.impl("selective_log_softmax_bwd_kernel", &fastft::selective_log_softmax_bwd_cuda);
}
