// Include this FIRST in every CPU kernel file that uses at::vec::Vectorized.
//
// ATen's Vectorized<T> picks its implementation from CPU_CAPABILITY_* macros that libtorch sets per
// build flavour; an extension gets none and would silently fall back to scalar loops. We map the
// compiler's target macros (the extension is built with -march=native) onto them and use our own
// inline-namespace name so no symbol can collide with libtorch's copies.
#pragma once

#if !defined(CPU_CAPABILITY_AVX512) && !defined(CPU_CAPABILITY_AVX2)
#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && defined(__AVX512DQ__)
#define CPU_CAPABILITY_AVX512 1
#elif defined(__AVX2__) && defined(__FMA__)
#define CPU_CAPABILITY_AVX2 1
#endif
#endif
#ifndef CPU_CAPABILITY
#define CPU_CAPABILITY fastft_vec
#endif

#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

#include <tuple>
#include <type_traits>

namespace fastft {

// v rounded to scalar_t's precision and back (a no-op when scalar_t is the accumulation type): the
// rounding a reduced-precision intermediate gets in the reference, kept in fp32 lanes.
template <typename scalar_t, typename acc>
inline at::vec::Vectorized<acc> round_to(const at::vec::Vectorized<acc>& v) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    return v;
  } else {
    return std::get<0>(at::vec::convert_to_float<scalar_t>(at::vec::convert_from_float<scalar_t>(v, v)));
  }
}

}  // namespace fastft
