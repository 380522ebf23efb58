"""fastft: fused kernels for LLM fine-tuning.

Layers (nothing imports upward): kernels (Triton, shipped as fastft.kernels) / csrc (C++, CUDA:
fastft._C) / fastft.reference  →  fastft.ops (registered ops + dispatch)  →  fastft.nn  →
fastft.tuners (LoRA, bottleneck adapters, prefix tuning), fastft.rl (RLHF losses), fastft.integrations,
fastft.runtime.

Every public module is an attribute of ``fastft`` after ``import fastft``. The model-level ones are
imported on first use (module ``__getattr__``), so ``import fastft`` stays light and brings in neither
transformers nor peft.
"""
import importlib
import importlib.util
import os
import sys


def _bind_checkout_kernels() -> None:
    """Make ``fastft.kernels`` the top-level ``kernels/`` folder when fastft runs from a source checkout.

    An installed wheel holds ``fastft/kernels/`` (setup.py's package_dir mapping). A plain checkout (or a
    second worktree with ``PYTHONPATH=.``) has ``kernels/`` beside ``fastft/``: bind that folder, and not one
    an editable install elsewhere maps, so the tree that is imported is the tree whose kernels run."""
    package_dir = os.path.dirname(os.path.abspath(__file__))
    checkout_kernels = os.path.join(os.path.dirname(package_dir), "kernels")
    if os.path.isdir(os.path.join(package_dir, "kernels")) or "fastft.kernels" in sys.modules:
        return
    init = os.path.join(checkout_kernels, "__init__.py")
    if not os.path.isfile(init):
        return
    spec = importlib.util.spec_from_file_location("fastft.kernels", init,
                                                  submodule_search_locations=[checkout_kernels])
    module = importlib.util.module_from_spec(spec)
    sys.modules["fastft.kernels"] = module
    spec.loader.exec_module(module)
    globals()["kernels"] = module  # what `import fastft.kernels` sets on the parent package


_bind_checkout_kernels()

from . import backend, nn, ops, reference  # noqa: E402  (after the kernels binding)
from .ops import cross_entropy  # noqa: E402

__version__ = "0.1.0"

_LAZY_MODULES = ("integrations", "recipes", "rl", "runtime", "tuners")

__all__ = ["backend", "cross_entropy", "integrations", "nn", "ops", "recipes", "reference", "rl", "runtime", "tuners",
           "__version__"]


def __getattr__(name: str):
    if name in _LAZY_MODULES:
        return importlib.import_module(f".{name}", __name__)  # also sets it as an attribute of fastft
    if name in ("patch", "AutoModelForCausalLM"):  # fastft.patch(model), fastft.AutoModelForCausalLM
        return getattr(importlib.import_module(".integrations.patch", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_LAZY_MODULES))
