"""Where JAX's CPU time goes, and what halving the loop's steps would buy.

    python benchmarks/floor.py                          # shapes char and long
    python benchmarks/floor.py --shapes long --repeats 11

Part 1, the recursion alone: the lattice of a random problem is built once, then the
library's own forward recursion (:func:`ctc_multi.lattice.run_recursion` with the JAX
adapter's scan: log semiring, no shares, no history, the emissions gathered beforehand) is
timed under ``jax.jit`` on it, in the same interleaved rounds as the whole forward
(``ctc_loss``) and optax's forward and forward+backward. A target of 3x optax leaves optax's time / 3 for everything: where the
recursion alone takes more, nothing outside it can reach the target. Beside it, a bare scan
over the same frames (:func:`bare_scan`): no lattice arithmetic, only what every step of a
renormalised recursion pays, the loop itself, each frame's emissions added and its maximum
taken off.

Part 2, halved: the same problem sizes as a batch twice as large over half the frames, so the
same number of lattice cells in half as many loop steps. That is the most that alpha and beta
meeting in the middle (one scan of T/2 steps over a (2, B, S) state) could buy: JAX
``ctc_loss`` and ``value_and_grad``, NumPy ``ctc_loss_and_grad``.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import run  # noqa: E402  (benchmarks/run.py: the timing loop)

from ctc_multi import compare  # noqa: E402
from ctc_multi.shapes import SHAPES, Shape, random_problem  # noqa: E402


def timed_recursion(arrays):
    """The JAX problem of ``arrays`` (NumPy or JAX), its lattice, built once with all its
    emissions gathered (:func:`ctc_multi.lattice.with_all_emissions`; ``ctc_loss`` gathers them
    in the scan on a CPU), and a jitted function of the lattice's per-frame arrays that runs the
    library's forward recursion alone
    (:func:`ctc_multi.lattice.run_recursion`, the JAX adapter's scan and frames per step) and
    returns its final carry."""
    import jax
    import jax.numpy as jnp

    from ctc_multi.inputs import check_inputs
    from ctc_multi.lattice import run_recursion, with_all_emissions
    from ctc_multi.losses import DEFAULT_LOG_EPSILON, _Problem

    inputs = check_inputs(*(jnp.asarray(a) for a in arrays), blank_id=0, log_epsilon=DEFAULT_LOG_EPSILON)
    problem = _Problem.of(inputs)
    lattice = problem.lattice(inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded, differentiable=False)
    lattice = with_all_emissions(jnp, lattice)  # all gathered here, none in the timed scan

    @jax.jit
    def recursion(log_emissions, frame_padded, skip_allowed):
        rows = replace(lattice, log_emissions=log_emissions, frame_padded=frame_padded, skip_allowed=skip_allowed)
        return run_recursion(jnp, problem.backend.scan, rows, frames_per_step=problem.backend.FRAMES_PER_STEP)[0]

    return problem, lattice, recursion


def bare_scan(scan):
    """A jitted function of the (T, B, S) emissions and (T, B) padded flags that scans them with
    the adapter's ``scan`` and a step that only adds each frame's emissions (keeping the state on
    a padded frame) and takes off the state's maximum into a running offset: the floor under any
    recursion whose state is renormalised every frame. It computes nothing about paths."""
    import jax
    import jax.numpy as jnp

    def step(carry, frame):
        state, offset = carry
        emissions, padded = frame
        state = jnp.where(padded[:, None], state, state + emissions)
        peak = jnp.max(state, axis=-1)
        return (state - peak[:, None], offset + peak), None

    @jax.jit
    def scanned(log_emissions, frame_padded):
        start = jnp.zeros_like(log_emissions[0, ...])
        return scan(step, (start, start[:, 0]), (log_emissions, frame_padded))[0]

    return scanned


def prepared(contender: str, problem) -> compare.Prepared:
    """``ctc-multi compare``'s contender of that name ("jax", "numpy", "optax.ctc_loss") on the CPU."""
    contenders = {**compare.BACKENDS, **{anchor.name: anchor for anchor in compare.ANCHORS}}
    return contenders[contender].prepare(compare.Case(problem, blank_id=0, source="benchmarks/floor.py"), "cpu")


def recursion_alone(shape: Shape, repeats: int, budget_s: float) -> dict[str, run.Timing]:
    import jax

    problem = random_problem(shape, seed=0)
    jax_problem, lattice, recursion = timed_recursion(problem)
    bare = bare_scan(jax_problem.backend.scan)
    ours, optax = prepared("jax", problem), prepared("optax.ctc_loss", problem)
    functions = {
        "recursion alone": lambda: jax.block_until_ready(recursion(lattice.log_emissions, lattice.frame_padded, lattice.skip_allowed)),
        "bare scan": lambda: jax.block_until_ready(bare(lattice.log_emissions, lattice.frame_padded)),
        "ctc_multi fwd": ours.forward,
        "optax fwd": optax.forward,
        "optax fwd+bwd": optax.forward_backward,
    }
    return run.interleaved_timings(functions, repeats=repeats, budget_s=budget_s)


def halved_shape(shape: Shape) -> Shape:
    """The same lattice cells in half the loop steps: twice the batch over half the frames."""
    return Shape(f"{shape.name} halved", B=2 * shape.B, T=max(1, shape.T // 2), K=shape.K, N=shape.N)


def halved(shape: Shape, repeats: int, budget_s: float) -> dict[str, run.Timing]:
    functions = {}
    for name, sizes in (("whole", shape), ("halved", halved_shape(shape))):
        problem = random_problem(sizes, seed=0)
        on_jax, on_numpy = prepared("jax", problem), prepared("numpy", problem)
        functions[f"jax fwd, {name}"] = on_jax.forward
        functions[f"jax fwd+bwd, {name}"] = on_jax.forward_backward
        functions[f"numpy ctc_loss_and_grad, {name}"] = on_numpy.forward_backward
    return run.interleaved_timings(functions, repeats=repeats, budget_s=budget_s)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="char,long", help="comma-separated names from ctc_multi.shapes.SHAPES")
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--budget", type=float, default=60.0, help="seconds per part and shape before the rounds stop at the minimum")
    args = parser.parse_args(argv)
    names = args.shapes.split(",")
    unknown = [name for name in names if name not in SHAPES]
    if unknown:
        parser.error(f"--shapes: unknown shape(s) {', '.join(map(repr, unknown))}; choose from {', '.join(SHAPES)}")
    for shape in (SHAPES[name] for name in names):
        for part in (recursion_alone, halved):
            timings = part(shape, args.repeats, args.budget)
            print(f"{shape}, {part.__name__.replace('_', ' ')} (ms, median of the calls):")
            for key, timing in timings.items():
                print(f"  {key:40s} {timing.median_ms:8.1f}  ({timing.repeats} calls)")
            if part is recursion_alone:
                budget = timings["optax fwd"].median_ms / 3, timings["optax fwd+bwd"].median_ms / 3
                print(f"  3x optax leaves {budget[0]:.1f} ms for the forward, {budget[1]:.1f} ms for forward+backward")
    return 0


if __name__ == "__main__":
    sys.exit(main())
