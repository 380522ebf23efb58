// SwiGLU gated-product CPU kernels (the "cpp" backend of fastft.ops.swiglu), element-wise over flat tensors.
//
//   forward   out = round(silu(a)) b,   silu(a) = a sigmoid(a)   (round: to the inputs' dtype, as eager
//                                                                  F.silu(gate) * up rounds between its two ops)
//   backward  d_up = dout silu(a),   d_gate = dout b sigmoid(a) (1 + a (1 - sigmoid(a)))
// sigmoid(a) is recomputed in backward from the saved inputs, so nothing else is kept between the passes.
// Forward reads gate and up once and writes out once; backward reads dout, gate and up once and writes both
// gradients once: 8 full-width streams for the pair, against 14 (and 5 fresh tensors) for eager
// silu -> mul -> autograd. The two gradients, consumed by the projections' backward and dropped, come from
// the CPU buffer cache, which saves their first-touch page faults on every step after the first.
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_buffer_cache.h"
#include "cpu/_row_softmax.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <array>
#include <type_traits>

namespace fastft {
namespace {

using at::vec::Vectorized;
using row_softmax::acc_t;

// Elements per parallel task and per conversion chunk (3 x 1024 fp32 of scratch: stays in L1).
constexpr int64_t kGrain = 32768;
constexpr int64_t kChunk = 1024;

template <typename acc>
inline Vectorized<acc> sigmoid(const Vectorized<acc>& a) {
  const Vectorized<acc> one(acc(1));
  return one / (one + a.neg().exp_u20());
}

// Calls body(in, start, n) over chunks [start, start + n) of [begin, end), with in[k] pointing at that chunk of
// inputs[k] (nullptr stays nullptr) in the accumulation precision: the input itself for fp32/fp64, a converted
// copy otherwise.
template <typename scalar_t, typename Body>
void for_each_chunk(const std::array<const scalar_t*, 3>& inputs, int64_t begin, int64_t end, Body&& body) {
  using acc = acc_t<scalar_t>;
  std::array<const acc*, 3> in{};
  if constexpr (std::is_same_v<scalar_t, acc>) {
    for (size_t k = 0; k < inputs.size(); ++k) in[k] = inputs[k] ? inputs[k] + begin : nullptr;
    body(in, begin, end - begin);
  } else {
    acc converted[3][kChunk];
    for (int64_t start = begin; start < end; start += kChunk) {
      const int64_t n = std::min(kChunk, end - start);
      for (size_t k = 0; k < inputs.size(); ++k) {
        if (inputs[k] == nullptr) continue;
        for (int64_t j = 0; j < n; ++j) converted[k][j] = static_cast<acc>(inputs[k][start + j]);
        in[k] = converted[k];
      }
      body(in, start, n);
    }
  }
}

// Stores the acc vector v as n elements of scalar_t at p.
template <typename scalar_t, typename acc>
inline void store_as(scalar_t* p, const Vectorized<acc>& v, int64_t n) {
  if constexpr (std::is_same_v<scalar_t, acc>) {
    v.store(p, n);
  } else {
    at::vec::convert_from_float<scalar_t>(v, v).store(p, n);
  }
}

void check_pair(const at::Tensor& gate, const at::Tensor& up) {
  TORCH_CHECK(gate.is_contiguous() && up.is_contiguous(), "swiglu: gate and up must be contiguous");
  TORCH_CHECK(gate.sizes() == up.sizes(), "swiglu: gate and up must have one shape, got ", gate.sizes(), " and ",
              up.sizes());
  TORCH_CHECK(gate.scalar_type() == up.scalar_type(), "swiglu: gate and up must have one dtype, got ",
              gate.scalar_type(), " and ", up.scalar_type());
}

at::Tensor swiglu_fwd_cpu(const at::Tensor& gate, const at::Tensor& up) {
  check_pair(gate, up);
  at::Tensor out = at::empty(gate.sizes(), gate.options());
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    using Vec = Vectorized<acc>;
    const scalar_t* a0 = gate.data_ptr<scalar_t>();
    const scalar_t* b0 = up.data_ptr<scalar_t>();
    scalar_t* out0 = out.data_ptr<scalar_t>();
    at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
      for_each_chunk<scalar_t>({a0, b0, nullptr}, begin, end, [&](const auto& in, int64_t start, int64_t len) {
        const acc *a = in[0], *b = in[1];
        for (int64_t j = 0; j < len; j += Vec::size()) {
          const int64_t n = std::min<int64_t>(Vec::size(), len - j);
          const Vec av = Vec::loadu(a + j, n);
          const Vec act = round_to<scalar_t, acc>(av * sigmoid(av));
          store_as(out0 + start + j, act * Vec::loadu(b + j, n), n);
        }
      });
    });
  });
  return out;
}

// (d_gate, d_up); an empty (0,) tensor for the one not asked for.
std::tuple<at::Tensor, at::Tensor> swiglu_bwd_cpu(const at::Tensor& grad_out, const at::Tensor& gate,
                                                  const at::Tensor& up, bool need_gate, bool need_up) {
  check_pair(gate, up);
  check_pair(grad_out, gate);
  at::Tensor d_gate = need_gate ? cached_empty("swiglu.d_gate", gate.sizes(), gate.options()) : at::Tensor();
  at::Tensor d_up = need_up ? cached_empty("swiglu.d_up", gate.sizes(), gate.options()) : at::Tensor();
  if (need_gate || need_up) {
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd_cpu", [&] {
      using acc = acc_t<scalar_t>;
      using Vec = Vectorized<acc>;
      const scalar_t* g0 = grad_out.data_ptr<scalar_t>();
      const scalar_t* a0 = gate.data_ptr<scalar_t>();
      const scalar_t* b0 = up.data_ptr<scalar_t>();
      scalar_t* da0 = need_gate ? d_gate.data_ptr<scalar_t>() : nullptr;
      scalar_t* db0 = need_up ? d_up.data_ptr<scalar_t>() : nullptr;
      const Vec one(acc(1));
      at::parallel_for(0, gate.numel(), kGrain, [&](int64_t begin, int64_t end) {
        // up is read only for d_gate.
        for_each_chunk<scalar_t>({g0, a0, da0 ? b0 : nullptr}, begin, end,
                                 [&](const auto& in, int64_t start, int64_t len) {
          const acc *g = in[0], *a = in[1], *b = in[2];
          for (int64_t j = 0; j < len; j += Vec::size()) {
            const int64_t n = std::min<int64_t>(Vec::size(), len - j);
            const Vec gv = Vec::loadu(g + j, n), av = Vec::loadu(a + j, n), sig = sigmoid(av);
            if (db0) store_as(db0 + start + j, gv * av * sig, n);
            if (da0) store_as(da0 + start + j, gv * Vec::loadu(b + j, n) * sig * (one + av * (one - sig)), n);
          }
        });
      });
    });
  }
  return {need_gate ? d_gate : at::empty({0}, gate.options()), need_up ? d_up : at::empty({0}, gate.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("swiglu_fwd_kernel", &swiglu_fwd_cpu);
  m.impl("swiglu_bwd_kernel", &swiglu_bwd_cpu);
}

}  // namespace fastft
