"""NumPy, and any other array-API namespace: the scan is a plain Python loop."""

from __future__ import annotations

from array_api_compat import array_namespace

from ..scan import python_loop_scan

NAME = "numpy"
INDEX_DTYPE_NAME = "int64"


def _stack(arrays):
    return array_namespace(arrays[0]).stack(arrays, axis=0)


def scan(step, init, xs, *, reverse=False):
    return python_loop_scan(step, init, xs, reverse=reverse, stack=_stack)


def is_concrete(x) -> bool:
    return True


def with_explicit_gradient(forward, forward_with_residuals, backward):
    return forward  # no autodiff to wire: ctc_loss_and_grad calls backward itself


def detach(x):
    return x


def compiled(function, num_static):
    return function  # runs op by op; nothing to compile
