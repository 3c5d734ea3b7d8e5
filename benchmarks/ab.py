"""A/B timing: this checkout's ctc_multi against the one of an earlier commit, in one process.

A change is measured against its parent commit better this way than by two runs of
``run.py``: both versions are timed in the same interleaved rounds, so a burst of load on a
shared machine hits both alike, and the ratio old / new needs no anchor.

    python benchmarks/ab.py --against bdf0789                  # numpy and torch, fwd+bwd
    python benchmarks/ab.py --against HEAD~1 --backends jax --shapes char,long --direction fwd
    python benchmarks/ab.py --against HEAD~1 --backends torch_ops      # torch's own ops in the loop
    python benchmarks/ab.py --against HEAD~1 --backends torch_xla      # the opt-in XLA loop (both need it)
    python benchmarks/ab.py --against HEAD~1 --backends torch,jax --reduction mean   # ctc_loss(..., reduction="mean")
    python benchmarks/ab.py --against HEAD~1 --backends jax --eager --shapes small   # JAX outside jax.jit

The earlier version is taken with ``git archive`` into a temporary folder and imported under
another name (the package's imports are all relative). The contenders are those of ``run.py``
and ``ctc-multi compare`` (:mod:`ctc_multi.compare`), built from each version's own module, and
timed by ``run.interleaved_timings``. The losses of the two versions are compared too.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import io
import math
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path
from types import ModuleType

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import run  # noqa: E402  (benchmarks/run.py: the timing loop and the shape names)

import ctc_multi  # noqa: E402
from ctc_multi.shapes import SHAPES, random_problem  # noqa: E402

DEFAULT_SHAPES = ("char", "bpe", "long", "vocab5k")
BACKENDS = ("numpy", "jax", "torch", "torch_ops", "torch_xla")


def import_at(revision: str, repository: Path = HERE.parent) -> ModuleType:
    """The ctc_multi package as it was at ``revision``, imported as ``ctc_multi_at_<commit>``."""
    found = subprocess.run(["git", "rev-parse", "--short", "--verify", "--quiet", f"{revision}^{{commit}}"], cwd=repository, capture_output=True, text=True)
    if found.returncode != 0:  # a usage error: exit code 2, as argparse's
        print(f"ab.py: error: --against {revision}: not a commit of {repository}", file=sys.stderr)
        raise SystemExit(2)
    commit = found.stdout.strip()
    archive = subprocess.run(["git", "archive", commit, "ctc_multi"], cwd=repository, capture_output=True, check=True).stdout
    folder = Path(tempfile.mkdtemp(prefix="ctc_multi_ab_"))
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(folder, filter="data")
    name = f"ctc_multi_at_{commit}"
    (folder / "ctc_multi").rename(folder / name)
    sys.path.insert(0, str(folder))
    return importlib.import_module(name)


def prepared(package: ModuleType, problem, backend: str, reduction: str | None = None, eager: bool = False):
    """``package``'s contender for ``backend``, ready to run on ``problem``; with ``reduction``
    ("sum" or "mean"; jax and torch), of ``ctc_loss(..., reduction=reduction)``, prepared as
    that version's ``ctc-multi compare`` prepares its own loss (the () loss differentiated as
    it is, as a training step would); with ``eager`` (jax), of ``ctc_loss`` and its
    ``jax.value_and_grad`` called without ``jax.jit``, where the input checks run."""
    module = importlib.import_module(f"{package.__name__}.compare")
    if eager:
        return _eager_jax(module, package, problem)
    case = module.Case(problem, blank_id=0, source="ab")
    if reduction is not None:
        loss_function = functools.partial(package.ctc_loss, blank_id=0, reduction=reduction)
        if backend == "torch":
            return module._torch_prepared("cpu", loss_function, problem.logits, problem[1:])
        return module._jax_prepared(case, "cpu", loss_function)
    if backend == "torch_ops":  # as run.py's: the torch backend with torch's own ops in its loop
        own_ops = importlib.import_module(f"{package.__name__}.backends.torch")
        return run.with_torch_ops(module.BACKENDS["torch"].prepare(case, "cpu"), own_ops)
    if backend == "torch_xla":  # as run.py's: the torch backend with the opt-in LOOP_IN_XLA_ON_CPU
        adapter = importlib.import_module(f"{package.__name__}.backends.torch")
        return run.with_torch_switch(module.BACKENDS["torch"].prepare(case, "cpu"), adapter, "LOOP_IN_XLA_ON_CPU", True)
    return module.BACKENDS[backend].prepare(case, "cpu")


def _eager_jax(module: ModuleType, package: ModuleType, problem):
    import jax
    import jax.numpy as jnp

    arrays = [jnp.asarray(a) for a in problem]
    loss = functools.partial(package.ctc_loss, blank_id=0)
    value_and_grad = jax.value_and_grad(lambda logits, *others: jnp.sum(loss(logits, *others)))
    return module.Prepared(
        "cpu:0",
        forward=lambda: loss(*arrays).block_until_ready(),
        forward_backward=lambda: jax.block_until_ready(value_and_grad(*arrays)),
        to_numpy=np.asarray,
    )


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--against", required=True, help="the earlier commit (anything git rev-parse takes)")
    parser.add_argument("--shapes", type=run._names, default=list(DEFAULT_SHAPES), help=f"named shapes among {','.join(SHAPES)}")
    parser.add_argument("--backends", type=run._names, default=["numpy", "torch"], help="among numpy,jax,torch,torch_ops,torch_xla (CPU; torch_ops, torch_xla: as in run.py)")
    parser.add_argument("--direction", choices=run.DIRECTIONS, default="fwd+bwd")
    parser.add_argument("--rounds", type=int, default=9, help=f"timed interleaved rounds (at least {run.MIN_REPEATS})")
    parser.add_argument(
        "--reduction", choices=("sum", "mean"), help="time forward+backward of ctc_loss(..., reduction=...) instead (backends jax and torch)"
    )
    parser.add_argument("--eager", action="store_true", help="time the jax backend's calls without jax.jit (backend jax only)")
    args = parser.parse_args(argv)
    args.rounds = max(args.rounds, run.MIN_REPEATS)
    unknown = set(args.shapes) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    unknown = set(args.backends) - set(BACKENDS)
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {', '.join(BACKENDS)}")
    if args.reduction and (set(args.backends) - {"jax", "torch"} or args.direction != "fwd+bwd"):
        parser.error("--reduction times forward+backward of the jax and torch backends only: give --backends among jax,torch")
    if args.eager and (args.backends != ["jax"] or args.reduction):
        parser.error("--eager times the jax backend's calls without jax.jit: give --backends jax (and no --reduction)")
    return args


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as run.py: before torch initialises OpenMP
    earlier = import_at(args.against)
    if "torch_xla" in args.backends and not hasattr(importlib.import_module(f"{earlier.__name__}.backends.torch"), "LOOP_IN_XLA_ON_CPU"):
        print(f"ab.py: error: --backends torch_xla: {args.against} has no LOOP_IN_XLA_ON_CPU (added in commit 0e1a6e9)", file=sys.stderr)
        return 2
    what = f'ctc_loss(..., reduction="{args.reduction}") fwd+bwd' if args.reduction else args.direction
    what += ", without jax.jit" if args.eager else ""
    print(f"{what}, median of {args.rounds} interleaved rounds; old = {earlier.__name__}, new = this checkout", flush=True)
    print(f"{'shape':8s} {'backend':8s} {'old ms':>9s} {'new ms':>9s} {'old/new':>8s} {'loss Δrel':>10s}")
    for shape in args.shapes:
        problem = random_problem(SHAPES[shape], 0, "float32")
        for backend in args.backends:
            versions = {key: prepared(package, problem, backend, args.reduction, args.eager) for key, package in (("old", earlier), ("new", ctc_multi))}
            losses = {key: np.asarray(version.to_numpy(version.forward()), dtype=np.float64) for key, version in versions.items()}
            method = "forward" if args.direction == "fwd" else "forward_backward"
            timings = run.interleaved_timings({key: getattr(version, method) for key, version in versions.items()}, repeats=args.rounds, budget_s=math.inf)
            old, new = timings["old"].median_ms, timings["new"].median_ms
            difference = float(np.max(np.abs(losses["new"] - losses["old"]) / np.maximum(1.0, np.abs(losses["old"]))))
            print(f"{shape:8s} {backend:8s} {old:9.1f} {new:9.1f} {old / new:8.2f} {difference:10.1e}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
