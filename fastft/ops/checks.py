"""The argument checks every public functional shares, written once. Each raises TypeError / ValueError
naming the argument and what is wrong (no ``assert`` for user errors). Public: the nn modules use them too."""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import Tensor

from .. import backend as _backend
from ..backend import FLOAT_DTYPES

REDUCTIONS = ("none", "mean", "sum")
_DTYPE_NAMES = {torch.float32: "float32", torch.float16: "float16", torch.bfloat16: "bfloat16",
                torch.float64: "float64"}


def check_tensor(name: str, t, *, dim: Optional[int] = None, min_dim: int = 0) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if dim is not None and t.dim() != dim:
        raise ValueError(f"{name} must be {dim}-D, got shape {tuple(t.shape)}")
    if t.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimension(s), got shape {tuple(t.shape)}")


def check_float_tensor(name: str, t, *, dtypes: tuple = FLOAT_DTYPES, dim: Optional[int] = None,
                       min_dim: int = 0) -> None:
    """A tensor of one of ``dtypes`` (default: float32, float16, bfloat16, float64)."""
    check_tensor(name, t, dim=dim, min_dim=min_dim)
    if t.dtype not in dtypes:
        names = ", ".join(_DTYPE_NAMES.get(d, str(d)) for d in dtypes)
        raise TypeError(f"{name} must be one of {names}; got {t.dtype}")


def check_optional_tensor(name: str, t) -> None:
    if t is not None and not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(t).__name__}")


def check_index_tensor(name: str, t, what: str = "class indices") -> None:
    check_tensor(name, t)
    if t.is_floating_point() or t.is_complex() or t.dtype == torch.bool:
        raise TypeError(f"{name} must hold integer {what} (int64 or int32), got {t.dtype}")


def check_same_device(main_name: str, main: Tensor, **others) -> None:
    """Every tensor in ``others`` (None skipped) on ``main``'s device."""
    for name, t in others.items():
        if t is not None and t.device != main.device:
            raise ValueError(f"{name} is on {t.device} but {main_name} is on {main.device}")


def check_same_dtype(main_name: str, main: Tensor, **others) -> None:
    for name, t in others.items():
        if t is not None and t.dtype != main.dtype:
            raise TypeError(f"{name} dtype {t.dtype} differs from {main_name} dtype {main.dtype}; they must match")


def check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    return reduction


def check_number(name: str, value, *, low: Optional[float] = None, high: Optional[float] = None,
                 low_open: bool = False, high_open: bool = False) -> float:
    """A finite real number (not a tensor or bool) in the given range; returned as float."""
    if isinstance(value, (bool, Tensor)) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a Python number, got {type(value).__name__}")
    v = float(value)
    bad = not abs(v) < math.inf  # not math.isfinite: torch.compile traces this with symbolic floats
    if low is not None:
        bad = bad or (v <= low if low_open else v < low)
    if high is not None:
        bad = bad or (v >= high if high_open else v > high)
    if bad:
        lo = "" if low is None else f"{'>' if low_open else '>='} {low:g}"
        hi = "" if high is None else f"{'<' if high_open else '<='} {high:g}"
        rng = " and ".join(x for x in (lo, hi) if x)
        raise ValueError(f"{name} must be a finite number{' ' + rng if rng else ''}, got {value}")
    return v


def check_chunk_size(chunk_size) -> None:
    """None or a positive int: token rows per chunk of the linear heads."""
    if chunk_size is not None and (isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1):
        raise ValueError(f"chunk_size must be None or a positive int (token rows per chunk), got {chunk_size!r}")


def check_mask(name: str, mask, token_shape: tuple, device) -> Optional[Tensor]:
    """mask (True / nonzero = counted) of ``token_shape`` -> contiguous flat bool, or None."""
    if mask is None:
        return None
    check_tensor(name, mask)
    if tuple(mask.shape) != tuple(token_shape):
        raise ValueError(f"{name} shape {tuple(mask.shape)} must equal the token shape {tuple(token_shape)}")
    if mask.device != device:
        raise ValueError(f"{name} is on {mask.device} but the logits are on {device}")
    if mask.is_complex():
        raise TypeError(f"{name} must be bool, integer or floating point (nonzero = counted), got {mask.dtype}")
    return flat_token_mask(mask)


def flat_token_mask(mask: Optional[Tensor]) -> Optional[Tensor]:
    """A checked mask (``check_mask``) as the kernels take it: contiguous flat bool (nonzero = counted), or None."""
    if mask is None:
        return None
    m = mask if mask.dtype == torch.bool else mask != 0
    return m.reshape(-1).contiguous()


def check_indices_in_range(name: str, index: Tensor, num_classes: int, ignore_index: Optional[int] = None) -> None:
    """ValueError on an index outside [0, num_classes) (other than ``ignore_index``). Always on CPU; on
    CUDA only with FASTFT_DEBUG=1 (it syncs with the host). Skipped while compiling."""
    if torch.compiler.is_compiling() or index.numel() == 0:
        return
    if index.device.type != "cpu" and not _backend.debug_checks():
        return
    bad = (index < 0) | (index >= num_classes)
    if ignore_index is not None:
        bad &= index != ignore_index
    if bool(bad.any()):
        pos = int(bad.reshape(-1).nonzero()[0, 0])
        valid = f"0..{num_classes - 1}" + ("" if ignore_index is None else f", or ignore_index={ignore_index}")
        raise ValueError(f"{name} value {int(index.reshape(-1)[pos])} at flat position {pos} is out of range for "
                         f"{num_classes} classes (valid: {valid})")


def flat_index(t: Tensor) -> Tensor:
    """Class indices as the kernels read them: flat, int64, contiguous (a strided view such as
    ``labels[:, ::2]``, or an expanded scalar, would be misread by position)."""
    return t.reshape(-1).to(torch.int64).contiguous()


def rows(t: Tensor, width: int) -> Tensor:
    """``t`` as a [rows, width] matrix with unit stride in the last dimension (a copy only when needed)."""
    t = t.reshape(-1, width)
    return t if t.shape[0] == 0 or t.stride(-1) == 1 else t.contiguous()
