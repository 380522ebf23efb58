"""One dropout mask for LoRA and the adapter on every backend.

The counter-based hash is written once per language: csrc/_dropout.h (C++ and CUDA), kernels/dropout.py
(Triton and the torch helper the ops use) and fastft/reference/dropout.py (the test oracle). These tests
parse the constants out of each file, and compare the masks each backend draws for the same seed.
"""
import ast
import re
from pathlib import Path

import pytest
import torch

import fastft._C  # noqa: F401  (registers the C++ kernels as torch.ops.fastft.*)
from fastft.kernels import dropout as kernel_dropout
from fastft.reference import dropout as ref_dropout

ROOT = Path(__file__).resolve().parents[2]
CONSTANTS = ("DROP_BITS", "MIX_MUL1", "MIX_MUL2", "INDEX_HI_MUL")
CPP_NAMES = {"DROP_BITS": "kDropBits", "MIX_MUL1": "kMixMul1", "MIX_MUL2": "kMixMul2", "INDEX_HI_MUL": "kIndexHiMul"}


def python_constants(path: Path) -> dict:
    """Module-level integer assignments NAME = <int literal> of a Python file."""
    found = {}
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Constant) and isinstance(node.value.value, int):
            for target in node.targets:
                if isinstance(target, ast.Name):
                    found[target.id] = node.value.value
    return {name: found[name] for name in CONSTANTS}


def header_constants(path: Path) -> dict:
    text = path.read_text()
    out = {}
    for name, cpp in CPP_NAMES.items():
        match = re.search(rf"constexpr\s+\w+\s+{cpp}\s*=\s*(0[xX][0-9a-fA-F]+|\d+)u?\s*;", text)
        assert match, f"{cpp} not found in {path}"
        out[name] = int(match.group(1), 0)
    return out


def test_constants_agree_in_every_copy():
    reference = python_constants(ROOT / "fastft" / "reference" / "dropout.py")
    assert python_constants(ROOT / "kernels" / "dropout.py") == reference
    assert header_constants(ROOT / "csrc" / "_dropout.h") == reference
    # the shift of the hash and the threshold's scale must be the same DROP_BITS in each
    assert reference["DROP_BITS"] == 24


def test_no_other_copy_of_the_hash_constants():
    """Kernel files use the shared definitions rather than their own copy."""
    for rel in ("kernels/lora.py", "kernels/adapter.py", "csrc/cpu/lora.cpp", "csrc/cpu/adapter.cpp",
                "csrc/cuda/lora.cu", "csrc/cuda/adapter.cu"):
        path = ROOT / rel
        if path.exists():
            text = path.read_text().upper()
            for value in ("85EBCA6B", "C2B2AE35", "9E3779B1"):
                assert value not in text, f"{rel} holds its own copy of the dropout hash constant 0x{value}"


SEEDS = (0, 7, 2**40 + 12345, 2**62 - 1)


@pytest.mark.parametrize("seed", SEEDS)
def test_torch_helper_matches_reference(seed):
    s = torch.tensor([seed], dtype=torch.int64)
    index = torch.cat([torch.arange(5000), torch.arange(2**32 - 5, 2**32 + 5), torch.tensor([2**40 + 3])])
    torch.testing.assert_close(kernel_dropout.dropout_bits(s, index), ref_dropout.dropout_bits(s, index), rtol=0, atol=0)
    assert kernel_dropout.drop_threshold(0.1) == ref_dropout.drop_threshold(0.1)
    assert kernel_dropout.keep_scale(1234) == ref_dropout.keep_scale(1234)


def test_mask_statistics():
    """Sanity of the hash as a Bernoulli draw: keep rate, and two seeds give different masks."""
    p = 0.3
    a = kernel_dropout.keep_mask((256, 256), p, torch.tensor([1]))
    b = kernel_dropout.keep_mask((256, 256), p, torch.tensor([2]))
    assert abs(a.float().mean().item() - (1 - p)) < 0.01
    assert (a != b).float().mean().item() > 0.3


def _oracle(shape, p, seed):
    n, c = shape
    return ref_dropout.dropout_keep(torch.tensor(seed), n, c, ref_dropout.drop_threshold(p))


@pytest.mark.parametrize("backend", ["cpp", "triton"])
@pytest.mark.parametrize("p", [0.1, 0.5])
def test_lora_mask_kernels_match_reference(backend, p):
    from fastft.ops.defs import lora as lora_ops

    like = torch.empty(37, 53)
    seed = torch.tensor([2**33 + 99], dtype=torch.int64)
    mask = lora_ops.dropout_mask(like, p, seed, backend)
    torch.testing.assert_close(mask.bool(), _oracle((37, 53), p, 2**33 + 99), rtol=0, atol=0)


def _lora_inputs(dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(19, 40, generator=g, dtype=dtype)
    w = torch.randn(24, 40, generator=g, dtype=dtype) / 8
    a = torch.randn(5, 40, generator=g, dtype=dtype) / 8
    b = torch.randn(24, 5, generator=g, dtype=dtype) / 8
    return x, w, a, b


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_lora_dropout_forward_and_backward_match_reference(backend):
    """The kernels' forward and all gradients equal the reference with the oracle's mask for the same seed."""
    from fastft.kernels import lora as triton_lora

    x, w, a, b = _lora_inputs()
    p, scaling = 0.25, 2.0
    seed = torch.tensor([424242], dtype=torch.int64)
    if backend == "cpp":
        fwd, bwd = torch.ops.fastft.lora_linear_fwd_kernel, torch.ops.fastft.lora_linear_bwd_kernel
    else:
        fwd, bwd = triton_lora.lora_linear_fwd, triton_lora.lora_linear_bwd
    y, u = fwd(x, w, None, a, b, scaling, p, seed)
    dy = torch.randn_like(y)
    dx, _, _, dA, dB = bwd(dy, x, w, a, b, u, seed, scaling, p, True, False, False, True, True)

    leaves = [t.clone().requires_grad_() for t in (x, a, b)]
    y_ref = ref_lora(leaves[0], w, leaves[1], leaves[2], scaling, p, seed)
    y_ref.backward(dy)
    torch.testing.assert_close(y, y_ref.detach(), rtol=1e-5, atol=1e-5)
    for got, leaf in zip((dx, dA, dB), leaves):
        torch.testing.assert_close(got, leaf.grad, rtol=1e-5, atol=1e-5)


def ref_lora(x, w, a, b, scaling, p, seed):
    from fastft.reference.lora import lora_linear

    return lora_linear(x, w, None, a, b, scaling, dropout_p=p, seed=seed)


@pytest.mark.parametrize("backend", ["cpp", "triton"])
def test_adapter_mask_matches_reference(backend):
    """An adapter whose bottleneck is all ones before dropout (x = 0, W_down = 0, b_down = 1, relu) and whose
    up projection is the identity returns h = keep * keep_scale: compare it with the oracle's mask."""
    from fastft.kernels import adapter as triton_adapter

    n, r, p, seed_value = 33, 20, 0.4, 2**35 + 5
    seed = torch.tensor(seed_value, dtype=torch.int64)
    threshold = ref_dropout.drop_threshold(p)
    expected = _oracle((n, r), p, seed_value) * ref_dropout.keep_scale(threshold)
    if backend == "triton":
        h = triton_adapter.adapter_act_dropout_fwd(torch.ones(n, r), seed, 0, threshold, False)[:, :r]
    else:
        h, _ = torch.ops.fastft.adapter_fwd_kernel(torch.zeros(n, r), torch.zeros(r, r), torch.ones(r), torch.eye(r),
                                                   None, seed, 0, threshold, 1.0)
    torch.testing.assert_close(h, expected.float(), rtol=1e-6, atol=1e-6)
