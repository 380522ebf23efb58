"""Eager-mode twins of registered ops, without torch.library's Python dispatch layer.

A ``torch.library.custom_op`` call with autograd goes through Python dispatch (fake-mode checks, default
filling, alias checks) on the way in and on the way back: ~0.2 ms forward + ~0.3 ms backward per call on
this CPU. For an op called dozens of times a step (28 LoRA layers in a 4-layer Llama) that is visible.
``eager_function`` builds a plain ``torch.autograd.Function`` from the SAME forward, setup_context and
backward functions the custom op registers, so both paths run the same kernels and save the same tensors;
the public functional uses it unless ``torch.compiler.is_compiling()`` (the compiler needs the registered
op: its fake implementation and opcheck-tested schema).

Contract (the ops here follow it): ``forward_impl(*inputs) -> (output, *saved_extras)`` returns the one
differentiable output first; ``setup_context(ctx, inputs, outputs)`` saves what backward needs;
``backward(ctx, grad_output, *grad_extras)`` calls ``ctx.backward_fn(...)``, which is the registered backward
op on the compiled path and the plain ``backward_impl`` here.
"""
from __future__ import annotations

from typing import Callable

import torch


def eager_function(name: str, forward_impl: Callable, setup_context: Callable, backward_impl: Callable,
                   backward: Callable) -> type:
    """A torch.autograd.Function subclass named ``name`` running the given op functions (see the module doc)."""

    def forward(ctx, *inputs):
        outputs = forward_impl(*inputs)
        setup_context(ctx, inputs, outputs)
        ctx.backward_fn = backward_impl
        ctx.num_extras = len(outputs) - 1
        return outputs[0]

    def backward_entry(ctx, grad_output):
        return backward(ctx, grad_output, *([None] * ctx.num_extras))

    return type(name, (torch.autograd.Function,), {
        "__doc__": f"Eager twin of a registered op ({forward_impl.__module__}); see fastft.ops._eager.",
        "forward": staticmethod(forward),
        "backward": staticmethod(backward_entry),
    })
