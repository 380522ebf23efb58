"""TRL (1.16): its per-token log-prob computations through fastft's ops.

    import fastft.integrations.trl as fastft_trl
    handle = fastft_trl.patch()      # before building the trainer; handle.undo() restores TRL
    print(handle.report())           # how many head calls ran on fastft, how many stayed TRL's, and why

How TRL 1.16 computes log-probs: every trainer (SFT, DPO, GRPO, RLOO, KTO) wraps its models with
``trl.trainer.utils.add_fused_lm_head``; a forward with ``fused_lm_head=True`` runs the backbone and
hands the final hidden states, the head's weight and the labels to ``ChunkedLogProbFunction`` (its own
chunked kernel), which returns per-token log-probs and, on request, entropy / top-1 / mean-logit
statistics. ``selective_log_softmax(logits, index)`` serves the trainers that do build logits.

What :func:`patch` routes:

* ``ChunkedLogProbFunction`` (looked up as ``trl.trainer.utils._ChunkedLogProbFunction``): when only
  ``log_probs`` are asked for -- reference-model passes of GRPO / DPO / RLOO / KTO and the KL term's
  reference log-probs -- they come from ``fastft.ops.linear_cross_entropy(reduction="none")``. TRL's
  transform ``tanh-cap((h W^T + b) * scale) / T`` folds in exactly: input ``h * scale / T``, bias
  ``b * scale / T``, cap ``cap / T``. A call that also asks for the entropy and/or top-1 flags (the
  trained policy in SFT and GRPO: SFTTrainer's loss and its ``entropy`` / ``mean_token_accuracy``
  metrics, GRPO's entropy and entropy bonus) goes to ``fastft.ops.linear_selective_log_softmax``: log-probs
  and entropy from one chunked pass, both differentiable (GRPO's ``entropy_coef != 0`` trains through the
  entropy), the top-1 flags from the logits chunk the forward holds (no extra GEMM). A head with a logit
  softcap (Gemma-2/3) takes the same route: the op caps each chunk (same fold as above), and the entropy's
  gradient passes through the cap. ``patch(metrics=False)`` leaves such calls to TRL. A call asking for
  ``mean_logits`` or ``log_sum_sq_probs`` stays TRL's.
* ``selective_log_softmax`` (in every loaded ``trl`` module that holds TRL's function) ->
  ``fastft.ops.selective_log_softmax`` for one index per row; top-K indices and ``row_mask`` as TRL.
* The GRPO KL penalty is not routed: TRL computes it inline in ``GRPOTrainer._compute_loss``
  (``exp(ref - logp) - (ref - logp) - 1``, the k3 estimator of ``fastft.ops.kl_penalty``) on [batch,
  tokens] log-probs, with no function to replace short of copying that method.
"""
from __future__ import annotations

import sys
from collections import Counter
from typing import Optional

import torch
from torch import Tensor

from ..ops.defs.linear_cross_entropy import linear_cross_entropy
from ..ops.defs.linear_selective_log_softmax import linear_log_softmax_stats, linear_selective_log_softmax
from ..ops.defs.selective_log_softmax import selective_log_softmax as fastft_selective_log_softmax

__all__ = ["patch", "TRLPatchHandle"]

_active: Optional["TRLPatchHandle"] = None


class TRLPatchHandle:
    """The live TRL patch: ``undo()`` puts TRL's functions back; ``counts`` / ``report()`` say what ran where."""

    def __init__(self, metrics: bool) -> None:
        self.metrics = metrics  # calls asking for entropy / top-1 go through fastft too
        self.replaced: list = []  # (module, attribute, TRL's object)
        self.counts: Counter = Counter()  # "fastft: ..." / "TRL: <why>" -> calls

    def report(self) -> str:
        lines = ["fastft.integrations.trl: calls since patch()"]
        lines += [f"  {n:6d}  {what}" for what, n in sorted(self.counts.items())] or ["  (none yet)"]
        return "\n".join(lines)

    def undo(self) -> None:
        global _active
        for module, name, original in reversed(self.replaced):
            setattr(module, name, original)
        self.replaced.clear()
        if _active is self:
            _active = None


def patch(metrics: bool = True) -> TRLPatchHandle:
    """Route TRL's log-prob computations through fastft (see the module docstring). ``metrics``: also the
    calls that ask for the entropy / top-1 flags (SFTTrainer's loss, GRPO's policy pass; the entropy is
    differentiable, on softcapped heads too).
    Idempotent while a patch is live (returns that handle; a different ``metrics`` raises)."""
    global _active
    if _active is not None:
        if _active.metrics != metrics:
            raise ValueError(f"fastft.integrations.trl is patched already with metrics={_active.metrics}; "
                             "undo() its handle first")
        return _active
    import trl.trainer.utils as trl_utils

    handle = TRLPatchHandle(metrics)
    original_head = trl_utils._ChunkedLogProbFunction
    original_selective = trl_utils.selective_log_softmax
    handle.replaced.append((trl_utils, "_ChunkedLogProbFunction", original_head))
    trl_utils._ChunkedLogProbFunction = _FastftChunkedLogProb(original_head, handle.counts, metrics=metrics)
    replacement = _selective_log_softmax(original_selective, handle.counts)
    for name, module in list(sys.modules.items()):
        in_trl = name == "trl" or name.startswith("trl.")
        if in_trl and getattr(module, "selective_log_softmax", None) is original_selective:
            handle.replaced.append((module, "selective_log_softmax", original_selective))
            module.selective_log_softmax = replacement
    _active = handle
    return handle


class _FastftChunkedLogProb:
    """Stands in for TRL's ``ChunkedLogProbFunction`` (only ``.apply`` is used by TRL)."""

    def __init__(self, original, counts: Counter, metrics: bool = True) -> None:
        self.original = original
        self.counts = counts
        self.metrics = metrics

    def apply(self, hidden: Tensor, weight: Tensor, bias: Optional[Tensor], targets: Tensor, temperature: float,
              chunk_size: int, final_logit_softcapping: Optional[float] = None, logit_scale: float = 1.0,
              outputs: tuple = ("log_probs",)):
        extra = [o for o in outputs if o != "log_probs"]
        routable = ("entropy", "is_top1") if self.metrics else ()
        unsupported = [o for o in extra if o not in routable]
        if unsupported:
            why = ("metrics=False" if self.metrics is False and set(unsupported) <= {"entropy", "is_top1"}
                   else "fastft computes log-probs, entropy and top-1 only")
            self.counts[f"TRL: {'/'.join(extra)} requested ({why})"] += 1
            return self.original.apply(hidden, weight, bias, targets, temperature, chunk_size,
                                       final_logit_softcapping, logit_scale, outputs)
        # TRL: z = (h W^T + b) * scale; z = cap * tanh(z / cap) if cap; z / T. Folded into one linear CE:
        # (cap / T) * tanh((z / T) / (cap / T)) = cap * tanh(z / cap) / T.
        factor = float(logit_scale) / float(temperature)
        softcap = float(final_logit_softcapping) / float(temperature) if final_logit_softcapping else None
        if weight.dtype != hidden.dtype and not torch.is_autocast_enabled(hidden.device.type):
            # cast_lm_head_to_fp32: TRL casts the head to the hidden states' dtype chunk by chunk
            weight = weight.to(hidden.dtype)
            bias = bias.to(hidden.dtype) if bias is not None else None
        scaled_hidden = hidden * factor if factor != 1.0 else hidden
        scaled_bias = bias * factor if (bias is not None and factor != 1.0) else bias
        if not extra:
            self.counts["fastft: log-probs from fastft.ops.linear_cross_entropy"] += 1
            nll = linear_cross_entropy(scaled_hidden, weight, targets, linear_bias=scaled_bias, reduction="none",
                                       softcap=softcap, loss_dtype=torch.float32)
            return -nll, None, None, None, None
        self.counts[f"fastft: log-probs + {'/'.join(extra)} from fastft.ops.linear_selective_log_softmax"] += 1
        if "is_top1" in extra:
            logp, entropy, is_top1 = linear_log_softmax_stats(scaled_hidden, weight, targets, bias=scaled_bias,
                                                              softcap=softcap)
        else:
            (logp, entropy), is_top1 = linear_selective_log_softmax(
                scaled_hidden, weight, targets, bias=scaled_bias, softcap=softcap, return_entropy=True), None
        return logp, (entropy if "entropy" in extra else None), None, None, is_top1


def _selective_log_softmax(original, counts: Counter):
    def selective_log_softmax(logits: Tensor, index: Tensor, temperature: float = 1.0,
                              row_mask: Optional[Tensor] = None) -> Tensor:
        if temperature <= 0:
            raise ValueError("temperature must be positive")  # TRL's message
        if index.dim() != logits.dim() - 1:
            counts["TRL: selective_log_softmax with top-K indices"] += 1
            return original(logits, index, temperature=temperature, row_mask=row_mask)
        counts["fastft: fastft.ops.selective_log_softmax"] += 1
        logps = fastft_selective_log_softmax(logits, index, temperature=temperature)
        if row_mask is not None:
            logps = logps.masked_fill(row_mask == 0, 0.0)
        return logps

    selective_log_softmax.__doc__ = original.__doc__
    return selective_log_softmax
