"""A lattice whose emissions the scan gathers frame by frame (``build_lattice(gather_in_scan=True)``,
JAX on a CPU from 2**18 lattice cells) gives the numbers of one whose emissions were all
gathered beforehand: the same emissions, the same recursions, the same losses and gradients."""

from __future__ import annotations

import importlib

import numpy as np
import pytest
from helpers import poison_padded_frames, random_problem, to_backend

from ctc_multi.inputs import check_inputs
from ctc_multi.lattice import (
    LogSemiringWithShares,
    MaxSemiring,
    build_lattice,
    forward_and_occupancy_by_mirror,
    forward_and_occupancy_by_shares,
    run_recursion,
    with_all_emissions,
)
from ctc_multi.losses import _Problem
from ctc_multi.scan import tree_leaves


def _poisoned_problem(seed: int):
    """Padded frames anywhere, holding NaN and inf; padded labels outside [0, K); repeats."""
    return poison_padded_frames(random_problem(np.random.default_rng(seed), 5, 24, 6, 7, pad_label=-1, frame_layout="anywhere"))


def _both_lattices(xp, problem):
    """(the _Problem, the lattice gathered beforehand, the one gathered in the scan), built as
    the JAX adapter builds them on any namespace: logits gathered, then normalised."""
    arrays, _ = to_backend(xp, problem)
    inputs = check_inputs(*arrays, blank_id=0, log_epsilon=-1e5)
    run = _Problem.of(inputs)
    arrays = (inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded)
    options = dict(blank_id=0, log_epsilon=-1e5, index_dtype=run.index_dtype, normalise_before_gather=False, differentiable=False)
    beforehand = build_lattice(run.xp, *arrays, **options)
    in_scan = build_lattice(run.xp, *arrays, gather_in_scan=True, **options)
    return run, beforehand, in_scan


def _assert_same(actual, expected) -> None:
    """The same numbers, to 1e-12: both lattices run the same elementwise operations in the same
    order (bit for bit equal on the CPU where this was written), but a GPU's fusions may
    contract a multiply and an add into one rounding in one program and not in the other."""
    np.testing.assert_allclose(actual, expected, rtol=1e-12, atol=0)


def _leaves(xp, tree) -> list[np.ndarray]:
    """Every array of a result (nested tuples, None left out), as NumPy arrays."""
    return [xp.to_numpy(leaf) for leaf in tree_leaves(tree)]


def test_the_scan_gathers_the_emissions_that_would_have_been_gathered_beforehand(xp):
    run, beforehand, in_scan = _both_lattices(xp, _poisoned_problem(1))
    assert beforehand.log_emissions is not None and beforehand.stand_ins is None
    assert in_scan.log_emissions is None and in_scan.stand_ins is not None
    emissions = xp.to_numpy(with_all_emissions(run.xp, in_scan).log_emissions)
    expected = xp.to_numpy(beforehand.log_emissions)
    assert np.all(np.isfinite(expected)) and np.any(expected == 0.0)  # padded labels emit with probability one
    _assert_same(emissions, expected)


@pytest.mark.parametrize("semiring", [None, LogSemiringWithShares, MaxSemiring], ids=["loss", "shares", "viterbi"])
def test_the_recursion_runs_the_same_on_either_lattice(xp, semiring):
    """Final carry, history and choices, one frame per scan step (the JAX adapter's) and eight
    (NumPy's and torch's, which gather all frames first: ``run_recursion``)."""
    run, beforehand, in_scan = _both_lattices(xp, _poisoned_problem(2))
    options = {} if semiring is None else dict(semiring=semiring)
    # final carry (3 arrays), history (3), choices (none, two shares, or the moves)
    num_arrays = 6 + {None: 0, LogSemiringWithShares: 2, MaxSemiring: 1}[semiring]
    for frames_per_step in (1, 8):
        expected, actual = (
            _leaves(xp, run_recursion(run.xp, run.backend.scan, lattice, keep_history=True, frames_per_step=frames_per_step, **options))
            for lattice in (beforehand, in_scan)
        )
        assert len(actual) == len(expected) == num_arrays
        assert np.all(np.isfinite(actual[0]))  # the final state: no NaN from the padded frames
        for got, want in zip(actual, expected):
            _assert_same(got, want)


@pytest.mark.parametrize("way", [forward_and_occupancy_by_shares, forward_and_occupancy_by_mirror])
def test_the_occupancies_are_the_same_on_either_lattice(xp, way):
    run, beforehand, in_scan = _both_lattices(xp, _poisoned_problem(3))
    expected, actual = (_leaves(xp, way(run.xp, run.backend.scan, lattice)) for lattice in (beforehand, in_scan))
    assert len(actual) == len(expected) == 4  # final carry (3 arrays), occupancy
    for got, want in zip(actual, expected):
        _assert_same(got, want)


def test_jax_gathers_in_the_scan_on_a_cpu_from_its_threshold(jax_x64, monkeypatch):
    import ctc_multi.backends.jax as adapter

    threshold = adapter.GATHER_IN_SCAN_MIN_CELLS["cpu"]
    monkeypatch.setattr(jax_x64, "default_backend", lambda: "cpu")
    assert adapter.gather_in_scan(threshold) and not adapter.gather_in_scan(threshold - 1)
    monkeypatch.setattr(jax_x64, "default_backend", lambda: "gpu")
    assert not adapter.gather_in_scan(10 * threshold)


@pytest.mark.parametrize("zero_infinity", [False, True])
def test_jax_losses_and_gradients_are_the_same_gathered_in_the_scan(jax_x64, monkeypatch, zero_infinity):
    """ctc_loss under jit, its gradient, and vmap of both, with the threshold at 0 (every
    lattice gathered in the scan) against no threshold (none), on poisoned padded frames and
    one sequence that cannot be aligned."""
    import jax
    import jax.numpy as jnp

    import ctc_multi
    import ctc_multi.backends.jax as adapter

    problem = _poisoned_problem(4)
    problem.logit_paddings[0, 2:] = 1.0  # one valid frame: more labels than that cannot fit
    problem.labels[0, :3], problem.label_paddings[0, :3] = (1, 2, 3), 0.0
    arrays = [jnp.asarray(a) for a in problem]
    loss = lambda logits, *others: ctc_multi.ctc_loss(logits, *others, zero_infinity=zero_infinity)  # noqa: E731
    summed = lambda *args: jnp.sum(loss(*args))  # noqa: E731

    def run(threshold):
        monkeypatch.setattr(adapter, "GATHER_IN_SCAN_MIN_CELLS", {} if threshold is None else {jax.default_backend(): threshold})
        jax.clear_caches()
        stacked = [jnp.stack([a, a]) for a in arrays]
        return [
            np.asarray(x)
            for x in (
                jax.jit(loss)(*arrays),
                jax.jit(jax.grad(summed))(*arrays),
                jax.vmap(loss)(*stacked),
                jax.vmap(jax.grad(summed))(*stacked),
            )
        ]

    gathered_in_scan, gathered_beforehand = run(0), run(None)
    assert np.all(np.isfinite(gathered_beforehand[1]))
    for got, want in zip(gathered_in_scan, gathered_beforehand):
        _assert_same(got, want)


@pytest.mark.parametrize("name", ["numpy", "torch"])
def test_the_numpy_and_torch_adapters_gather_beforehand(name):
    """They normalise before the gather, a block of frames at a time (``gather_in_scan`` False)."""
    if name == "torch":
        pytest.importorskip("torch")
    assert importlib.import_module(f"ctc_multi.backends.{name}").gather_in_scan(10**9) is False
