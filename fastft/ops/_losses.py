"""What the loss ops (cross_entropy, linear_cross_entropy, full_kl, linear_full_kl) share: their
kernels per backend, the reduction factor, the in-place scaling of fused gradients, the options of
cross-entropy, and one chunk policy for the heads that never hold the whole logits."""
from __future__ import annotations

import os
from types import SimpleNamespace
from typing import Optional

import torch
from torch import Tensor

from .checks import check_number, check_reduction, check_tensor
from ._define import accumulator_dtype, extension_kernels, triton_kernels

# The kernel sets of the loss ops, one binder per backend (fastft.backend.Backend). "cpp" and "cuda" call the
# same torch.ops.fastft.*_kernel schemas: the dispatcher routes by the tensors' device to the CPU (csrc/cpu)
# or CUDA (csrc/cuda) implementation.
#   cross-entropy  ce_fwd, ce_bwd, scale_ (grad *= scale unless scale == 1). ce_fwd and ce_bwd take ``out=``,
#                  the gradient's buffer, on every backend; it may be the logits themselves (contiguous), which
#                  then hold the gradient when the call returns.
#   KL             kl_fwd, kl_bwd, scale_.
#   selective log-softmax (+ entropy)  fwd(logits, index, T, ignore_index) -> (logp, lse, entropy),
#                  bwd(grad_logp, grad_entropy|None, logits, index, lse, entropy, T, ignore_index, out=None),
#                  ``out=`` as cross-entropy's.


def ce_extension_kernels(backend) -> SimpleNamespace:
    fwd = backend.extension_kernel("cross_entropy_fwd_kernel")
    bwd = backend.extension_kernel("cross_entropy_bwd_kernel")

    # The C++/CUDA kernels take the gradient's buffer as grad_out and then return an empty third output
    # (a schema output may not alias an input); ce_fwd/ce_bwd return the buffer, as the Triton launchers do.
    def ce_fwd(logits, target, weight, grad_scale, *options, out=None):
        loss, lse, grad = fwd(logits, target, weight, grad_scale, *options, out)
        return loss, lse, grad if out is None else out

    def ce_bwd(grad_loss, logits, target, weight, lse, *options, out=None):
        grad = bwd(grad_loss, logits, target, weight, lse, *options, out)
        return grad if out is None else out

    return SimpleNamespace(ce_fwd=ce_fwd, ce_bwd=ce_bwd, scale_=backend.extension_kernel("scale_if_not_one_kernel_"))


ce_triton_kernels = triton_kernels("cross_entropy", ce_fwd="cross_entropy_fwd", ce_bwd="cross_entropy_bwd",
                                   scale_="scale_if_not_one_")
kl_extension_kernels = extension_kernels(kl_fwd="full_kl_fwd_kernel", kl_bwd="full_kl_bwd_kernel",
                                         scale_="scale_if_not_one_kernel_")


def kl_triton_kernels(backend) -> SimpleNamespace:
    kl = triton_kernels("kl", kl_fwd="full_kl_fwd", kl_bwd="full_kl_bwd")(backend)
    kl.scale_ = ce_triton_kernels(backend).scale_  # one in-place scaling kernel for every fused loss
    return kl


# The ignore_index of a selective log-softmax call that ignores no row (the int64 minimum: no token id).
NO_IGNORE_INDEX = -(2 ** 63)


def log_softmax_extension_kernels(backend) -> SimpleNamespace:
    fwd = backend.extension_kernel("selective_log_softmax_fwd_kernel")
    bwd = backend.extension_kernel("selective_log_softmax_bwd_kernel")

    def run_bwd(grad_logp, grad_entropy, logits, index, lse, entropy, temperature, ignore_index, out=None):
        grad = bwd(grad_logp, grad_entropy, logits, index, lse, entropy, temperature, ignore_index, out)
        return grad if out is None else out  # the schema's result is empty when out is given (see ce_extension_kernels)

    return SimpleNamespace(fwd=fwd, bwd=run_bwd)


log_softmax_triton_kernels = triton_kernels("kl", fwd="selective_log_softmax_fwd", bwd="selective_log_softmax_bwd")


# The logit soft cap of the selective log-softmax ops (Gemma-2/3's final_logit_softcapping), applied around the
# kernels rather than inside them, so every backend gets it: forward caps the logits in hand, backward recomputes
# the cap and multiplies the kernel's gradient (with respect to the capped logits) by the cap's derivative.


def softcap_(logits: Tensor, softcap: float) -> Tensor:
    """logits <- softcap * tanh(logits / softcap), in place (then / temperature in the kernel: torch's order)."""
    return logits.div_(softcap).tanh_().mul_(softcap)


def softcap_with_derivative(logits: Tensor, softcap: float, *, capped_out: Tensor, derivative_out: Tensor) -> Tensor:
    """capped_out <- softcap_(logits) (rounded as the forward's, so it matches the saved statistics; it may be
    ``logits`` itself) and derivative_out <- 1 - tanh(u)^2, u = logits / softcap. derivative_out has the
    accumulation dtype (fp32 for half-precision logits): u rounded to bf16 costs the derivative u * 2^-8 of
    relative error (2% at u = 5; measured: bf16 head gradients 1.3x torch's own error instead of 0.7x). It is
    computed as cosh(u)^-2: 1 - t^2 from a rounded t cancels near saturation, cosh(u)^-2 keeps its relative
    precision and is 0 where cosh overflows (|u| > ~89), the rounded answer. Returns capped_out."""
    derivative_out.copy_(logits)
    if capped_out is not logits:
        capped_out.copy_(logits)
    softcap_(capped_out, softcap)
    derivative_out.div_(softcap).cosh_().pow_(-2)
    return capped_out


def scale_in_place(scale_):
    """(grad, upstream 0-dim gradient) -> None with the kernel set's ``scale_``: grad *= upstream, touching
    nothing when it is exactly 1."""

    def run(grad: Tensor, grad_output: Tensor) -> None:
        scale_(grad, grad_output.detach().reshape(()).to(accumulator_dtype(grad.dtype)))

    return run


def scale_rows_in_place(grad: Tensor, grad_output: Tensor) -> None:
    """grad[i] *= grad_output[i] (reduction "none": one upstream gradient per row)."""
    grad.mul_(grad_output.reshape(-1, 1).to(grad.dtype))


def mean_scale(counted: Tensor, denominator: Tensor, reduction: str) -> Tensor:
    """0-dim factor from the sum of row losses to the reduced loss, on the device (no host sync): 1 for
    "sum" and "none", 1/denominator for "mean", and 0 when no row is counted (an all-ignored batch gives
    loss 0 and a zero gradient; torch gives NaN). The test is the count of counted rows, not the sign of
    the denominator: negative class weights give a negative denominator, as in torch."""
    if reduction != "mean":
        return torch.ones((), dtype=denominator.dtype, device=denominator.device)
    any_counted = counted.any()
    safe = torch.where(any_counted, denominator, torch.ones_like(denominator))
    return torch.where(any_counted, 1.0 / safe, torch.zeros_like(denominator))


def ce_reduction_scale(target: Tensor, weight: Optional[Tensor], ignore_index: int, reduction: str,
                       dtype: torch.dtype = torch.float32) -> Tensor:
    """mean_scale for cross-entropy: the denominator is sum(w_y) over counted rows (the count without weights)."""
    counted = target != ignore_index
    if reduction != "mean":
        return mean_scale(counted, torch.ones((), dtype=dtype, device=target.device), reduction)
    if weight is None:
        denom = counted.sum(dtype=dtype)
    else:
        safe_t = torch.where(counted, target, torch.zeros_like(target)).clamp_(0, weight.numel() - 1)
        denom = (weight.to(dtype)[safe_t] * counted).sum()
    return mean_scale(counted, denom, reduction)


def count_reduction_scale(mask: Optional[Tensor], n: int, reduction: str, dtype: torch.dtype, device) -> Tensor:
    """mean_scale over tokens: the denominator is the number of counted (mask True) rows."""
    counted = mask if mask is not None else torch.ones((n,), dtype=torch.bool, device=device)
    return mean_scale(counted, counted.sum(dtype=dtype), reduction)


def autocast_operands(*tensors: Optional[Tensor]) -> tuple:
    """Under torch.autocast, the GEMM operands cast as F.linear would cast them (fp64 stays), and the
    loss dtype autocast gives a loss (fp32); outside it the operands unchanged and None. Shared by the
    linear heads, whose GEMMs run in the operands' dtype."""
    device_type = next(t.device.type for t in tensors if t is not None)
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return (*tensors, None)
    dtype = torch.get_autocast_dtype(device_type)

    def cast(t):
        return t.to(dtype) if t is not None and t.is_floating_point() and t.dtype != torch.float64 else t

    return (*(cast(t) for t in tensors), torch.float32)


def check_ce_options(weight, num_classes: int, device, ignore_index, reduction, label_smoothing, z_loss,
                     softcap) -> None:
    """The cross-entropy options (shared by cross_entropy and linear_cross_entropy)."""
    if weight is not None:
        check_tensor("weight", weight)
        if weight.dim() != 1 or weight.shape[0] != num_classes:
            raise ValueError(f"weight (class weights) must have shape ({num_classes},), one per class, got "
                             f"{tuple(weight.shape)}")
        if not weight.is_floating_point():
            raise TypeError(f"weight must be a floating-point tensor, got {weight.dtype}")
        if weight.device != device:
            raise ValueError(f"weight is on {weight.device} but input is on {device}")
        if weight.requires_grad and torch.is_grad_enabled():
            raise TypeError("weight (class weights) requires grad, but the loss is not differentiable with respect "
                            "to it (as torch's cross_entropy); pass weight.detach()")
    check_reduction(reduction)
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    check_number("label_smoothing", label_smoothing, low=0.0, high=1.0)
    check_number("z_loss", z_loss, low=0.0)
    if softcap is not None:
        check_number("softcap", softcap, low=0.0, low_open=True)


# ------------------------------------------------------------------------------------------------
# The chunk policy of the linear heads (linear_cross_entropy, linear_full_kl)
# ------------------------------------------------------------------------------------------------

DEFAULT_CHUNK_BYTES = {"cpu": 64 << 20, "cuda": 512 << 20}


MIN_CHUNK_BYTES = 64 << 20


def chunk_rows(n: int, v: int, dtype: torch.dtype, device_type: str, buffers_per_row: int, chunk_size: int,
               grad_w_bytes: int = 0) -> int:
    """Token rows per chunk: ``chunk_size`` when > 0, else as many as fit the byte budget of the
    [rows, v] buffers alive at once (FASTFT_LCE_CHUNK_BYTES; default 64 MiB on CPU, 512 MiB on CUDA).
    ``grad_w_bytes``: the size of a weight gradient the caller accumulates over the chunks; on CUDA the
    default budget is then at most a sixth of it (at least MIN_CHUNK_BYTES), so the chunk adds little to
    the gradients' own memory (the plan in fastft/ops/linear_cross_entropy.py)."""
    if chunk_size > 0:
        return max(1, min(chunk_size, n))
    env = os.environ.get("FASTFT_LCE_CHUNK_BYTES")
    try:
        budget = int(env) if env else DEFAULT_CHUNK_BYTES.get(device_type, 512 << 20)
    except ValueError:
        raise ValueError(f"FASTFT_LCE_CHUNK_BYTES must be a whole number of bytes, got {env!r}") from None
    if not env and device_type == "cuda" and grad_w_bytes > 0:
        budget = min(budget, max(MIN_CHUNK_BYTES, grad_w_bytes // 6))
    if budget <= 0:
        raise ValueError(f"FASTFT_LCE_CHUNK_BYTES must be positive, got {env!r}")
    row_bytes = max(1, v * torch.empty((), dtype=dtype).element_size() * buffers_per_row)
    rows = max(1, budget // row_bytes)
    if rows >= 64:
        rows -= rows % 16  # GEMM-friendly M
    return max(1, min(rows, n))


def counted_rows(counted: Optional[Tensor]) -> Optional[Tensor]:
    """Indices of the counted rows when some but not all are counted, on CPU; else None.

    A row that is not counted (padding, prompt tokens) has zero loss and gradient, so its share of the
    GEMMs is skipped. Not on CUDA: finding the rows is a host sync; there every row is computed and the
    kernels skip the uncounted ones."""
    if counted is None or counted.device.type != "cpu":
        return None
    idx = counted.nonzero().squeeze(1)
    return idx if 0 < idx.numel() < counted.numel() else None


def scatter_rows(rows: Tensor, idx: Tensor, n: int) -> Tensor:
    full = rows.new_zeros((n,) + tuple(rows.shape[1:]))
    return full.index_copy_(0, idx, rows)


class HeadGrads:
    """The gradients of one linear head (hidden rows x, weight W, bias b) from each chunk's logit
    gradient, only those wanted, with no buffer beyond the gradients themselves:

      grad_x  each chunk's rows written straight into their slice (one GEMM per chunk);
      grad_W  one [V, H] tensor in the weight's dtype: the first chunk's GEMM writes it, every later
              one accumulates onto it in place (addmm_, beta = 1). Each GEMM sums its chunk in fp32 and
              rounds once, so a half-precision grad_W is rounded once per chunk rather than once (as
              Liger accumulates; tests/ops/test_linear_cross_entropy.py measures it: within 2x torch's
              one-GEMM error vs an fp64 truth up to 4 chunks, 2.8x at 8 in fp16), and there is no
              fp32 copy of grad_W, no per-chunk partial product and no final cast;
      grad_b  an fp32 (fp64 for fp64) [V] accumulator, cast once at the end (V values: negligible).
    """

    def __init__(self, x: Tensor, weight: Tensor, bias: Optional[Tensor], need_x: bool, need_w: bool,
                 need_b: bool) -> None:
        n, h = x.shape
        v = weight.shape[0]
        self.weight, self.need_x, self.need_w, self.need_b = weight, need_x, need_w, need_b
        self.grad_x = torch.empty((n, h), dtype=x.dtype, device=x.device) if need_x else None
        self.grad_w = torch.empty((v, h), dtype=weight.dtype, device=x.device) if need_w else None
        self.first_w = True
        b_acc = torch.float64 if bias is not None and bias.dtype == torch.float64 else torch.float32
        self.grad_b = torch.zeros((v,), dtype=b_acc, device=x.device) if need_b else None
        self.bias_dtype = bias.dtype if bias is not None else None

    def add(self, start: int, end: int, x_chunk: Tensor, dlogits: Tensor) -> None:
        if self.need_x:
            torch.mm(dlogits, self.weight, out=self.grad_x[start:end])
        if self.need_w:
            if self.first_w:
                torch.mm(dlogits.t(), x_chunk, out=self.grad_w)
            else:
                self.grad_w.addmm_(dlogits.t(), x_chunk)
            self.first_w = False
        if self.need_b:
            self.grad_b.add_(dlogits.sum(0, dtype=self.grad_b.dtype))

    def finish(self, like: Tensor) -> tuple:
        """(grad_x, grad_W, grad_b), each a distinct empty (0,) tensor when not wanted (outputs may not alias)."""
        gx = self.grad_x if self.need_x else like.new_empty((0,))
        if self.need_w:
            if self.first_w:  # no rows at all
                self.grad_w.zero_()
            gw = self.grad_w
        else:
            gw = like.new_empty((0,))
        gb = self.grad_b.to(self.bias_dtype) if self.need_b else like.new_empty((0,))
        return gx, gw, gb


def logits_into(out: Tensor, x_chunk: Tensor, weight: Tensor, bias: Optional[Tensor] = None) -> Tensor:
    if bias is None:
        return torch.mm(x_chunk, weight.t(), out=out)
    return torch.addmm(bias, x_chunk, weight.t(), out=out)
