"""fastft.kernels: Triton kernels and their launchers, one module per op.

Shipped inside the wheel as ``fastft.kernels`` (setup.py maps this folder); never imported as a
top-level ``kernels`` package. Each module holds private ``@triton.jit`` kernels and the typed
launchers that ``fastft.ops`` calls (e.g. ``fastft.kernels.cross_entropy.cross_entropy_fwd``).
The kernels run on CUDA tensors, and on CPU tensors under ``TRITON_INTERPRET=1`` (slow, for tests).
"""
