// The dropout keep-mask of fastft's LoRA and adapter kernels, for C++ (csrc/cpu) and CUDA (csrc/cuda).
//
// Counter-based: element `index` (its flat row-major index into the tensor being dropped: x [N, in] for
// LoRA, the [N, r] bottleneck for the adapter) under a 64-bit `seed` gets 24 random bits
//     h = mix32(idx_lo ^ seed_lo);  h = mix32(h ^ seed_hi ^ idx_hi * kIndexHiMul);  bits = h >> (32 - kDropBits)
// (mix32 = MurmurHash3's 32-bit finalizer, a bijection with full avalanche) and is dropped when
// bits < threshold, threshold = round(p * 2^kDropBits) (round half to even, as Python's round); kept
// elements are scaled by 2^kDropBits / (2^kDropBits - threshold). Nothing is stored: backward re-draws
// the same mask from the seed. The same function, with the same constants, is written once per language:
// here, kernels/dropout.py (Triton and torch: what the ops use) and fastft/reference/dropout.py (the test
// oracle); tests/ops/test_dropout.py parses the constants out of all three and checks the masks agree.
#pragma once

#include <cmath>
#include <cstdint>

#if defined(__CUDACC__)
#define FASTFT_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define FASTFT_HOST_DEVICE inline
#endif

namespace fastft {
namespace dropout {

constexpr int kDropBits = 24;
constexpr uint32_t kMixMul1 = 0x85EBCA6Bu;
constexpr uint32_t kMixMul2 = 0xC2B2AE35u;
constexpr uint32_t kIndexHiMul = 0x9E3779B1u;

FASTFT_HOST_DEVICE uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= kMixMul1;
  h ^= h >> 13;
  h *= kMixMul2;
  h ^= h >> 16;
  return h;
}

// The kDropBits random bits of flat element `index` under `seed`.
FASTFT_HOST_DEVICE uint32_t bits(uint64_t seed, uint64_t index) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t idx_lo = static_cast<uint32_t>(index), idx_hi = static_cast<uint32_t>(index >> 32);
  uint32_t h = mix32(idx_lo ^ seed_lo);
  h = mix32(h ^ seed_hi ^ (idx_hi * kIndexHiMul));
  return h >> (32 - kDropBits);
}

FASTFT_HOST_DEVICE bool keep(uint64_t seed, uint64_t index, uint32_t threshold) {
  return bits(seed, index) >= threshold;
}

// round(p * 2^kDropBits), ties to even (std::nearbyint under the default rounding mode), as Python's round().
inline int64_t threshold_of(double p) {
  return static_cast<int64_t>(std::nearbyint(p * static_cast<double>(int64_t(1) << kDropBits)));
}

// The factor on kept elements: 2^kDropBits / (2^kDropBits - threshold).
inline double keep_scale(int64_t threshold) {
  const double full = static_cast<double>(int64_t(1) << kDropBits);
  return full / (full - static_cast<double>(threshold));
}

}  // namespace dropout
}  // namespace fastft
