"""PyTorch: the scan is a Python loop over torch ops (CPU or CUDA); autograd records it."""

from __future__ import annotations

import torch

from ..scan import python_loop_scan

NAME = "torch"
INDEX_DTYPE_NAME = "int64"  # torch gathers take int64 indices only


def _stack(tensors):
    return torch.stack(tensors, dim=0)


def scan(step, init, xs, *, reverse=False):
    return python_loop_scan(step, init, xs, reverse=reverse, stack=_stack)


def is_concrete(x) -> bool:
    return not torch.compiler.is_compiling()


class _ExplicitGradient(torch.autograd.Function):
    @staticmethod
    def forward(ctx, functions, logits, *others):
        forward_with_residuals, backward = functions
        value, residuals = forward_with_residuals(logits, *others)
        ctx.backward_function = backward
        ctx.num_residuals = len(residuals)
        ctx.save_for_backward(*residuals, logits, *others)
        return value

    @staticmethod
    def backward(ctx, cotangent):
        saved = ctx.saved_tensors
        residuals, (logits, *others) = saved[: ctx.num_residuals], saved[ctx.num_residuals :]
        gradient = ctx.backward_function(tuple(residuals), cotangent, logits, *others)
        return (None, gradient) + (None,) * len(others)


def with_explicit_gradient(forward, forward_with_residuals, backward):
    def loss(logits, *others):
        if not (torch.is_grad_enabled() and logits.requires_grad):
            return forward(logits, *others)
        return _ExplicitGradient.apply((forward_with_residuals, backward), logits, *others)

    return loss


def detach(x):
    return x.detach()


def compiled(function, num_static):
    return function  # runs op by op; nothing to compile
