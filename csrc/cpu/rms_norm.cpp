// RMSNorm CPU kernels (the "cpp" backend of fastft.ops.rms_norm).
//
// Per row x of width H, r = rsqrt(mean(x^2) + eps), scale s = offset + w:
//   forward   y = round_x(x r) s   ("llama": the normalised row rounded to x's dtype, as Hugging Face does)
//             y = x r s            ("gemma": fp32 throughout, rounded once on store)
//   backward  g = dy s,  dx = r g - (r^3 / H) (g . x) x,  dw = sum over rows of dy round_x(x r)
// Forward saves only r per row. A row (8 KB at H = 2048 fp32) stays in L1/L2 between the passes over it,
// so forward reads x once and writes y once; backward reads dy and x once and writes dx once. The eager
// module makes ~6 full-width passes forward and ~10 backward, each into a fresh tensor.
// dw: each block of rows accumulates its own fp32 partial (no atomics, deterministic); the partials are
// summed once at the end.
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_buffer_cache.h"
#include "cpu/_row_softmax.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>

namespace fastft {
namespace {

using at::vec::Vectorized;
using row_softmax::acc_t;
using row_softmax::for_each_chunk_aligned;
using row_softmax::row_values;
using row_softmax::Scratch;
using row_softmax::store_row;
using row_softmax::store_streaming;

template <typename acc>
acc sum_squares(const acc* x, int64_t n) {
  using Vec = Vectorized<acc>;
  Vec s0(acc(0)), s1(acc(0));  // two chains: the adds' latency, not the loads, would bound one
  int64_t j = 0;
  for (; j + 2 * Vec::size() <= n; j += 2 * Vec::size()) {
    const Vec a = Vec::loadu(x + j), b = Vec::loadu(x + j + Vec::size());
    s0 = at::vec::fmadd(a, a, s0);
    s1 = at::vec::fmadd(b, b, s1);
  }
  if (j + Vec::size() <= n) {
    const Vec a = Vec::loadu(x + j);
    s0 = at::vec::fmadd(a, a, s0);
    j += Vec::size();
  }
  acc out = at::vec::vec_reduce_all<acc>([](Vec& a, Vec& b) { return a + b; }, s0 + s1);
  for (; j < n; ++j) out += x[j] * x[j];
  return out;
}

// Rows per parallel task: ~32k elements, so a task is worth its scheduling at any H.
int64_t row_grain(int64_t H) { return std::max<int64_t>(1, 32768 / std::max<int64_t>(H, 1)); }

void check_x(const at::Tensor& x, const char* name) {
  TORCH_CHECK(x.dim() == 2, "rms_norm: ", name, " must be [N, H], got ", x.sizes());
  TORCH_CHECK(x.numel() == 0 || x.size(1) == 1 || x.stride(1) == 1, "rms_norm: ", name,
              "'s last dimension must be contiguous");
}

// The output dtype: x's for "gemma"; for "llama" torch's promotion of x and the weight (an fp32 weight with
// bf16 x gives fp32, as `weight * normed.to(bf16)` does in transformers).
at::ScalarType output_type(const at::Tensor& x, const at::Tensor& weight, bool gemma) {
  return gemma ? x.scalar_type() : at::promote_types(x.scalar_type(), weight.scalar_type());
}

// Runs Kernel<scalar_t, out_t>::run(args...) for x's dtype and an output dtype that is x's own or the
// accumulation type (fp32 for fp16/bf16 x); other pairs are rejected (the Python op never sends them).
template <template <typename, typename> class Kernel, typename... Args>
void dispatch_x_out(at::ScalarType x_type, at::ScalarType out_type, Args&&... args) {
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x_type, "rms_norm_cpu", [&] {
    using acc = acc_t<scalar_t>;
    if (out_type == x_type) {
      Kernel<scalar_t, scalar_t>::run(args...);
    } else {
      TORCH_CHECK(out_type == c10::CppTypeToScalarType<acc>::value, "rms_norm: unsupported dtype pair: x ",
                  x_type, " with output ", out_type);
      Kernel<scalar_t, acc>::run(args...);
    }
  });
}

template <typename scalar_t, typename out_t>
struct Forward {
  static void run(const at::Tensor& x, at::Tensor& y, at::Tensor& rstd, const at::Tensor& scale, double eps,
                  bool gemma) {
    using acc = acc_t<scalar_t>;
    using Vec = Vectorized<acc>;
    // fp32 in and out: y is computed straight into the output with streaming stores (it is not read again
    // here); otherwise through an fp32 row that is converted on store.
    constexpr bool direct = std::is_same_v<scalar_t, acc> && std::is_same_v<out_t, acc>;
    const int64_t N = x.size(0), H = x.size(1), x_stride = x.stride(0);
    const scalar_t* x0 = x.data_ptr<scalar_t>();
    out_t* y0 = y.data_ptr<out_t>();
    acc* rstd_p = rstd.data_ptr<acc>();
    const acc* s = scale.data_ptr<acc>();
    const acc eps_a = static_cast<acc>(eps);
    at::parallel_for(0, N, row_grain(H), [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      acc* buf = scratch.get(2 * H);
      for (int64_t i = begin; i < end; ++i) {
        const acc* xs = row_values<scalar_t, acc>(x0 + i * x_stride, H, acc(0), buf);
        const acc r = acc(1) / std::sqrt(sum_squares(xs, H) / static_cast<acc>(H) + eps_a);
        rstd_p[i] = r;
        const Vec rv(r);
        acc* out = direct ? reinterpret_cast<acc*>(y0 + i * H) : buf + H;
        for_each_chunk_aligned<acc>(out, H, [&](int64_t j, int64_t n) {
          Vec v = Vec::loadu(xs + j, n) * rv;
          if (!gemma) v = round_to<scalar_t, acc>(v);
          store_streaming(out + j, v * Vec::loadu(s + j, n), n);
        });
        if constexpr (!direct) store_row<out_t, acc>(y0 + i * H, out, H);
      }
      FASTFT_STREAM_FENCE();  // order this thread's streaming stores before y is handed out
    });
  }
};

// x [N, H] rows, grad_y of the output dtype (out_t), split into `blocks` contiguous blocks of rows; dx (when
// defined) contiguous in x's dtype; partial (when defined) [blocks, H] in the accumulation type, one per block.
template <typename scalar_t, typename out_t>
struct Backward {
  static void run(const at::Tensor& grad_y, const at::Tensor& x, const at::Tensor& rstd, const at::Tensor& scale,
                  bool gemma, int64_t blocks, at::Tensor& dx, at::Tensor& partial) {
    using acc = acc_t<scalar_t>;
    using Vec = Vectorized<acc>;
    constexpr bool direct = std::is_same_v<scalar_t, acc>;
    const int64_t N = x.size(0), H = x.size(1), x_stride = x.stride(0), g_stride = grad_y.stride(0);
    const scalar_t* x0 = x.data_ptr<scalar_t>();
    const out_t* g0 = grad_y.data_ptr<out_t>();
    scalar_t* dx0 = dx.defined() ? dx.data_ptr<scalar_t>() : nullptr;
    acc* partial0 = partial.defined() ? partial.data_ptr<acc>() : nullptr;
    const acc* rstd_p = rstd.data_ptr<acc>();
    const acc* s = scale.data_ptr<acc>();
    const acc inv_h = acc(1) / static_cast<acc>(H);
    at::parallel_for(0, blocks, 1, [&](int64_t block_begin, int64_t block_end) {
      Scratch<acc> scratch;
      acc* buf = scratch.get(3 * H);
      for (int64_t b = block_begin; b < block_end; ++b) {
        acc* dw = partial0 ? partial0 + b * H : nullptr;
        for (int64_t i = N * b / blocks; i < N * (b + 1) / blocks; ++i) {
          const acc* xs = row_values<scalar_t, acc>(x0 + i * x_stride, H, acc(0), buf);
          const acc* gs = row_values<out_t, acc>(g0 + i * g_stride, H, acc(0), buf + H);
          const acc r = rstd_p[i];
          const Vec rv(r);
          // Pass 1: (dy s) . x, and the row's share of dw.
          Vec dot(acc(0));
          for (int64_t j = 0; j < H; j += Vec::size()) {
            const int64_t n = std::min<int64_t>(Vec::size(), H - j);
            const Vec xv = Vec::loadu(xs + j, n), gv = Vec::loadu(gs + j, n);
            dot = at::vec::fmadd(gv * Vec::loadu(s + j, n), xv, dot);
            if (dw != nullptr) {
              Vec normed = xv * rv;
              if (!gemma) normed = round_to<scalar_t, acc>(normed);
              at::vec::fmadd(gv, normed, Vec::loadu(dw + j, n)).store(dw + j, n);
            }
          }
          if (dx0 == nullptr) continue;
          const acc c = r * r * r * inv_h * at::vec::vec_reduce_all<acc>([](Vec& u, Vec& v) { return u + v; }, dot);
          // Pass 2: dx = r (dy s) - c x, from the row still in cache.
          const Vec cv(c);
          acc* out = direct ? reinterpret_cast<acc*>(dx0 + i * H) : buf + 2 * H;
          for_each_chunk_aligned<acc>(out, H, [&](int64_t k, int64_t n) {
            const Vec v = rv * Vec::loadu(gs + k, n) * Vec::loadu(s + k, n) - cv * Vec::loadu(xs + k, n);
            store_streaming(out + k, v, n);
          });
          if constexpr (!direct) store_row<scalar_t, acc>(dx0 + i * H, out, H);
        }
      }
      FASTFT_STREAM_FENCE();
    });
  }
};

std::tuple<at::Tensor, at::Tensor> rms_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& weight, double eps,
                                                    double offset, bool gemma) {
  check_x(x, "x");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(weight.dim() == 1 && weight.size(0) == H, "rms_norm: weight must be [H] = [", H, "], got ",
              weight.sizes());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  at::Tensor y = at::empty({N, H}, x.options().dtype(output_type(x, weight, gemma)));
  at::Tensor rstd = at::empty({N}, x.options().dtype(acc_type));
  const at::Tensor scale = (weight.to(acc_type) + offset).contiguous();  // [H]: offset + w, once
  dispatch_x_out<Forward>(x.scalar_type(), y.scalar_type(), x, y, rstd, scale, eps, gemma);
  return {y, rstd};
}

// (dx, dw); an empty (0,) tensor for the one not asked for.
std::tuple<at::Tensor, at::Tensor> rms_norm_bwd_cpu(const at::Tensor& grad_y, const at::Tensor& x,
                                                    const at::Tensor& weight, const at::Tensor& rstd, double offset,
                                                    bool gemma, bool need_input, bool need_weight) {
  check_x(x, "x");
  check_x(grad_y, "grad_y");
  const int64_t N = x.size(0), H = x.size(1);
  TORCH_CHECK(grad_y.size(0) == N && grad_y.size(1) == H, "rms_norm: grad_y must be [", N, ", ", H, "], got ",
              grad_y.sizes());
  TORCH_CHECK(grad_y.scalar_type() == output_type(x, weight, gemma), "rms_norm: grad_y must be ",
              output_type(x, weight, gemma), ", got ", grad_y.scalar_type());
  const auto acc_type = x.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  TORCH_CHECK(rstd.dim() == 1 && rstd.size(0) == N && rstd.is_contiguous() && rstd.scalar_type() == acc_type,
              "rms_norm: rstd must be a contiguous [N] tensor of the accumulation type");
  // dx is consumed by the layer below and dropped: a cached buffer saves its first-touch page faults.
  at::Tensor dx = need_input ? cached_empty("rms_norm.dx", {N, H}, x.options()) : at::Tensor();
  const int64_t blocks = std::max<int64_t>(1, std::min<int64_t>(N, at::get_num_threads()));
  at::Tensor partial = need_weight ? at::zeros({blocks, H}, x.options().dtype(acc_type)) : at::Tensor();
  const at::Tensor scale = (weight.to(acc_type) + offset).contiguous();
  if (N > 0 && (need_input || need_weight)) {
    dispatch_x_out<Backward>(x.scalar_type(), grad_y.scalar_type(), grad_y, x, rstd, scale, gemma,
                             blocks, dx, partial);
  }
  return {need_input ? dx : at::empty({0}, x.options()),
          need_weight ? partial.sum(0).to(weight.scalar_type()) : at::empty({0}, weight.options())};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("rms_norm_fwd_kernel", &rms_norm_fwd_cpu);
  m.impl("rms_norm_bwd_kernel", &rms_norm_bwd_cpu);
}

}  // namespace fastft
