"""SwiGLU's gated product (Shazeer 2020), pure torch: the oracle for tests and the fallback backend.

    out = silu(gate) * up,   silu(a) = a * sigmoid(a)

As Hugging Face LlamaMLP computes it between its projections: silu in the inputs' dtype (torch computes it in
fp32 and rounds), then the product in that dtype. Plain autograd.
"""
from __future__ import annotations

import torch.nn.functional as F
from torch import Tensor


def swiglu(gate: Tensor, up: Tensor) -> Tensor:
    return F.silu(gate) * up
