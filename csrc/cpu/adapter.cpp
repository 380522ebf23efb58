// Bottleneck-adapter CPU epilogues (the "cpp" backend of fastft.ops.adapter).
//
// The adapter is y = x + scale * (h W_up^T + b_up), h = dropout(act(pre)), pre = x W_down^T + b_down.
// The GEMMs run in BLAS (fastft/ops/adapter.py); these kernels are the element-wise work between them,
// on the [N, r] bottleneck only (r = 64 typically), one pass each:
//   forward:  h = act(pre) * keep / (1 - p), written into an [N, r + 1] buffer whose last column is 1 when the
//             up-projection has a bias, so that one GEMM against [W_up | b_up] adds bias and residual at once.
//   backward: grad_pre = grad_scale * grad_h * act'(pre) * keep / (1 - p), and h again (same layout) for the
//             weight gradient of the up-projection. Neither the mask nor h is stored between the passes.
// Dropout mask: a counter-based hash of (seed, flat element index), the same function in the reference
// (fastft/reference/adapter.py) and the Triton kernels (kernels/adapter.py), so backward regenerates the mask
// and every backend drops the same elements. Element i*r + j is dropped when hash >> 8 < drop_threshold,
// i.e. with probability drop_threshold / 2^24; the keep scale is 2^24 / (2^24 - drop_threshold).
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <cstdint>
#include <type_traits>
#include <vector>

namespace fastft {
namespace {

using at::vec::Vectorized;

enum Activation : int64_t { kRelu = 0, kGelu = 1, kGeluTanh = 2, kSilu = 3 };
constexpr int64_t kDropBits = 24;  // the hash's top 24 bits are compared with drop_threshold

// MurmurHash3's 32-bit finalizer: a bijection with full avalanche.
inline uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x85EBCA6Bu;
  h ^= h >> 13;
  h *= 0xC2B2AE35u;
  h ^= h >> 16;
  return h;
}

// 24 random bits for flat element `index` under `seed` (two rounds: the low and the high word of both).
inline uint32_t dropout_bits(uint64_t seed, uint64_t index) {
  const uint32_t seed_lo = static_cast<uint32_t>(seed), seed_hi = static_cast<uint32_t>(seed >> 32);
  const uint32_t idx_lo = static_cast<uint32_t>(index), idx_hi = static_cast<uint32_t>(index >> 32);
  uint32_t h = mix32(idx_lo ^ seed_lo);
  h = mix32(h ^ seed_hi ^ (idx_hi * 0x9E3779B1u));
  return h >> (32 - kDropBits);
}

// keep[j] = keep_scale or 0 for the r elements of row `row` (a plain loop the compiler vectorizes).
template <typename acc>
void dropout_row(acc* keep, uint64_t seed, int64_t row, int64_t r, uint32_t threshold, acc keep_scale) {
  const uint64_t base = static_cast<uint64_t>(row) * static_cast<uint64_t>(r);
  for (int64_t j = 0; j < r; ++j) {
    keep[j] = dropout_bits(seed, base + static_cast<uint64_t>(j)) >= threshold ? keep_scale : acc(0);
  }
}

template <typename acc>
struct Act {
  using Vec = Vectorized<acc>;
  static constexpr double kInvSqrt2 = 0.70710678118654752440;
  static constexpr double kInvSqrt2Pi = 0.39894228040143267794;
  static constexpr double kSqrt2OverPi = 0.79788456080286535588;
  static constexpr double kGeluC = 0.044715;

  static Vec sigmoid(Vec p) { return Vec(acc(1)) / (Vec(acc(1)) + p.neg().exp()); }

  // act(p); with d != nullptr also *d = act'(p).
  static Vec apply(int64_t kind, Vec p, Vec* d) {
    const Vec zero(acc(0)), one(acc(1)), half(acc(0.5));
    switch (kind) {
      case kRelu: {
        // maximum() propagates NaN, as torch.relu does; the derivative is 0 there, as in torch.
        if (d) *d = Vec::blendv(zero, one, p > zero);
        return at::vec::maximum(p, zero);
      }
      case kGelu: {
        const Vec cdf = half * (one + (p * Vec(acc(kInvSqrt2))).erf());
        if (d) *d = cdf + p * Vec(acc(kInvSqrt2Pi)) * (p * p * Vec(acc(-0.5))).exp();
        return p * cdf;
      }
      case kGeluTanh: {
        const Vec p2 = p * p;
        const Vec t = (Vec(acc(kSqrt2OverPi)) * p * (one + Vec(acc(kGeluC)) * p2)).tanh();
        if (d) {
          const Vec inner_d = Vec(acc(kSqrt2OverPi)) * (one + Vec(acc(3 * kGeluC)) * p2);
          *d = half * (one + t) + half * p * (one - t * t) * inner_d;
        }
        return half * p * (one + t);
      }
      default: {  // kSilu
        const Vec s = sigmoid(p);
        if (d) *d = s * (one + p * (one - s));
        return p * s;
      }
    }
  }
};

// The [N, r] bottleneck is walked row by row: a row is loaded into `acc` precision, the activation (and its
// derivative) is computed in Vectorized<acc> chunks, and the result is stored with an optional ones column.
template <typename scalar_t, typename acc>
void load_row(acc* dst, const scalar_t* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<acc>(src[j]);
}

template <typename scalar_t, typename acc>
void store_row(scalar_t* dst, const acc* src, int64_t n) {
  for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
}

struct DropoutSpec {
  bool on;
  uint64_t seed;
  uint32_t threshold;
  double keep_scale;
};

DropoutSpec dropout_spec(const at::Tensor& seed, int64_t drop_threshold) {
  TORCH_CHECK(drop_threshold >= 0 && drop_threshold < (int64_t(1) << kDropBits),
              "adapter: drop_threshold must be in [0, 2^24), got ", drop_threshold);
  DropoutSpec s{drop_threshold > 0, 0, static_cast<uint32_t>(drop_threshold), 1.0};
  if (s.on) {
    TORCH_CHECK(seed.numel() == 1 && seed.scalar_type() == at::kLong && seed.device().is_cpu(),
                "adapter: seed must be a one-element int64 CPU tensor");
    s.seed = static_cast<uint64_t>(seed.item<int64_t>());
    s.keep_scale = double(int64_t(1) << kDropBits) / double((int64_t(1) << kDropBits) - drop_threshold);
  }
  return s;
}

void check_bottleneck(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.dim() == 2, "adapter: ", name, " must be [N, r], got ", t.sizes());
  TORCH_CHECK(t.is_contiguous(), "adapter: ", name, " must be contiguous");
}

template <typename acc>
struct RowScratch {
  std::vector<acc> buf;
  acc* get(int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  }
};

at::Tensor adapter_act_dropout_fwd_cpu(const at::Tensor& pre, const at::Tensor& seed, int64_t activation,
                                       int64_t drop_threshold, bool append_ones) {
  check_bottleneck(pre, "pre");
  TORCH_CHECK(activation >= kRelu && activation <= kSilu, "adapter: unknown activation code ", activation);
  const int64_t N = pre.size(0), r = pre.size(1), width = r + (append_ones ? 1 : 0);
  at::Tensor h = at::empty({N, width}, pre.options());
  const DropoutSpec drop = dropout_spec(seed, drop_threshold);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adapter_act_dropout_fwd_cpu", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using Vec = Vectorized<acc>;
    const scalar_t* pre0 = pre.data_ptr<scalar_t>();
    scalar_t* h0 = h.data_ptr<scalar_t>();
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      RowScratch<acc> scratch;
      acc* p = scratch.get(3 * r);
      acc* out = p + r;
      acc* keep = p + 2 * r;
      for (int64_t i = begin; i < end; ++i) {
        load_row(p, pre0 + i * r, r);
        if (drop.on) dropout_row(keep, drop.seed, i, r, drop.threshold, static_cast<acc>(drop.keep_scale));
        int64_t j = 0;
        for (; j < r; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), r - j);
          Vec a = Act<acc>::apply(activation, Vec::loadu(p + j, n), nullptr);
          if (drop.on) a = a * Vec::loadu(keep + j, n);
          a.store(out + j, n);
        }
        scalar_t* hrow = h0 + i * width;
        store_row(hrow, out, r);
        if (append_ones) hrow[r] = scalar_t(1);
      }
    });
  });
  return h;
}

std::tuple<at::Tensor, at::Tensor> adapter_act_dropout_bwd_cpu(const at::Tensor& grad_h, const at::Tensor& pre,
                                                               const at::Tensor& seed, int64_t activation,
                                                               int64_t drop_threshold, double grad_scale,
                                                               bool append_ones, bool return_h) {
  check_bottleneck(pre, "pre");
  check_bottleneck(grad_h, "grad_h");
  TORCH_CHECK(grad_h.sizes() == pre.sizes(), "adapter: grad_h ", grad_h.sizes(), " must match pre ", pre.sizes());
  TORCH_CHECK(grad_h.scalar_type() == pre.scalar_type(), "adapter: grad_h and pre must share a dtype");
  TORCH_CHECK(activation >= kRelu && activation <= kSilu, "adapter: unknown activation code ", activation);
  const int64_t N = pre.size(0), r = pre.size(1), width = r + (append_ones ? 1 : 0);
  at::Tensor grad_pre = at::empty({N, r}, pre.options());
  at::Tensor h = return_h ? at::empty({N, width}, pre.options()) : at::empty({0}, pre.options());
  const DropoutSpec drop = dropout_spec(seed, drop_threshold);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, pre.scalar_type(), "adapter_act_dropout_bwd_cpu", [&] {
    using acc = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    using Vec = Vectorized<acc>;
    const scalar_t* pre0 = pre.data_ptr<scalar_t>();
    const scalar_t* gh0 = grad_h.data_ptr<scalar_t>();
    scalar_t* gp0 = grad_pre.data_ptr<scalar_t>();
    scalar_t* h0 = return_h ? h.data_ptr<scalar_t>() : nullptr;
    const Vec gscale(static_cast<acc>(grad_scale));
    at::parallel_for(0, N, 64, [&](int64_t begin, int64_t end) {
      RowScratch<acc> scratch;
      acc* p = scratch.get(5 * r);
      acc* g = p + r;
      acc* keep = p + 2 * r;
      acc* out_g = p + 3 * r;
      acc* out_h = p + 4 * r;
      for (int64_t i = begin; i < end; ++i) {
        load_row(p, pre0 + i * r, r);
        load_row(g, gh0 + i * r, r);
        if (drop.on) dropout_row(keep, drop.seed, i, r, drop.threshold, static_cast<acc>(drop.keep_scale));
        for (int64_t j = 0; j < r; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), r - j);
          Vec d;
          Vec a = Act<acc>::apply(activation, Vec::loadu(p + j, n), &d);
          Vec gd = gscale * Vec::loadu(g + j, n) * d;
          if (drop.on) {
            const Vec k = Vec::loadu(keep + j, n);
            gd = gd * k;
            a = a * k;
          }
          gd.store(out_g + j, n);
          if (return_h) a.store(out_h + j, n);
        }
        store_row(gp0 + i * r, out_g, r);
        if (return_h) {
          scalar_t* hrow = h0 + i * width;
          store_row(hrow, out_h, r);
          if (append_ones) hrow[r] = scalar_t(1);
        }
      }
    });
  });
  return {grad_pre, h};
}

}  // namespace

TORCH_LIBRARY_FRAGMENT(fastft, m) {
  m.def(
      "adapter_act_dropout_fwd_kernel(Tensor pre, Tensor seed, int activation, int drop_threshold, "
      "bool append_ones) -> Tensor");
  m.def(
      "adapter_act_dropout_bwd_kernel(Tensor grad_h, Tensor pre, Tensor seed, int activation, int drop_threshold, "
      "float grad_scale, bool append_ones, bool return_h) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("adapter_act_dropout_fwd_kernel", &adapter_act_dropout_fwd_cpu);
  m.impl("adapter_act_dropout_bwd_kernel", &adapter_act_dropout_bwd_cpu);
}

}  // namespace fastft
