"""Test-wide setup. TRITON_INTERPRET must be set before any @triton.jit runs, so it is set here,
before fastft (and through it triton) is imported, unless a GPU is present or it was set already."""
import os
import sys

# tests/ops/op_db.py (the op database: samples, truths, bad inputs) is read by tests/ops and tests/cuda alike.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "ops"))
# tests/distributed/gloo_workers.py launches and runs the torchrun checks of tests/distributed and tests/integrations.
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "distributed"))

if "TRITON_INTERPRET" not in os.environ:
    try:
        import torch

        _has_gpu = torch.cuda.is_available()
    except Exception:  # pragma: no cover
        _has_gpu = False
    os.environ["TRITON_INTERPRET"] = "0" if _has_gpu else "1"

import pytest  # noqa: E402
import torch  # noqa: E402


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
