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
