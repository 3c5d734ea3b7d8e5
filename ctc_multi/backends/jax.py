"""JAX: the scan is ``jax.lax.scan``, so the recursion compiles and runs under jit, vmap and grad."""

from __future__ import annotations

import jax

NAME = "jax"
INDEX_DTYPE_NAME = "int32"  # int64 needs jax_enable_x64


def scan(step, init, xs, *, reverse=False):
    return jax.lax.scan(step, init, xs, reverse=reverse)


def is_concrete(x) -> bool:
    return not isinstance(x, jax.core.Tracer)
