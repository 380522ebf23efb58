"""Triton KL kernels: full-vocabulary KL(pi || rho) of two logit rows, and the selective log-softmax.

full_kl, per counted row, a = x_p / T, b = x_r / T, pi = softmax(a), rho = softmax(b):
    KL = sum_j pi_j (a_j - b_j) - lse(a) + lse(b) = c - lse_p + lse_r
    dKL/dx_p,j = pi_j ((a_j - b_j) - c) / T          (log pi - log rho - KL = (a - b) - c)
    dKL/dx_r,j = (rho_j - pi_j) / T
One read pass per row over both models' logits with the online softmax (Milakov & Gimelshein 2018),
kept per lane: every lane of the BLOCK-wide tile carries its own running maxima m_a, m_b and sums
S_p = sum exp(a - m_a), S_r = sum exp(b - m_b), D = sum exp(a - m_a) (a - b) over the columns it sees
(one exp per element and side: the smaller of the old maximum and the new value against the larger),
and the lanes are combined ONCE per row at the end (no block reductions inside the loop). Then
c = D / S_p.
With reverse_weight w > 0 (HAS_REVERSE) the row loss is (1 - w) KL(pi || rho) + w KL(rho || pi); the same
sweep also keeps D_r = sum exp(b - m_b) (b - a) per lane (c_r = D_r / S_r, KL_rev = c_r - lse_r + lse_p) and
    dL/dx_p,j = ((1 - w) pi_j ((a_j - b_j) - c) + w (pi_j - rho_j)) / T
    dL/dx_r,j = ((1 - w) (rho_j - pi_j) + w rho_j ((b_j - a_j) - c_r)) / T
(a weight-0 direction is left out, so its +inf or NaN does not leak through 0 * inf; rho_j = 0 terms are 0).
The gradient, when wanted, is a second sweep over the same rows (usually still in L2 on a
GPU). Tokens with pi_j = 0 (x_p,j = -inf) count 0, not 0 * inf = NaN. Masked rows load nothing and
store zeros.

Hostile values (the contract every backend keeps; tests/ops/test_hostile_kl.py):
  - -inf logits anywhere (leading, trailing, interleaved blocks, all but one token) are ordinary: a
    lane or a row that has seen only -inf so far has sum 0, never exp(-inf - -inf) = NaN.
  - NaN anywhere in a row, +inf, or a row that is all -inf (no distribution) -> that row's KL / logp is
    NaN and its policy gradient row (and, for NaN KL, the reference gradient row) is all NaN.
  - The policy has mass where the reference logit is -inf -> KL = +inf (the math's value); the policy
    gradient row is NaN (an infinite loss has none), the reference gradient (rho - pi) / T stays finite.
  - Two directions (w > 0): each direction of weight > 0 keeps this contract on its own, the reverse one with
    the roles swapped (KL_rev = +inf where rho has mass on a policy -inf -> a NaN reference gradient row).

selective_log_softmax, per row with z = x / T, p = softmax(z), index y (rows with y == ignore_index are not
read: logp = lse = entropy = 0 and a zero gradient row; another y outside [0, V) gives NaN logp / gradient):
    logp = z_y - lse(z),   H = -sum_j p_j log p_j = lse - sum_j p_j z_j = log S - D / S
    with S = sum_j exp(z_j - M), D = sum_j exp(z_j - M) (z_j - M) for the row max M: D rides along the online
    max and sum (_lane_entropy_step), relative to the max, so H does not cancel against it at large logits.
    dz_j = g_logp ([j == y] - p_j) - g_H p_j (log p_j + H)   (d/dx = dz / T; p_j = 0 terms are 0)

Launchers (the signatures fastft.ops.kl calls for backend "triton"; same as the C++ kernels):
  full_kl_fwd(policy, ref, mask, grad_scale, temperature, grad_policy, grad_ref, reverse_weight=0.0)
      -> (kl[N] f32, lse_p[N] f32, lse_r[N] f32, kl_rev[N] f32 | (0,), grad_policy[N, V] | (0,),
          grad_ref[N, V] | (0,))      kl = KL(pi || rho), kl_rev = KL(rho || pi) (only when reverse_weight > 0)
  full_kl_bwd(grad_kl, policy, ref, mask, lse_p, lse_r, kl, temperature, grad_policy, grad_ref, kl_rev=None,
              reverse_weight=0.0) -> (grad_policy | (0,), grad_ref | (0,))
  selective_log_softmax_fwd(logits, index, temperature, ignore_index) -> (logp, lse, entropy: [N] f32)
  selective_log_softmax_bwd(grad_logp, grad_entropy | None, logits, index, lse, entropy, temperature,
                            ignore_index, out=None) -> grad[N, V] (out, which may be the logits, when given)
Values are loaded, cast to fp32, computed on and cast on store (bf16 arithmetic is wrong in the
interpreter). Row offsets are int64 (N * V passes 2**31 at LLM sizes).
"""
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl
from torch import Tensor
from ._common import (bf16_by_hand, cast_for_store, device_ctx, gradient_buffer, rest_offsets, row_alignment,
                      row_config, row_split, write_row_map)


__all__ = ["full_kl_fwd", "full_kl_bwd", "selective_log_softmax_fwd", "selective_log_softmax_bwd", "lane_stats_config"]


@triton.jit
def _lane_online_step(m, x):
    """One online-softmax step per lane: (new max, factor for the lane's old sums, weight of x), one exp.
    A lane that holds only -inf so far, or an x of -inf, gives weight 0 (never exp(-inf - -inf) = NaN);
    a NaN x gives a NaN weight (it must poison the row); two +inf in a lane give NaN (inf - inf)."""
    grow = x > m
    hi = tl.where(grow, x, m)
    lo = tl.where(grow, m, x)
    t = tl.exp(tl.where(lo == float("-inf"), float("-inf"), lo - hi))
    return hi, tl.where(grow, t, 1.0), tl.where(grow, 1.0, t)


@triton.jit
def _lane_weights(m):
    """exp(m_lane - M) for the row maximum M over lanes, and M. A row with no finite logit (M = -inf)
    gives weights 0 (sum 0: lse = -inf, KL / logp NaN); a +inf lane gives NaN (exp(inf - inf))."""
    row_max = tl.max(m, axis=0)
    return tl.exp(m - tl.where(row_max == float("-inf"), 0.0, row_max)), row_max


@triton.jit
def _lane_rescale(d, w):
    # D * w where w underflowed to 0 is 0, also when D is +inf (the reference banned a token the policy
    # uses, in a lane whose mass another lane's maximum makes negligible).
    return tl.where(w > 0.0, d * w, 0.0)


@triton.jit
def _kl_grad_block(xp, xr, lse_p, lse_r, inv_t, k_p, c, k_r, GRAD_POLICY: tl.constexpr, GRAD_REF: tl.constexpr):
    """Gradients of one block of raw fp32 logits: k_p * pi * ((x_p - x_r)/T - c) and k_r * (rho - pi)."""
    pi = tl.exp(xp * inv_t - lse_p)
    gp = pi
    gr = pi
    if GRAD_POLICY:
        gp = tl.where(pi > 0.0, k_p * pi * ((xp - xr) * inv_t - c), 0.0)
        gp = tl.where(c - c == 0.0, gp, float("nan"))  # c inf or NaN: KL has no gradient (see the top)
    if GRAD_REF:
        gr = k_r * (tl.exp(xr * inv_t - lse_r) - pi)
        kl = c - lse_p + lse_r
        gr = tl.where(kl == kl, gr, float("nan"))  # a NaN KL poisons the whole row, not only some entries
    return gp, gr


@triton.jit
def _kl_mixed_grad_block(xp, xr, lse_p, lse_r, inv_t, k, c, c_r, kl_rev, w,
                         GRAD_POLICY: tl.constexpr, GRAD_REF: tl.constexpr):
    """k * dL/dx of the weighted two-direction row loss (the top): pi (rho) products are 0 where pi (rho) is 0,
    a weight-0 direction adds nothing, and each direction of weight > 0 poisons as the one-direction kernel."""
    pi = tl.exp(xp * inv_t - lse_p)
    rho = tl.exp(xr * inv_t - lse_r)
    wf = 1.0 - w
    no_fwd = wf == 0.0  # w == 1: KL(pi || rho) has weight 0 and must not leak its inf / NaN
    kl = c - lse_p + lse_r
    gp = pi
    gr = pi
    if GRAD_POLICY:
        inner = tl.where(no_fwd, w, wf * ((xp - xr) * inv_t - c) + w)
        gp = k * (tl.where(pi > 0.0, pi * inner, 0.0) - w * rho)
        gp = tl.where(((c - c == 0.0) | no_fwd) & (kl_rev == kl_rev), gp, float("nan"))
    if GRAD_REF:
        gr = k * (tl.where(rho > 0.0, rho * (w * ((xr - xp) * inv_t - c_r) + wf), 0.0) - wf * pi)
        gr = tl.where(((kl == kl) | no_fwd) & (c_r - c_r == 0.0), gr, float("nan"))
    return gp, gr


@triton.jit
def _write_kl_grad_rows(
    p_row, r_row, gp_row, gr_row, V, counted, lse_p, lse_r, inv_t, k, c, c_r, kl_rev, w,
    GRAD_POLICY: tl.constexpr, GRAD_REF: tl.constexpr, HAS_REVERSE: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """The gradient sweep over one row pair, shared by forward's fused gradient and backward.
    Masked rows load nothing and store zeros."""
    cols = tl.arange(0, BLOCK)
    for start in range(0, V, BLOCK):
        offs = start + cols
        in_row = offs < V
        ld = in_row & counted
        xp = tl.load(p_row + offs, mask=ld, other=0.0).to(tl.float32)
        xr = tl.load(r_row + offs, mask=ld, other=0.0).to(tl.float32)
        if HAS_REVERSE:
            gp, gr = _kl_mixed_grad_block(xp, xr, lse_p, lse_r, inv_t, k, c, c_r, kl_rev, w, GRAD_POLICY, GRAD_REF)
        else:
            gp, gr = _kl_grad_block(xp, xr, lse_p, lse_r, inv_t, k, c, k, GRAD_POLICY, GRAD_REF)
        if GRAD_POLICY:
            gp = tl.where(counted, gp, 0.0)
            tl.store(gp_row + offs, cast_for_store(gp, gp_row.dtype.element_ty, BF16_RNE_BY_HAND), mask=in_row)
        if GRAD_REF:
            gr = tl.where(counted, gr, 0.0)
            tl.store(gr_row + offs, cast_for_store(gr, gr_row.dtype.element_ty, BF16_RNE_BY_HAND), mask=in_row)


@triton.jit
def _full_kl_fwd_kernel(
    policy_ptr, stride_p, ref_ptr, stride_r, mask_ptr, grad_scale_ptr,
    kl_ptr, lse_p_ptr, lse_r_ptr, kl_rev_ptr, grad_p_ptr, grad_r_ptr,
    V, inv_t, w,
    HAS_MASK: tl.constexpr, GRAD_POLICY: tl.constexpr, GRAD_REF: tl.constexpr, HAS_REVERSE: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = policy_ptr + row * stride_p
    r_row = ref_ptr + row * stride_r
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    else:
        counted = True
    cols = tl.arange(0, BLOCK)
    m_a = tl.full((BLOCK,), float("-inf"), tl.float32)
    m_b = tl.full((BLOCK,), float("-inf"), tl.float32)
    s_p = tl.zeros((BLOCK,), tl.float32)
    s_r = tl.zeros((BLOCK,), tl.float32)
    d = tl.zeros((BLOCK,), tl.float32)
    d_r = tl.zeros((BLOCK,), tl.float32)
    for start in range(0, V, BLOCK):
        offs = start + cols
        ld = (offs < V) & counted
        xp = tl.load(p_row + offs, mask=ld, other=float("-inf")).to(tl.float32)
        xr = tl.load(r_row + offs, mask=ld, other=float("-inf")).to(tl.float32)
        a = xp * inv_t
        b = xr * inv_t
        m_a, alpha, e = _lane_online_step(m_a, a)
        m_b, beta, f = _lane_online_step(m_b, b)
        s_p = s_p * alpha + e
        s_r = s_r * beta + f
        d = _lane_rescale(d, alpha) + tl.where(e > 0.0, e * (a - b), 0.0)
        if HAS_REVERSE:
            d_r = _lane_rescale(d_r, beta) + tl.where(f > 0.0, f * (b - a), 0.0)
    # The lanes' statistics, combined once per row.
    lane_wa, m_a = _lane_weights(m_a)
    lane_wb, m_b = _lane_weights(m_b)
    s_p = tl.sum(s_p * lane_wa, axis=0)
    s_r = tl.sum(s_r * lane_wb, axis=0)
    d = tl.sum(_lane_rescale(d, lane_wa), axis=0)
    s_p = tl.where(counted, s_p, 1.0)  # a masked row read nothing: keep its (discarded) stats finite
    s_r = tl.where(counted, s_r, 1.0)
    lse_p = m_a + tl.log(s_p)
    lse_r = m_b + tl.log(s_r)
    c = d / s_p
    kl = c - lse_p + lse_r
    tl.store(kl_ptr + row, tl.where(counted, kl, 0.0))
    tl.store(lse_p_ptr + row, tl.where(counted, lse_p, 0.0))
    tl.store(lse_r_ptr + row, tl.where(counted, lse_r, 0.0))
    c_r = c
    kl_rev = kl
    if HAS_REVERSE:
        c_r = tl.sum(_lane_rescale(d_r, lane_wb), axis=0) / s_r
        kl_rev = c_r - lse_r + lse_p
        tl.store(kl_rev_ptr + row, tl.where(counted, kl_rev, 0.0))

    if GRAD_POLICY or GRAD_REF:
        k = tl.load(grad_scale_ptr) * inv_t
        _write_kl_grad_rows(p_row, r_row, grad_p_ptr + row * V, grad_r_ptr + row * V, V, counted, lse_p, lse_r,
                            inv_t, k, c, c_r, kl_rev, w, GRAD_POLICY, GRAD_REF, HAS_REVERSE, BF16_RNE_BY_HAND, BLOCK)


@triton.jit
def _full_kl_bwd_kernel(
    grad_kl_ptr, policy_ptr, stride_p, ref_ptr, stride_r, mask_ptr, lse_p_ptr, lse_r_ptr, kl_ptr, kl_rev_ptr,
    grad_p_ptr, grad_r_ptr, V, inv_t, w,
    HAS_MASK: tl.constexpr, GRAD_POLICY: tl.constexpr, GRAD_REF: tl.constexpr, HAS_REVERSE: tl.constexpr,
    BF16_RNE_BY_HAND: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    p_row = policy_ptr + row * stride_p
    r_row = ref_ptr + row * stride_r
    if HAS_MASK:
        counted = tl.load(mask_ptr + row) != 0
    else:
        counted = True
    lse_p = tl.load(lse_p_ptr + row)
    lse_r = tl.load(lse_r_ptr + row)
    c = lse_p - lse_r + tl.load(kl_ptr + row)
    c_r = c
    kl_rev = c
    if HAS_REVERSE:
        kl_rev = tl.load(kl_rev_ptr + row)
        c_r = lse_r - lse_p + kl_rev
    k = tl.load(grad_kl_ptr + row) * inv_t
    _write_kl_grad_rows(p_row, r_row, grad_p_ptr + row * V, grad_r_ptr + row * V, V, counted, lse_p, lse_r,
                        inv_t, k, c, c_r, kl_rev, w, GRAD_POLICY, GRAD_REF, HAS_REVERSE, BF16_RNE_BY_HAND, BLOCK)


@triton.jit
def _lane_entropy_step(m, s, d, a):
    """One block of scaled logits a into each lane's running max m, sum S = sum exp(a - m) and entropy
    numerator D = sum exp(a - m) (a - m), kept relative to the lane's max (so it never cancels against the
    max, as sum exp(a - m) a would at logits of 1e4): when m grows to m', D' = alpha (D + (m - m') S) with
    the lane's old sum S, then the new value adds e (a - m'). A lane that has seen only -inf (alpha = 0,
    S = 0) restarts at 0, and e = 0 (a = -inf) adds 0, never 0 * inf. Returns (m', S', D')."""
    m_new, alpha, e = _lane_online_step(m, a)
    shift = tl.where(m < m_new, m - m_new, 0.0)
    d = tl.where(alpha > 0.0, alpha * (d + shift * s), 0.0)
    return m_new, s * alpha + e, d + tl.where(e > 0.0, e * (a - m_new), 0.0)


@triton.jit
def _selective_log_softmax_fwd_kernel(
    logits_ptr, stride_row, index_ptr, logp_ptr, lse_ptr, entropy_ptr, V, inv_t, ignore_index,
    VEC: tl.constexpr, BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_start = row * stride_row
    x_row = logits_ptr + x_start
    y = tl.load(index_ptr + row)
    counted = y != ignore_index
    cols = tl.arange(0, BLOCK)
    m = tl.full((BLOCK,), float("-inf"), tl.float32)
    s = tl.zeros((BLOCK,), tl.float32)
    d = tl.zeros((BLOCK,), tl.float32)
    # Per-lane statistics, as in _full_kl_fwd_kernel, over the row in row_split's order: whole aligned blocks
    # (16-byte loads at any V), then the masked head and tail; a lane's statistics do not depend on which
    # columns it saw. Ignored rows load nothing (-inf everywhere: their stats stay empty).
    head, body_end, rest = row_split(x_start, V, VEC, BLOCK)
    full = cols < BLOCK
    for start in range(head, body_end, BLOCK):
        a = tl.load(logits_ptr + tl.multiple_of(x_start + start, VEC) + cols, mask=full & counted,
                    other=float("-inf")).to(tl.float32) * inv_t
        m, s, d = _lane_entropy_step(m, s, d, a)
    for start in range(0, rest, BLOCK):
        offs, mask = rest_offsets(start, cols, head, body_end, rest)
        a = tl.load(x_row + offs, mask=mask & counted, other=float("-inf")).to(tl.float32) * inv_t
        m, s, d = _lane_entropy_step(m, s, d, a)
    lane_w, row_max = _lane_weights(m)
    # each lane's D moved from its own max to the row's: w (D + (m_lane - M) S_lane); empty lanes add 0
    d = tl.sum(tl.where(lane_w > 0.0, lane_w * (d + tl.where(lane_w > 0.0, m - row_max, 0.0) * s), 0.0), axis=0)
    s = tl.sum(s * lane_w, axis=0)
    s = tl.where(counted, s, 1.0)  # an ignored row read nothing: keep its (discarded) stats finite
    lse = row_max + tl.log(s)
    entropy = tl.log(s) - d / s  # H = lse - sum_j p_j a_j = log S - D / S
    in_range = (y >= 0) & (y < V)
    x_y = tl.load(x_row + tl.where(in_range, y, 0), mask=counted, other=0.0).to(tl.float32)
    tl.store(lse_ptr + row, tl.where(counted, lse, 0.0))
    tl.store(entropy_ptr + row, tl.where(counted, entropy, 0.0))
    tl.store(logp_ptr + row, tl.where(counted, tl.where(in_range, x_y * inv_t - lse, float("nan")), 0.0))


@triton.jit
def _selective_log_softmax_grad_block(x, offs, mask, args, FLAGS: tl.constexpr):
    """One block of the gradient from raw fp32 logits x (columns offs): see _selective_log_softmax_bwd_kernel
    (write_row_map's block_fn)."""
    y, k, lse, inv_t, k_h, h = args
    HAS_GRAD_ENTROPY: tl.constexpr = FLAGS[0]
    z = x * inv_t
    p = tl.exp(z - lse)
    g = k * (tl.where(offs == y, 1.0, 0.0) - p)
    if HAS_GRAD_ENTROPY:
        g -= tl.where(p > 0.0, k_h * p * (z - lse + h), 0.0)
    return g


@triton.jit
def _selective_log_softmax_bwd_kernel(
    grad_logp_ptr, grad_entropy_ptr, logits_ptr, stride_row, index_ptr, lse_ptr, entropy_ptr, grad_ptr, V, inv_t,
    ignore_index, HAS_GRAD_ENTROPY: tl.constexpr, BF16_RNE_BY_HAND: tl.constexpr, VEC: tl.constexpr,
    GRAD_ALIGNED_LIKE_LOGITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """dz_j = (1/T) [g_logp ([j == y] - p_j) - g_H p_j (log p_j + H)]; the p_j = 0 terms are 0 (log p_j = -inf).
    grad_ptr may be the logits themselves: each element is read before its gradient is stored."""
    row = tl.program_id(0).to(tl.int64)
    y = tl.load(index_ptr + row)
    counted = y != ignore_index
    in_range = (y >= 0) & (y < V)
    k = tl.where(in_range, tl.load(grad_logp_ptr + row) * inv_t, float("nan"))
    k = tl.where(counted, k, 0.0)
    lse = tl.load(lse_ptr + row)
    k_h = 0.0
    h = 0.0
    if HAS_GRAD_ENTROPY:
        k_h = tl.where(counted, tl.load(grad_entropy_ptr + row) * inv_t, 0.0)
        h = tl.load(entropy_ptr + row)
        k_h = tl.where(h == h, k_h, float("nan"))  # a row without a distribution has no entropy gradient
    # the row in row_split's order (16-byte loads at any V), as the CE kernels write their gradient
    write_row_map(logits_ptr, row * stride_row, grad_ptr, row * V, V, counted, _selective_log_softmax_grad_block,
                  (y, k, lse, inv_t, k_h, h), (HAS_GRAD_ENTROPY,), BF16_RNE_BY_HAND, VEC, GRAD_ALIGNED_LIKE_LOGITS, BLOCK)


# ------------------------------------------------------------------------------------------------
# Launchers
# ------------------------------------------------------------------------------------------------


def lane_stats_config(V: int, device: torch.device) -> Tuple[int, int]:
    """(BLOCK, num_warps) of the kernels that keep per-lane statistics (full_kl forward, selective
    log-softmax forward); the gradient-only kernels use kernels._common.row_config.

    On CUDA, 2048 columns over 8 warps: 8 columns per thread, one 16-byte load per row and sweep, and
    the five per-lane fp32 accumulators of the KL forward in registers. Compiled for sm_90 (bf16,
    V = 128256): 76 registers x 256 threads -> 3 CTAs per SM, no spills (8192 x 16 warps, the row
    kernels' tile, needed 86 x 512 -> 1 CTA per SM with the block-reduction loop, and 128 registers plus a
    72-byte stack frame with per-lane statistics). Under the interpreter, as row_config: one tile per row."""
    if device.type != "cuda":
        return row_config(V, device)
    block = min(triton.next_power_of_2(V), 2048)
    return block, max(1, min(8, block // 256))


def _check_pair(policy: Tensor, ref: Tensor, mask: Optional[Tensor], name: str) -> Tuple[int, int]:
    if policy.dim() != 2 or policy.shape != ref.shape:
        raise ValueError(f"{name}: logits must both be [N, V], got {tuple(policy.shape)} and {tuple(ref.shape)}")
    if policy.dtype not in (torch.float32, torch.float16, torch.bfloat16) or ref.dtype != policy.dtype:
        raise TypeError(f"{name}: logits must share one of float32, float16, bfloat16, got {policy.dtype}, {ref.dtype}")
    n, v = policy.shape
    if n > 0 and (policy.stride(1) != 1 or ref.stride(1) != 1):
        raise ValueError(f"{name}: logits must have a unit stride on the vocabulary dimension")
    if mask is not None and (mask.shape != (n,) or mask.dtype != torch.bool):
        raise ValueError(f"{name}: mask must be a bool tensor of shape ({n},)")
    return n, v


def _check_reverse_weight(w: float, name: str) -> float:
    w = float(w)
    if not 0.0 <= w <= 1.0:
        raise ValueError(f"{name}: reverse_weight must be in [0, 1], got {w!r}")
    return w


def full_kl_fwd(
    policy: Tensor, ref: Tensor, mask: Optional[Tensor], grad_scale: Optional[Tensor], temperature: float,
    grad_policy: bool, grad_ref: bool, reverse_weight: float = 0.0,
) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """Per-row KL(pi || rho) and both logsumexps (fp32, [N]), KL(rho || pi) per row when ``reverse_weight`` w > 0
    (else an empty (0,) tensor); with ``grad_scale`` (0-dim) also ``grad_scale * dL_i/dlogits`` of the row loss
    L_i = (1 - w) KL(pi || rho) + w KL(rho || pi) for the policy and/or reference (else empty (0,) tensors)."""
    n, v = _check_pair(policy, ref, mask, "full_kl_fwd")
    w = _check_reverse_weight(reverse_weight, "full_kl_fwd")
    device = policy.device
    kl, lse_p, lse_r = (torch.empty(n, dtype=torch.float32, device=device) for _ in range(3))
    kl_rev = torch.empty(n if w > 0 else 0, dtype=torch.float32, device=device)
    want_p = grad_scale is not None and grad_policy
    want_r = grad_scale is not None and grad_ref
    gp = torch.empty((n, v) if want_p else (0,), dtype=policy.dtype, device=device)
    gr = torch.empty((n, v) if want_r else (0,), dtype=policy.dtype, device=device)
    if n == 0:
        return kl, lse_p, lse_r, kl_rev, gp, gr
    scale = grad_scale.reshape(()).to(torch.float32) if grad_scale is not None else kl  # placeholder
    block, num_warps = lane_stats_config(v, device)
    mask_arg = mask.contiguous() if mask is not None else kl  # placeholder, never read
    with device_ctx(policy):
        _full_kl_fwd_kernel[(n,)](
            policy, policy.stride(0), ref, ref.stride(0), mask_arg, scale,
            kl, lse_p, lse_r, kl_rev if w > 0 else kl, gp if want_p else kl, gr if want_r else kl,
            v, 1.0 / float(temperature), w,
            HAS_MASK=mask is not None, GRAD_POLICY=want_p, GRAD_REF=want_r, HAS_REVERSE=w > 0,
            BF16_RNE_BY_HAND=bf16_by_hand(policy), BLOCK=block, num_warps=num_warps,
        )
    return kl, lse_p, lse_r, kl_rev, gp, gr


def full_kl_bwd(
    grad_kl: Tensor, policy: Tensor, ref: Tensor, mask: Optional[Tensor], lse_p: Tensor, lse_r: Tensor, kl: Tensor,
    temperature: float, grad_policy: bool, grad_ref: bool, kl_rev: Optional[Tensor] = None,
    reverse_weight: float = 0.0,
) -> Tuple[Tensor, Tensor]:
    """``grad_kl[i] * dL_i/dlogits`` (L_i as in full_kl_fwd) for the policy and/or reference, from forward's saved
    rows (``kl_rev`` needed when ``reverse_weight`` > 0)."""
    n, v = _check_pair(policy, ref, mask, "full_kl_bwd")
    w = _check_reverse_weight(reverse_weight, "full_kl_bwd")
    if w > 0 and kl_rev is None:
        raise ValueError("full_kl_bwd: reverse_weight > 0 needs forward's kl_rev")
    device = policy.device
    gp = torch.empty((n, v) if grad_policy else (0,), dtype=policy.dtype, device=device)
    gr = torch.empty((n, v) if grad_ref else (0,), dtype=policy.dtype, device=device)
    if n == 0 or not (grad_policy or grad_ref):
        return gp, gr
    f32 = lambda t: t.reshape(n).to(torch.float32).contiguous()  # noqa: E731
    grad_kl, lse_p, lse_r, kl = f32(grad_kl), f32(lse_p), f32(lse_r), f32(kl)
    kl_rev = f32(kl_rev) if w > 0 else kl  # placeholder, never read
    block, num_warps = row_config(v, device)
    mask_arg = mask.contiguous() if mask is not None else kl
    with device_ctx(policy):
        _full_kl_bwd_kernel[(n,)](
            grad_kl, policy, policy.stride(0), ref, ref.stride(0), mask_arg, lse_p, lse_r, kl, kl_rev,
            gp if grad_policy else kl, gr if grad_ref else kl, v, 1.0 / float(temperature), w,
            HAS_MASK=mask is not None, GRAD_POLICY=grad_policy, GRAD_REF=grad_ref, HAS_REVERSE=w > 0,
            BF16_RNE_BY_HAND=bf16_by_hand(policy), BLOCK=block, num_warps=num_warps,
        )
    return gp, gr


def _check_index(logits: Tensor, index: Tensor, name: str) -> Tuple[int, int]:
    if logits.dim() != 2:
        raise ValueError(f"{name}: logits must be [N, V], got {tuple(logits.shape)}")
    if logits.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise TypeError(f"{name}: logits must be float32, float16 or bfloat16, got {logits.dtype}")
    n, v = logits.shape
    if n > 0 and logits.stride(1) != 1:
        raise ValueError(f"{name}: logits must have a unit stride on the vocabulary dimension")
    if index.shape != (n,) or index.dtype != torch.int64:
        raise ValueError(f"{name}: index must be an int64 tensor of shape ({n},)")
    return n, v


def selective_log_softmax_fwd(logits: Tensor, index: Tensor, temperature: float,
                              ignore_index: int) -> Tuple[Tensor, Tensor, Tensor]:
    """(log softmax(logits / T)[index], lse(logits / T), entropy of softmax(logits / T)) per row, fp32 [N]
    each; rows whose index is ``ignore_index`` are not read and give 0, 0, 0."""
    n, v = _check_index(logits, index, "selective_log_softmax_fwd")
    logp, lse, entropy = (torch.empty(n, dtype=torch.float32, device=logits.device) for _ in range(3))
    if n == 0:
        return logp, lse, entropy
    block, num_warps = lane_stats_config(v, logits.device)
    with device_ctx(logits):
        _selective_log_softmax_fwd_kernel[(n,)](
            logits, logits.stride(0), index.contiguous(), logp, lse, entropy, v, 1.0 / float(temperature),
            int(ignore_index), VEC=row_alignment(logits)["VEC"], BLOCK=block, num_warps=num_warps,
        )
    return logp, lse, entropy


def selective_log_softmax_bwd(grad_logp: Tensor, grad_entropy: Optional[Tensor], logits: Tensor, index: Tensor,
                              lse: Tensor, entropy: Tensor, temperature: float, ignore_index: int,
                              out: Optional[Tensor] = None) -> Tensor:
    """``grad_logp[i] * dlogp_i/dlogits + grad_entropy[i] * dH_i/dlogits`` (``grad_entropy`` None: 0) as a
    contiguous [N, V] tensor in logits' dtype: ``out`` when given (it may be ``logits`` itself, contiguous:
    every element is read before its gradient is stored), else a new one. Ignored rows are zero."""
    n, v = _check_index(logits, index, "selective_log_softmax_bwd")
    grad = gradient_buffer(logits, out, "selective_log_softmax_bwd")
    if n == 0:
        return grad
    f32 = lambda t: t.reshape(n).to(torch.float32).contiguous()  # noqa: E731
    lse, entropy = f32(lse), f32(entropy)
    # 4096 x 16 warps on CUDA, as the CE kernels: 8 columns a thread, 32-40 registers (sm_90 / sm_80), 3-4 CTA/SM
    # (8192 x 16 needed 64: 2 CTA/SM); compiled ahead of time, benchmarks/gpu_static.
    block, num_warps = row_config(v, logits.device, cuda_max_block=4096)
    with device_ctx(logits):
        _selective_log_softmax_bwd_kernel[(n,)](
            f32(grad_logp), f32(grad_entropy) if grad_entropy is not None else lse, logits, logits.stride(0),
            index.contiguous(), lse, entropy, grad, v, 1.0 / float(temperature), int(ignore_index),
            HAS_GRAD_ENTROPY=grad_entropy is not None, BF16_RNE_BY_HAND=bf16_by_hand(logits), **row_alignment(logits),
            BLOCK=block, num_warps=num_warps,
        )
    return grad
