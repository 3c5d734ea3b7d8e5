"""JAX: the scan is ``jax.lax.scan``, so the recursion compiles and runs under jit, vmap and grad."""

from __future__ import annotations

import functools

import jax

NAME = "jax"
INDEX_DTYPE_NAME = "int32"  # int64 needs jax_enable_x64


# Four lattice steps per loop iteration: on a 2-core CPU, 1.2-1.4x faster than 1 on the char and
# long shapes and no slower on bpe; 8 was no better (benchmarks/run.py, see the README).
UNROLL = 4


def scan(step, init, xs, *, reverse=False):
    return jax.lax.scan(step, init, xs, reverse=reverse, unroll=UNROLL)


def is_concrete(x) -> bool:
    # Under jit even operations on constant arrays are traced, so probe a fresh array too.
    return not isinstance(x, jax.core.Tracer) and not isinstance(jax.numpy.zeros(()), jax.core.Tracer)


def with_explicit_gradient(forward, forward_with_residuals, backward):
    @jax.custom_vjp
    def loss(logits, *others):
        return forward(logits, *others)

    def loss_forward(logits, *others):
        value, residuals = forward_with_residuals(logits, *others)
        return value, (residuals, logits, others)

    def loss_backward(saved, cotangent):
        residuals, logits, others = saved
        return (backward(residuals, cotangent, logits, *others),) + (None,) * len(others)

    loss.defvjp(loss_forward, loss_backward)
    return loss


def detach(x):
    return jax.lax.stop_gradient(x)


@functools.lru_cache(maxsize=None)
def compiled(function, num_static):
    """``function`` compiled once per static setting, so eager calls don't dispatch op by op."""
    return jax.jit(function, static_argnums=tuple(range(num_static)))
