"""How many lattice steps per loop iteration suit a GPU: jax fwd+bwd against optax, one process.

    python benchmarks/gpu_unroll.py [--shapes char,long,big] [--unrolls 1,4,8,16]

Sets ``ctc_multi.backends.jax.UNROLL_ELSEWHERE`` (the unroll on non-CPU platforms) to each value
in turn, recompiles, and prints the median fwd+bwd time (jax.grad under jit) with the optax
anchor measured in the same run. Part of benchmarks/gpu_check.sh.
"""

from __future__ import annotations

import argparse
import statistics
import time

import jax
import jax.numpy as jnp
import numpy as np

import ctc_multi
import ctc_multi.backends.jax as jax_backend
from ctc_multi.shapes import SHAPES, random_problem


def median_ms(function, arrays, repeats=10):
    jax.block_until_ready(function(*arrays))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(function(*arrays))
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="char,long,big")
    parser.add_argument("--unrolls", default="1,4,8,16")
    args = parser.parse_args()
    import optax

    print("device:", jax.devices()[0].device_kind, "| default backend:", jax.default_backend())
    for shape in args.shapes.split(","):
        arrays = [jnp.asarray(a) for a in random_problem(SHAPES[shape], 0, np.float32)]
        optax_grad = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(optax.ctc_loss(*a))))
        anchor = median_ms(optax_grad, arrays)
        for unroll in (int(u) for u in args.unrolls.split(",")):
            jax_backend.UNROLL_ELSEWHERE = (unroll, unroll)
            jax.clear_caches()  # ctc_multi's entry points are jitted once per setting: retrace
            ours = jax.jit(jax.value_and_grad(lambda *a: jnp.sum(ctc_multi.ctc_loss(*a))))
            ms = median_ms(ours, arrays)
            print(f"{shape:8s} unroll {unroll:3d}: {ms:8.2f} ms   optax {anchor:8.2f} ms   ratio {anchor / ms:5.2f}x", flush=True)


if __name__ == "__main__":
    main()
