// KL-penalty CPU kernels (the "cpp" backend of fastft.ops.kl): full-vocabulary KL(pi || rho) of two
// logit rows, and the selective log-softmax.
//
// full_kl, per counted row, with a = x_p / T, b = x_r / T, m_a = max a, m_b = max b,
//   e_j = exp(a_j - m_a), f_j = exp(b_j - m_b), S_p = sum e, S_r = sum f, D = sum_j e_j (x_p,j - x_r,j):
//   lse_p = m_a + log S_p,  lse_r = m_b + log S_r,  c = sum_j pi_j (a_j - b_j) = D / (T S_p)
//   KL = c - lse_p + lse_r
//   dKL/dx_p,j = pi_j (log pi_j - log rho_j - KL) / T = (e_j / (T S_p)) ((x_p,j - x_r,j) / T - c)
//   dKL/dx_r,j = (rho_j - pi_j) / T = (f_j / S_r - e_j / S_p) / T
// (log pi - log rho - KL = (a - b) - (lse_p - lse_r) - KL = (a - b) - c.)
// With reverse_weight w > 0 the row loss is (1 - w) KL(pi || rho) + w KL(rho || pi): the same sweep also sums
//   D_r = sum_j f_j (x_r,j - x_p,j), c_r = D_r / (T S_r), KL_rev = c_r - lse_r + lse_p, and the gradients are
//   d/dx_p,j = ((1 - w) pi_j ((a_j - b_j) - c) + w (pi_j - rho_j)) / T
//   d/dx_r,j = ((1 - w) (rho_j - pi_j) + w rho_j ((b_j - a_j) - c_r)) / T
// (a weight-0 direction is left out entirely, so its +inf or NaN cannot leak through 0 * inf). w == 0 runs
// the one-direction code unchanged.
// Sweeps per row: 1) both maxima (the only reads from memory), 2) e, f and the three sums, parking e
// (and f) in per-thread scratch, 3) the gradient, from the parked exps, streamed to memory. A 32k row is 128 KB of fp32: the
// two rows and the gradient stay in L2 (here 2 MB+ per core) between sweeps. Masked rows are never read.
// Terms with pi_j = 0 (x_p,j = -inf: a banned token) count 0, not 0 * inf = NaN. The maxima are exact
// (no online rescaling), so a row that starts with -inf needs no guard; NaN, +inf and an all -inf row
// reach the sums as NaN (exp(inf - inf)), and poison_undefined_grads keeps the gradient contract.
//
// selective_log_softmax (kernels/kl.py's header has the math): z = x / T, logp = z_y - lse(z), the entropy
// H = log S - D / S (S, D: entropy_row_sums), dz_j = g_logp ([j == y] - p_j) - g_H p_j (log p_j + H), d/dx = dz / T.
// Rows whose index is ignore_index are not read (logp = lse = H = 0, a zero gradient row).
#include "cpu/_vec.h"  // must precede other ATen includes (sets the Vectorized ISA)
#include "cpu/_buffer_cache.h"
#include "cpu/_row_softmax.h"
#include "_cross_entropy_grad_out.h"

#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <cmath>
#include <limits>
#include <type_traits>

namespace fastft {
namespace {

using at::vec::Vectorized;
using namespace row_softmax;  // acc_t, row_values, row_max, row_sum_exp, store_row, fill_row, Scratch,
                              // store_streaming, for_each_chunk_aligned, for_each_vector, lane_sum, zero_row

// Sweep 2 of full_kl: S_p, S_r and D (see the top), parking the exps when asked; with REVERSE also
// D_r = sum f (x_r - x_p) (rho_j = 0 counts 0).
template <bool REVERSE, typename acc>
void kl_row_sums(const acc* xp, const acc* xr, int64_t V, acc inv_t, acc m_a, acc m_b, acc* e_out, acc* f_out,
                 acc& S_p, acc& S_r, acc& D, acc& D_r) {
  using Vec = Vectorized<acc>;
  const Vec it(inv_t), sa(-m_a), sb(-m_b), zero(acc(0));
  Vec sp(acc(0)), sr(acc(0)), d(acc(0)), dr(acc(0));
  auto chunk = [&](int64_t j, int64_t n) {
    const Vec vp = Vec::loadu(xp + j, n), vr = Vec::loadu(xr + j, n);
    Vec e = at::vec::fmadd(vp, it, sa).exp_u20();
    Vec f = at::vec::fmadd(vr, it, sb).exp_u20();
    if (n < Vec::size()) {  // the tail's unused lanes must add nothing
      e = Vec::set(zero, e, n);
      f = Vec::set(zero, f, n);
    }
    if (e_out) e.store(e_out + j, n);
    if (f_out) f.store(f_out + j, n);
    sp = sp + e;
    sr = sr + f;
    d = d + Vec::blendv(e * (vp - vr), zero, e == zero);  // pi_j = 0 counts 0 (never 0 * inf)
    if constexpr (REVERSE) dr = dr + Vec::blendv(f * (vr - vp), zero, f == zero);
  };
  for_each_vector<acc>(V, chunk);
  S_p = lane_sum(sp);
  S_r = lane_sum(sr);
  D = lane_sum(d);
  D_r = REVERSE ? lane_sum(dr) : acc(0);
}

// Gradient sweep of full_kl, shared by the fused forward and the backward:
//   e_j = parked e[j], or exp(x_p,j / T - shift_p)        f_j likewise from x_r and shift_r
//   grad_p,j = kp * e_j * ((x_p,j - x_r,j) / T - c)     grad_r,j = kr * f_j - kq * e_j
// Fused forward: shifts are the maxima, e/f parked, kp = kq = scale / (T S_p), kr = scale / (T S_r).
// Backward: shifts are the logsumexps (e = pi, f = rho), kp = kq = kr = grad_kl / T.
// gp / gr == nullptr: that gradient is not wanted. Parked rows may alias the outputs (each chunk is
// read before it is written); reduced precision stages through tmp_p / tmp_r, then converts.
template <typename scalar_t, typename acc>
void kl_grad_row(scalar_t* gp, scalar_t* gr, const acc* xp, const acc* xr, const acc* e_park, const acc* f_park,
                 acc shift_p, acc shift_r, acc inv_t, acc kp, acc c, acc kq, acc kr, int64_t V, acc* tmp_p,
                 acc* tmp_r) {
  using Vec = Vectorized<acc>;
  constexpr bool same = std::is_same_v<scalar_t, acc>;
  acc* dst_p = gp == nullptr ? nullptr : same ? reinterpret_cast<acc*>(gp) : tmp_p;
  acc* dst_r = gr == nullptr ? nullptr : same ? reinterpret_cast<acc*>(gr) : tmp_r;
  const Vec it(inv_t), sp(-shift_p), sr(-shift_r), kpv(kp), cv(-c), kqv(kq), krv(kr), zero(acc(0));
  // fp32 gradients are streamed (non-temporal): written once, never read back here.
  for_each_chunk_aligned<acc>(dst_p ? dst_p : dst_r, V, [&](int64_t j, int64_t n) {
    const Vec vp = Vec::loadu(xp + j, n);
    const Vec e = e_park ? Vec::loadu(e_park + j, n) : at::vec::fmadd(vp, it, sp).exp_u20();
    if (dst_p) {
      const Vec vr = Vec::loadu(xr + j, n);
      const Vec g = kpv * e * at::vec::fmadd(vp - vr, it, cv);
      store_streaming(dst_p + j, Vec::blendv(g, zero, e == zero), n);
    }
    if (dst_r) {
      const Vec f = f_park ? Vec::loadu(f_park + j, n) : at::vec::fmadd(Vec::loadu(xr + j, n), it, sr).exp_u20();
      store_streaming(dst_r + j, krv * f - kqv * e, n);
    }
  });
  if constexpr (!same) {
    if (gp) store_row<scalar_t, acc>(gp, tmp_p, V);
    if (gr) store_row<scalar_t, acc>(gr, tmp_r, V);
  }
}

// Gradient sweep of the weighted two-direction row loss (reverse_weight w > 0, see the top), shared by the
// fused forward and the backward: pi_j = e_j * n_p, rho_j = f_j * n_r with e_j, f_j parked or
// exp(x / T - shift) (fused forward: shifts = maxima, n = 1 / S; backward: shifts = logsumexps, n = 1), and
//   grad_p,j = k (pi_j ((1 - w) ((x_p,j - x_r,j) / T - c) + w) - w rho_j)
//   grad_r,j = k (rho_j (w ((x_r,j - x_p,j) / T - c_r) + (1 - w)) - (1 - w) pi_j)
// the pi_j (rho_j) product is 0 where pi_j (rho_j) is 0. Outputs and staging as kl_grad_row.
template <typename scalar_t, typename acc>
void kl_mixed_grad_row(scalar_t* gp, scalar_t* gr, const acc* xp, const acc* xr, const acc* e_park,
                       const acc* f_park, acc shift_p, acc shift_r, acc n_p, acc n_r, acc inv_t, acc k, acc c,
                       acc c_r, acc w, int64_t V, acc* tmp_p, acc* tmp_r) {
  using Vec = Vectorized<acc>;
  constexpr bool same = std::is_same_v<scalar_t, acc>;
  acc* dst_p = gp == nullptr ? nullptr : same ? reinterpret_cast<acc*>(gp) : tmp_p;
  acc* dst_r = gr == nullptr ? nullptr : same ? reinterpret_cast<acc*>(gr) : tmp_r;
  const acc wf = acc(1) - w;
  const Vec it(inv_t), sp(-shift_p), sr(-shift_r), np(n_p), nr(n_r), kv(k), cv(-c), crv(-c_r), wv(w), wfv(wf),
      zero(acc(0));
  for_each_chunk_aligned<acc>(dst_p ? dst_p : dst_r, V, [&](int64_t j, int64_t n) {
    const Vec vp = Vec::loadu(xp + j, n), vr = Vec::loadu(xr + j, n);
    const Vec pi = (e_park ? Vec::loadu(e_park + j, n) : at::vec::fmadd(vp, it, sp).exp_u20()) * np;
    const Vec rho = (f_park ? Vec::loadu(f_park + j, n) : at::vec::fmadd(vr, it, sr).exp_u20()) * nr;
    if (dst_p) {
      // a weight-0 forward direction adds nothing, not 0 * inf where x_r = -inf
      const Vec inner = wf > acc(0) ? at::vec::fmadd(wfv, at::vec::fmadd(vp - vr, it, cv), wv) : wv;
      const Vec g = kv * (Vec::blendv(pi * inner, zero, pi == zero) - wv * rho);
      store_streaming(dst_p + j, g, n);
    }
    if (dst_r) {
      const Vec inner = at::vec::fmadd(wv, at::vec::fmadd(vr - vp, it, crv), wfv);
      const Vec g = kv * (Vec::blendv(rho * inner, zero, rho == zero) - wfv * pi);
      store_streaming(dst_r + j, g, n);
    }
  });
  if constexpr (!same) {
    if (gp) store_row<scalar_t, acc>(gp, tmp_p, V);
    if (gr) store_row<scalar_t, acc>(gr, tmp_r, V);
  }
}

// The hostile-value contract (kernels/kl.py's header): a row whose KL is NaN gets NaN gradient rows, and
// one whose KL is +inf (policy mass where the reference logit is -inf) a NaN policy gradient row; the
// sweep above would leave zeros where pi_j = 0 and -inf elsewhere. Rare rows: refilled after the sweep.
template <typename scalar_t, typename acc>
void poison_undefined_grads(scalar_t* gp, scalar_t* gr, int64_t V, acc c, acc kl) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  if (gp != nullptr && !std::isfinite(c)) fill_row(gp, V, nan);
  if (gr != nullptr && std::isnan(kl)) fill_row(gr, V, nan);
}

// The same contract for the two-direction loss, each direction with weight > 0 in its own right (the reverse
// one with the roles swapped): a non-finite c (c_r) poisons the policy (reference) row, a NaN KL both.
template <typename scalar_t, typename acc>
void poison_undefined_mixed_grads(scalar_t* gp, scalar_t* gr, int64_t V, acc c, acc kl, acc c_r, acc kl_rev, acc w) {
  const double nan = std::numeric_limits<double>::quiet_NaN();
  const bool fwd = w < acc(1);
  if (gp != nullptr && ((fwd && !std::isfinite(c)) || std::isnan(kl_rev))) fill_row(gp, V, nan);
  if (gr != nullptr && ((fwd && std::isnan(kl)) || !std::isfinite(c_r))) fill_row(gr, V, nan);
}

// log-sum-exp from the row maximum m and S = sum exp(x - m): a +inf logit has no softmax (inf / inf), so NaN.
// (The fast exp does not turn exp(inf - inf) into NaN: the sum alone would give lse = +inf, logp = -inf.)
template <typename acc>
acc lse_of(acc m, acc S) {
  return m == std::numeric_limits<acc>::infinity() ? std::numeric_limits<acc>::quiet_NaN() : m + std::log(S);
}

void check_pair(const char* op, const at::Tensor& policy, const at::Tensor& ref, const c10::optional<at::Tensor>& mask) {
  TORCH_CHECK(policy.dim() == 2 && ref.dim() == 2, op, ": logits must be [N, V], got ", policy.sizes(), " and ",
              ref.sizes());
  TORCH_CHECK(policy.sizes() == ref.sizes(), op, ": policy and reference logits differ in shape: ", policy.sizes(),
              " vs ", ref.sizes());
  TORCH_CHECK(policy.scalar_type() == ref.scalar_type(), op, ": policy and reference logits differ in dtype");
  TORCH_CHECK(policy.size(0) == 0 || (policy.stride(1) == 1 && ref.stride(1) == 1), op,
              ": the vocabulary dimension must be contiguous");
  if (mask.has_value()) {
    TORCH_CHECK(mask->scalar_type() == at::kBool && mask->dim() == 1 && mask->size(0) == policy.size(0) &&
                    mask->is_contiguous(),
                op, ": mask must be a contiguous bool [N] tensor");
  }
}

void check_reverse_weight(const char* op, double w) {
  TORCH_CHECK(w >= 0.0 && w <= 1.0, op, ": reverse_weight must be in [0, 1], got ", w);
}

// kl_rev: KL(rho || pi) per row when reverse_weight > 0, else an empty tensor (nothing computed for it).
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor, at::Tensor> full_kl_fwd_cpu(
    const at::Tensor& policy, const at::Tensor& ref, const c10::optional<at::Tensor>& mask,
    const c10::optional<at::Tensor>& grad_scale, double temperature, bool grad_policy, bool grad_ref,
    double reverse_weight) {
  check_pair("full_kl_fwd", policy, ref, mask);
  TORCH_CHECK(temperature > 0, "full_kl_fwd: temperature must be > 0");
  check_reverse_weight("full_kl_fwd", reverse_weight);
  const bool mixed = reverse_weight > 0.0;
  const int64_t N = policy.size(0), V = policy.size(1);
  const bool fused = grad_scale.has_value();
  const bool want_p = fused && grad_policy, want_r = fused && grad_ref;
  auto acc_opts = policy.options().dtype(policy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor kl = at::empty({N}, acc_opts), lse_p = at::empty({N}, acc_opts), lse_r = at::empty({N}, acc_opts);
  at::Tensor kl_rev = at::empty({mixed ? N : 0}, acc_opts);
  // Distinct empties: a custom op's outputs must not alias each other.
  at::Tensor gp = want_p ? cached_empty("full_kl.grad_policy", {N, V}, policy.options()) : at::empty({0}, policy.options());
  at::Tensor gr = want_r ? cached_empty("full_kl.grad_ref", {N, V}, policy.options()) : at::empty({0}, policy.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy.scalar_type(), "full_kl_fwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc>;
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    const acc scale = fused ? static_cast<acc>(grad_scale->item<double>()) : acc(0);
    const acc w = static_cast<acc>(reverse_weight);
    const scalar_t* p0 = policy.data_ptr<scalar_t>();
    const scalar_t* r0 = ref.data_ptr<scalar_t>();
    const int64_t sp_row = policy.stride(0), sr_row = ref.stride(0);
    const bool* counted = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    acc* kl_p = kl.data_ptr<acc>();
    acc* lp = lse_p.data_ptr<acc>();
    acc* lr = lse_r.data_ptr<acc>();
    acc* kl_rev_p = mixed ? kl_rev.data_ptr<acc>() : nullptr;
    scalar_t* gp0 = want_p ? gp.data_ptr<scalar_t>() : nullptr;
    scalar_t* gr0 = want_r ? gr.data_ptr<scalar_t>() : nullptr;
    // Scratch (per thread, stays in L2): [0, V) policy row and [V, 2V) reference row (reduced precision
    // only), [2V, 3V) parked e, [3V, 4V) parked f. Parking the exps here rather than in the gradient
    // rows lets the gradient be streamed to memory without first reading its lines (no RFO).
    const bool need_scratch = !same || want_p || want_r;

    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g_p = want_p ? gp0 + i * V : nullptr;
        scalar_t* g_r = want_r ? gr0 + i * V : nullptr;
        if (counted && !counted[i]) {
          kl_p[i] = lp[i] = lr[i] = acc(0);
          if (mixed) kl_rev_p[i] = acc(0);
          if (g_p) zero_row(g_p, V);
          if (g_r) zero_row(g_r, V);
          continue;
        }
        acc* buf = need_scratch ? scratch.get(4 * V) : nullptr;
        const acc* xp = row_values<scalar_t, acc>(p0 + i * sp_row, V, acc(0), buf);
        const acc* xr = row_values<scalar_t, acc>(r0 + i * sr_row, V, acc(0), buf ? buf + V : nullptr);
        const acc m_a = row_max(xp, V) * inv_t, m_b = row_max(xr, V) * inv_t;  // x -> x/T is monotone
        acc* e_park = nullptr;
        acc* f_park = nullptr;
        if (want_p || want_r) e_park = buf + 2 * V;
        if (want_r || (mixed && want_p)) f_park = buf + 3 * V;
        acc S_p, S_r, D, D_r;
        if (mixed) {
          kl_row_sums<true>(xp, xr, V, inv_t, m_a, m_b, e_park, f_park, S_p, S_r, D, D_r);
        } else {
          kl_row_sums<false>(xp, xr, V, inv_t, m_a, m_b, e_park, f_park, S_p, S_r, D, D_r);
        }
        const acc l_p = lse_of(m_a, S_p), l_r = lse_of(m_b, S_r);
        const acc c = inv_t * D / S_p;
        lp[i] = l_p;
        lr[i] = l_r;
        kl_p[i] = c - l_p + l_r;
        if (mixed) {
          const acc c_r = inv_t * D_r / S_r;
          kl_rev_p[i] = c_r - l_r + l_p;
          if (want_p || want_r) {
            kl_mixed_grad_row<scalar_t, acc>(g_p, g_r, xp, xr, e_park, f_park, m_a, m_b, acc(1) / S_p, acc(1) / S_r,
                                             inv_t, scale * inv_t, c, c_r, w, V, buf ? buf + 2 * V : nullptr,
                                             buf ? buf + 3 * V : nullptr);
            poison_undefined_mixed_grads<scalar_t, acc>(g_p, g_r, V, c, kl_p[i], c_r, kl_rev_p[i], w);
          }
        } else if (want_p || want_r) {
          const acc k_p = scale * inv_t / S_p;
          kl_grad_row<scalar_t, acc>(g_p, g_r, xp, xr, e_park, f_park, m_a, m_b, inv_t, k_p, c, k_p,
                                     scale * inv_t / S_r, V, buf ? buf + 2 * V : nullptr,
                                     buf ? buf + 3 * V : nullptr);
          poison_undefined_grads<scalar_t, acc>(g_p, g_r, V, c, kl_p[i]);
        }
      }
      FASTFT_STREAM_FENCE();  // order this thread's streaming stores before the gradients are handed out
    });
  });
  return {kl, lse_p, lse_r, kl_rev, gp, gr};
}

std::tuple<at::Tensor, at::Tensor> full_kl_bwd_cpu(const at::Tensor& grad_kl, const at::Tensor& policy,
                                                   const at::Tensor& ref, const c10::optional<at::Tensor>& mask,
                                                   const at::Tensor& lse_p, const at::Tensor& lse_r,
                                                   const at::Tensor& kl, double temperature, bool grad_policy,
                                                   bool grad_ref, const c10::optional<at::Tensor>& kl_rev,
                                                   double reverse_weight) {
  check_pair("full_kl_bwd", policy, ref, mask);
  check_reverse_weight("full_kl_bwd", reverse_weight);
  const bool mixed = reverse_weight > 0.0;
  TORCH_CHECK(!mixed || kl_rev.has_value(), "full_kl_bwd: reverse_weight > 0 needs forward's kl_rev");
  const int64_t N = policy.size(0), V = policy.size(1);
  const auto acc_type = policy.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_kl, &lse_p, &lse_r, &kl, mixed ? &*kl_rev : &kl}) {
    TORCH_CHECK(t->numel() == N && t->scalar_type() == acc_type && t->is_contiguous(),
                "full_kl_bwd: grad_kl, lse_p, lse_r, kl and kl_rev must be contiguous [N] tensors of the "
                "accumulation type");
  }
  at::Tensor gp = grad_policy ? cached_empty("full_kl.grad_policy", {N, V}, policy.options()) : at::empty({0}, policy.options());
  at::Tensor gr = grad_ref ? cached_empty("full_kl.grad_ref", {N, V}, policy.options()) : at::empty({0}, policy.options());

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, policy.scalar_type(), "full_kl_bwd_cpu", [&] {
    using acc = acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc>;
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    const scalar_t* p0 = policy.data_ptr<scalar_t>();
    const scalar_t* r0 = ref.data_ptr<scalar_t>();
    const int64_t sp_row = policy.stride(0), sr_row = ref.stride(0);
    const bool* counted = mask.has_value() ? mask->data_ptr<bool>() : nullptr;
    const acc* go = grad_kl.data_ptr<acc>();
    const acc* lp = lse_p.data_ptr<acc>();
    const acc* lr = lse_r.data_ptr<acc>();
    const acc* klv = kl.data_ptr<acc>();
    const acc* kl_rev_v = mixed ? kl_rev->data_ptr<acc>() : nullptr;
    const acc w = static_cast<acc>(reverse_weight);
    scalar_t* gp0 = grad_policy ? gp.data_ptr<scalar_t>() : nullptr;
    scalar_t* gr0 = grad_ref ? gr.data_ptr<scalar_t>() : nullptr;

    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g_p = grad_policy ? gp0 + i * V : nullptr;
        scalar_t* g_r = grad_ref ? gr0 + i * V : nullptr;
        if (counted && !counted[i]) {
          if (g_p) zero_row(g_p, V);
          if (g_r) zero_row(g_r, V);
          continue;
        }
        acc* buf = same ? nullptr : scratch.get(4 * V);
        const acc* xp = row_values<scalar_t, acc>(p0 + i * sp_row, V, acc(0), buf);
        const acc* xr = row_values<scalar_t, acc>(r0 + i * sr_row, V, acc(0), buf ? buf + V : nullptr);
        const acc k = go[i] * inv_t;
        const acc c = lp[i] - lr[i] + klv[i];
        if (mixed) {
          const acc c_r = lr[i] - lp[i] + kl_rev_v[i];
          kl_mixed_grad_row<scalar_t, acc>(g_p, g_r, xp, xr, nullptr, nullptr, lp[i], lr[i], acc(1), acc(1), inv_t,
                                           k, c, c_r, w, V, buf ? buf + 2 * V : nullptr, buf ? buf + 3 * V : nullptr);
          poison_undefined_mixed_grads<scalar_t, acc>(g_p, g_r, V, c, klv[i], c_r, kl_rev_v[i], w);
          continue;
        }
        kl_grad_row<scalar_t, acc>(g_p, g_r, xp, xr, nullptr, nullptr, lp[i], lr[i], inv_t, k, c, k, k, V,
                                   buf ? buf + 2 * V : nullptr, buf ? buf + 3 * V : nullptr);
        poison_undefined_grads<scalar_t, acc>(g_p, g_r, V, c, klv[i]);
      }
      FASTFT_STREAM_FENCE();
    });
  });
  return {gp, gr};
}

void check_index(const char* op, const at::Tensor& logits, const at::Tensor& index) {
  TORCH_CHECK(logits.dim() == 2, op, ": logits must be [N, V], got ", logits.sizes());
  TORCH_CHECK(logits.size(0) == 0 || logits.stride(1) == 1, op, ": the vocabulary dimension must be contiguous");
  TORCH_CHECK(index.dim() == 1 && index.size(0) == logits.size(0) && index.scalar_type() == at::kLong &&
                  index.is_contiguous(),
              op, ": index must be a contiguous int64 [N] tensor");
}

// Sweep 2 of selective_log_softmax (after the max m): S = sum_j e_j and D = sum_j e_j (z_j - m), e_j = exp(z_j - m),
// z = x / T. D is taken relative to the max so that H = log S - D / S does not cancel against it; e_j = 0
// (x_j = -inf) adds 0 to D, never 0 * -inf.
template <typename acc>
void entropy_row_sums(const acc* xs, int64_t V, acc inv_t, acc m, acc& S, acc& D) {
  using Vec = Vectorized<acc>;
  const Vec it(inv_t), sh(-m), zero(acc(0));
  Vec s(zero), d(zero);
  auto chunk = [&](int64_t j, int64_t n) {
    const Vec t = at::vec::fmadd(Vec::loadu(xs + j, n), it, sh);
    Vec e = t.exp_u20();
    if (n < Vec::size()) e = Vec::set(zero, e, n);  // the tail's unused lanes add nothing
    s = s + e;
    d = d + Vec::blendv(e * t, zero, e == zero);
  };
  for_each_vector<acc>(V, chunk);
  S = lane_sum(s);
  D = lane_sum(d);
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> selective_log_softmax_fwd_cpu(const at::Tensor& logits,
                                                                             const at::Tensor& index,
                                                                             double temperature, int64_t ignore_index) {
  check_index("selective_log_softmax_fwd", logits, index);
  TORCH_CHECK(temperature > 0, "selective_log_softmax_fwd: temperature must be > 0");
  const int64_t N = logits.size(0), V = logits.size(1);
  auto acc_opts = logits.options().dtype(logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat);
  at::Tensor logp = at::empty({N}, acc_opts), lse = at::empty({N}, acc_opts), entropy = at::empty({N}, acc_opts);

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "selective_log_softmax_fwd", [&] {
    using acc = acc_t<scalar_t>;
    constexpr bool same = std::is_same_v<scalar_t, acc>;
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    const scalar_t* x0 = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const int64_t* idx = index.data_ptr<int64_t>();
    acc* out = logp.data_ptr<acc>();
    acc* lse_p = lse.data_ptr<acc>();
    acc* ent = entropy.data_ptr<acc>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        const int64_t y = idx[i];
        if (y == ignore_index) {  // not read
          out[i] = lse_p[i] = ent[i] = acc(0);
          continue;
        }
        const acc* xs = row_values<scalar_t, acc>(x0 + i * row_stride, V, acc(0), same ? nullptr : scratch.get(V));
        const acc m = row_max(xs, V) * inv_t;
        acc S, D;
        entropy_row_sums(xs, V, inv_t, m, S, D);
        const acc l = lse_of(m, S);
        lse_p[i] = l;
        // NaN for a row without a softmax (lse NaN: NaN or +inf in it; S = 0: all -inf), as its logp
        ent[i] = std::isnan(l) || !(S > acc(0)) ? std::numeric_limits<acc>::quiet_NaN() : std::log(S) - D / S;
        out[i] = (y >= 0 && y < V) ? xs[y] * inv_t - l : std::numeric_limits<acc>::quiet_NaN();
      }
    });
  });
  return {logp, lse, entropy};
}

// grad_out: as the cross-entropy kernels' (csrc/_cross_entropy_grad_out.h); it may be the logits themselves.
at::Tensor selective_log_softmax_bwd_cpu(const at::Tensor& grad_logp, const c10::optional<at::Tensor>& grad_entropy,
                                         const at::Tensor& logits, const at::Tensor& index, const at::Tensor& lse,
                                         const at::Tensor& entropy, double temperature, int64_t ignore_index,
                                         const c10::optional<at::Tensor>& grad_out) {
  check_index("selective_log_softmax_bwd", logits, index);
  const int64_t N = logits.size(0), V = logits.size(1);
  const auto acc_type = logits.scalar_type() == at::kDouble ? at::kDouble : at::kFloat;
  for (const at::Tensor* t : {&grad_logp, &lse, &entropy}) {
    TORCH_CHECK(t->numel() == N && t->scalar_type() == acc_type && t->is_contiguous(),
                "selective_log_softmax_bwd: grad_logp, lse and entropy must be contiguous [N] tensors of the "
                "accumulation type");
  }
  const bool has_gh = grad_entropy.has_value();
  if (has_gh) {
    TORCH_CHECK(grad_entropy->numel() == N && grad_entropy->scalar_type() == acc_type && grad_entropy->is_contiguous(),
                "selective_log_softmax_bwd: grad_entropy must be a contiguous [N] tensor of the accumulation type");
  }
  at::Tensor grad;
  if (grad_out.has_value()) {
    check_grad_out(logits, *grad_out, "selective_log_softmax_bwd");
    grad = *grad_out;
  } else {
    grad = cached_empty("selective_log_softmax.grad", {N, V}, logits.options());
  }

  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "selective_log_softmax_bwd", [&] {
    using acc = acc_t<scalar_t>;
    using Vec = Vectorized<acc>;
    constexpr bool same = std::is_same_v<scalar_t, acc>;
    const acc inv_t = static_cast<acc>(1.0 / temperature);
    const scalar_t* x0 = logits.data_ptr<scalar_t>();
    const int64_t row_stride = logits.stride(0);
    const int64_t* idx = index.data_ptr<int64_t>();
    const acc* go = grad_logp.data_ptr<acc>();
    const acc* gh = has_gh ? grad_entropy->data_ptr<acc>() : nullptr;
    const acc* lse_p = lse.data_ptr<acc>();
    const acc* ent = entropy.data_ptr<acc>();
    scalar_t* g0 = grad.data_ptr<scalar_t>();
    at::parallel_for(0, N, 1, [&](int64_t begin, int64_t end) {
      Scratch<acc> scratch;
      for (int64_t i = begin; i < end; ++i) {
        scalar_t* g = g0 + i * V;
        const int64_t y = idx[i];
        if (y == ignore_index) {
          zero_row(g, V);
          continue;
        }
        const acc l = lse_p[i], H = ent[i];
        // the fast exp would not carry a NaN lse into the row; a row without a distribution has no gradient
        if (y < 0 || y >= V || std::isnan(l) || std::isnan(H)) {
          fill_row(g, V, std::numeric_limits<double>::quiet_NaN());
          continue;
        }
        acc* buf = same ? nullptr : scratch.get(2 * V);
        const acc* xs = row_values<scalar_t, acc>(x0 + i * row_stride, V, acc(0), buf);
        acc* dst = same ? reinterpret_cast<acc*>(g) : buf + V;  // fp32 with grad_out = logits: dst == xs
        const acc z_y = xs[y] * inv_t;  // read before the sweep overwrites it
        const acc k = go[i] * inv_t, kh = has_gh ? gh[i] * inv_t : acc(0);
        // dz_j = -p_j (k + kh (log p_j + H)) off the target, p_j = exp(z_j - lse); 0 where p_j = 0
        const Vec it(inv_t), sh(-l), kv(k), khv(kh), hv(H), zero(acc(0));
        auto chunk = [&](int64_t j, int64_t n) {
          const Vec logp = at::vec::fmadd(Vec::loadu(xs + j, n), it, sh);
          const Vec p = logp.exp_u20();
          const Vec gj = zero - p * at::vec::fmadd(khv, logp + hv, kv);
          Vec::blendv(gj, zero, p == zero).store(dst + j, n);
        };
        for_each_vector<acc>(V, chunk);
        const acc logp_y = z_y - l, p_y = std::exp(logp_y);
        dst[y] = k - (p_y > acc(0) ? p_y * (k + kh * (logp_y + H)) : acc(0));
        if constexpr (!same) store_row<scalar_t, acc>(g, dst, V);
      }
    });
  });
  if (grad_out.has_value()) return at::empty({0}, logits.options());
  return grad;
}

}  // namespace

TORCH_LIBRARY_IMPL(fastft, CPU, m) {
  m.impl("full_kl_fwd_kernel", &full_kl_fwd_cpu);
  m.impl("full_kl_bwd_kernel", &full_kl_bwd_cpu);
  m.impl("selective_log_softmax_fwd_kernel", &selective_log_softmax_fwd_cpu);
  m.impl("selective_log_softmax_bwd_kernel", &selective_log_softmax_bwd_cpu);
}

}  // namespace fastft
