// Row helpers shared by the softmax-family CPU kernels (cross_entropy.cpp, kl.cpp): one row of
// logits at a time, vectorized with at::vec, accumulation in fp32 (fp64 for fp64 input).
// Include "cpu/_vec.h" before this header (it sets the Vectorized ISA).
#pragma once

#include <ATen/ATen.h>

#if defined(__x86_64__) || defined(_M_X64)
#include <immintrin.h>
#define FASTFT_STREAM_FENCE() _mm_sfence()
#else
#define FASTFT_STREAM_FENCE() ((void)0)
#endif

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

namespace fastft {
namespace row_softmax {

using at::vec::Vectorized;

template <typename scalar_t>
using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;

// The (softcapped) row in accumulation precision. Aliases the input when no conversion is needed.
template <typename scalar_t, typename acc>
const acc* row_values(const scalar_t* x, int64_t V, acc softcap, acc* scratch) {
  using Vec = Vectorized<acc>;
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (softcap == acc(0)) return x;
    const Vec cap(softcap), inv(acc(1) / softcap);
    int64_t j = 0;
    for (; j + Vec::size() <= V; j += Vec::size()) (cap * (Vec::loadu(x + j) * inv).tanh()).store(scratch + j);
    if (j < V) (cap * (Vec::loadu(x + j, V - j) * inv).tanh()).store(scratch + j, V - j);
    return scratch;
  } else {
    for (int64_t j = 0; j < V; ++j) scratch[j] = static_cast<acc>(x[j]);
    if (softcap != acc(0)) return row_values<acc, acc>(scratch, V, softcap, scratch);
    return scratch;
  }
}

template <typename acc>
acc row_max(const acc* xs, int64_t V) {
  using Vec = Vectorized<acc>;
  Vec m(-std::numeric_limits<acc>::infinity());
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) m = at::vec::maximum(m, Vec::loadu(xs + j));
  acc out = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, m);
  for (; j < V; ++j) out = std::max(out, xs[j]);
  return out;
}

// sum_j w_j x_j (w == nullptr: sum_j x_j)
template <typename acc>
acc row_weighted_sum(const acc* xs, const acc* w, int64_t V) {
  using Vec = Vectorized<acc>;
  Vec s(acc(0));
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    Vec v = Vec::loadu(xs + j);
    s = w ? at::vec::fmadd(v, Vec::loadu(w + j), s) : s + v;
  }
  acc out = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, s);
  for (; j < V; ++j) out += w ? w[j] * xs[j] : xs[j];
  return out;
}

// sum_j exp(scale * x_j - shift); stores each exp into e_out when given. scale = 1 is exact
// (fma(x, 1, -shift) rounds like x - shift); a temperature passes scale = 1 / T.
template <typename acc>
acc row_sum_exp(const acc* xs, int64_t V, acc shift, acc* e_out, acc scale = acc(1)) {
  using Vec = Vectorized<acc>;
  const Vec sh(-shift), sc(scale);
  Vec s(acc(0));
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) {
    Vec e = at::vec::fmadd(Vec::loadu(xs + j), sc, sh).exp_u20();
    if (e_out) e.store(e_out + j);
    s = s + e;
  }
  acc out = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, s);
  for (; j < V; ++j) {
    acc e = std::exp(std::fma(xs[j], scale, -shift));
    if (e_out) e_out[j] = e;
    out += e;
  }
  return out;
}

template <typename scalar_t, typename acc>
void store_row(scalar_t* dst, const acc* src, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    if (dst != src) std::memcpy(dst, src, n * sizeof(acc));
  } else {
    for (int64_t j = 0; j < n; ++j) dst[j] = static_cast<scalar_t>(src[j]);
  }
}

template <typename scalar_t>
void fill_row(scalar_t* out, int64_t V, double value) {
  std::fill(out, out + V, static_cast<scalar_t>(value));
}

// Per-thread scratch rows (grown on demand, reused across the rows a thread handles).
template <typename acc>
struct Scratch {
  std::vector<acc> buf;
  acc* get(int64_t n) {
    if (static_cast<int64_t>(buf.size()) < n) buf.resize(n);
    return buf.data();
  }
};

// Store one vector of n lanes to p. Full, aligned fp32 vectors bypass the cache (non-temporal):
// the gradient is written once and not read again by this kernel, so streaming it saves the
// read-for-ownership of every destination line (a third of the memory traffic).
template <typename acc>
inline void store_streaming(acc* p, const Vectorized<acc>& v, int64_t n) {
#if defined(CPU_CAPABILITY_AVX512)
  if constexpr (std::is_same_v<acc, float>) {
    if (n == Vectorized<acc>::size() && (reinterpret_cast<uintptr_t>(p) & 63) == 0) {
      _mm512_stream_ps(p, v);
      return;
    }
  }
#elif defined(CPU_CAPABILITY_AVX2)
  if constexpr (std::is_same_v<acc, float>) {
    if (n == Vectorized<acc>::size() && (reinterpret_cast<uintptr_t>(p) & 31) == 0) {
      _mm256_stream_ps(p, v);
      return;
    }
  }
#endif
  v.store(p, n);
}

// Calls chunk(j, n) over [0, V) in pieces of at most one vector, the first ones short enough to bring
// dst + j to a 64-byte boundary so the streaming stores apply to every later piece. The head can be
// longer than one vector (up to 15 floats before a 64-byte boundary, an AVX2 vector holds 8), so it is
// cut into vectors too: a longer piece would overrun Vectorized's partial loads and stores.
template <typename acc, typename F>
inline void for_each_chunk_aligned(const acc* dst, int64_t V, F&& chunk) {
  using Vec = Vectorized<acc>;
  int64_t j = 0;
  const int64_t misalign = static_cast<int64_t>((reinterpret_cast<uintptr_t>(dst) & 63) / sizeof(acc));
  if (misalign != 0) {
    // The head can be longer than one vector (AVX2: up to 15 floats, 8 lanes): chunk(j, n) takes n <= Vec::size().
    const int64_t head = std::min<int64_t>(V, static_cast<int64_t>(64 / sizeof(acc)) - misalign);
    for (; j < head; j += Vec::size()) chunk(j, std::min<int64_t>(Vec::size(), head - j));
    j = head;
  }
  for (; j + Vec::size() <= V; j += Vec::size()) chunk(j, Vec::size());
  if (j < V) chunk(j, V - j);
}

// Calls chunk(j, n) over [0, V): whole vectors, then one partial tail (n < Vec::size()) when V is not a multiple.
template <typename acc, typename F>
inline void for_each_vector(int64_t V, F&& chunk) {
  using Vec = Vectorized<acc>;
  int64_t j = 0;
  for (; j + Vec::size() <= V; j += Vec::size()) chunk(j, Vec::size());
  if (j < V) chunk(j, V - j);
}

template <typename acc>
inline acc lane_sum(const Vectorized<acc>& v) {
  return at::vec::vec_reduce_all<acc>([](Vectorized<acc>& a, Vectorized<acc>& b) { return a + b; }, v);
}

template <typename scalar_t>
void zero_row(scalar_t* out, int64_t V) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    const Vectorized<float> zero(0.f);
    for_each_chunk_aligned<float>(out, V, [&](int64_t j, int64_t n) { store_streaming(out + j, zero, n); });
  } else {
    fill_row(out, V, 0.0);
  }
}

}  // namespace row_softmax
}  // namespace fastft
