"""RMSNorm (Zhang & Sennrich 2019), pure torch: the oracle for tests and the fallback backend.

    y = x * rsqrt(mean(x^2, -1) + eps) * (offset + weight)

``casting_mode`` says where the rounding to low precision happens, as in Liger-Kernel's option of the same name:
  "llama"  Hugging Face LlamaRMSNorm (and Mistral, Qwen2, ...): the statistics and the normalisation in fp32,
           the normalised x cast back to x's dtype, then multiplied by the weight in the promoted dtype of x and
           the weight (so an fp32 weight with bf16 activations gives an fp32 output, as in transformers).
  "gemma"  Hugging Face GemmaRMSNorm: everything in fp32, ``offset`` usually 1 (the ``1 + weight`` scale), and the
           output cast to x's dtype at the end.
Plain autograd over exactly those steps.
"""
from __future__ import annotations

import torch
from torch import Tensor

CASTING_MODES = ("llama", "gemma")


def rms_norm(x: Tensor, weight: Tensor, eps: float = 1e-6, *, offset: float = 0.0,
             casting_mode: str = "llama") -> Tensor:
    if casting_mode not in CASTING_MODES:
        raise ValueError(f"unknown casting_mode {casting_mode!r}; expected one of {CASTING_MODES}")
    acc = torch.float64 if x.dtype == torch.float64 else torch.float32
    xf = x.to(acc)
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    if casting_mode == "gemma":
        return (normed * (offset + weight.to(acc))).to(x.dtype)
    scale = weight + offset if offset != 0.0 else weight
    return scale * normed.to(x.dtype)
