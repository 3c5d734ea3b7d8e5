"""The two ways to the occupancies in ctc_multi.lattice give the same numbers on every backend:
each state's shares and a reverse scan, or the lattice and its mirror image in one scan."""

from __future__ import annotations

import numpy as np
import pytest
from conftest import BACKENDS
from helpers import Problem, random_problem

from ctc_multi.inputs import check_inputs
from ctc_multi.lattice import forward_and_occupancy_by_mirror, forward_and_occupancy_by_shares, run_recursion, with_mirror_image
from ctc_multi.losses import _Problem


def _lattice(xp, problem, *, log_epsilon=-1e5, dtype="float64"):
    """``problem`` validated on xp's backend: (the _Problem that runs it, its lattice)."""
    inputs = check_inputs(
        xp.asarray(problem.logits, dtype=xp.dtype(dtype)),
        xp.asarray(problem.logit_paddings),
        xp.asarray(problem.labels),
        xp.asarray(problem.label_paddings),
        blank_id=0,
        log_epsilon=log_epsilon,
    )
    run = _Problem.of(inputs)
    return run, run.lattice(inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded, differentiable=False)


def _both_ways(xp, problem, *, log_epsilon=-1e5):
    """Each way's (final carry, occupancy) as NumPy arrays, run by xp's own scan, and the
    (T, B) valid frames of the sequences that can be aligned."""
    run, lattice = _lattice(xp, problem, log_epsilon=log_epsilon)
    results = []
    for way in (forward_and_occupancy_by_shares, forward_and_occupancy_by_mirror):
        final, occupancy = way(run.xp, run.backend.scan, lattice, frames_per_step=run.backend.FRAMES_PER_STEP)
        xp.check_type(occupancy, *final)
        results.append(([xp.to_numpy(part) for part in final], xp.to_numpy(occupancy)))
    counted = ~xp.to_numpy(lattice.frame_padded) & xp.to_numpy(lattice.feasible)[None, :]
    return results, counted


@pytest.mark.parametrize("frame_layout", ["right", "anywhere"])
@pytest.mark.parametrize("pad_label", [0, -1])
def test_the_mirror_image_gives_the_occupancies_of_the_shares(xp, frame_layout, pad_label):
    """Padded frames anywhere, padded labels in range and out of it (the stand-ins emit with
    probability one), repeated labels; float64, so the two agree to rounding."""
    problem = random_problem(np.random.default_rng(7), 6, 30, 5, 7, pad_label=pad_label, frame_layout=frame_layout)
    ((shares_final, shares), (mirror_final, mirror)), counted = _both_ways(xp, problem)
    for by_shares, by_mirror in zip(shares_final, mirror_final):
        np.testing.assert_allclose(by_mirror, by_shares, rtol=1e-12, atol=1e-12)
    assert counted.sum() > 60
    np.testing.assert_allclose(mirror[counted], shares[counted], rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(mirror[counted].sum(axis=-1), 1.0, rtol=1e-12)


def test_the_mirror_images_padded_labels_stay_log_zero(xp):
    """On the mirror image each sequence's padded labels lie below its first state and hold only
    the initial "log 0". They emit log_epsilon, so what they hold sinks by about that much per
    frame instead of adding up over ever more paths (``with_mirror_image``)."""
    problem = random_problem(np.random.default_rng(3), 3, 50, 4, 12, frame_layout="right")
    problem.label_paddings[:, 2:] = 1.0  # at most two labels: twenty or more padded states each
    problem.labels[:, 2:] = 0
    run, lattice = _lattice(xp, problem)
    both, first_state, elsewhere = with_mirror_image(run.xp, lattice)
    _, (history, _) = run_recursion(run.xp, run.backend.scan, both, keep_history=True, first_state=first_state, elsewhere=elsewhere)
    mirrored, starts = xp.to_numpy(history[0])[:, 1, ...], xp.to_numpy(first_state)[1]
    valid_frames = (1 - problem.logit_paddings[:, ::-1]).cumsum(axis=1).T  # mirrored frames seen
    for sequence, start in enumerate(starts):
        below = mirrored[:, sequence, :start]
        assert below.size and np.all(below[valid_frames[:, sequence] >= 2] < -1.9e5), below.max()


@pytest.mark.parametrize("log_epsilon", [-50.0, -300.0, -1e5])
def test_the_mirror_image_counts_the_paths_that_log_epsilon_weighs_as_the_loss_does(xp, log_epsilon):
    """Labels 1 2 1 2 ... on 100 frames whose blank has logit 10: each label costs about 10
    nats, so the 40 labels' paths cost more than -log_epsilon and the paths that "log 0"
    allows count. The mirror image's beta counted paths ending on any state (its other states
    began at log_epsilon, and its start could jump to the blank two states on), 3.4e-5 off the
    shares; a log_epsilon above -1000 took the shares instead. Now the same occupancies, also
    for a sequence that cannot be aligned (too few frames) beside it."""
    logits = np.zeros((2, 100, 3))
    logits[..., 0] = 10.0
    labels = np.array([[1, 2] * 20, [1, 1] * 20])
    paddings = np.zeros((2, 100))
    paddings[1, 50:] = 1.0  # 50 frames for 40 labels with 39 repeats: impossible
    problem = Problem(logits, paddings, labels, np.zeros((2, 40)))
    ((shares_final, shares), (mirror_final, mirror)), _ = _both_ways(xp, problem, log_epsilon=log_epsilon)
    for by_shares, by_mirror in zip(shares_final, mirror_final):
        np.testing.assert_allclose(by_mirror, by_shares, rtol=1e-12, atol=1e-12)
    valid = paddings.T == 0
    np.testing.assert_allclose(mirror[valid], shares[valid], rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("platform", ["cpu", "gpu"])
def test_jax_takes_the_shares_on_a_cpu_and_the_mirror_image_on_a_gpu(jax_x64, monkeypatch, platform):
    """The JAX adapter picks its way by ``jax.default_backend()``: the shares where XLA is bound
    by the arithmetic, the mirror image's one scan where each loop step costs launches (README,
    Performance). The two ways differ in their last bits here, so the exact match names the way."""
    import jax

    import ctc_multi.backends.jax as adapter

    xp = BACKENDS["jax"][1]()
    monkeypatch.setattr(jax, "default_backend", lambda: platform)
    run, lattice = _lattice(xp, random_problem(np.random.default_rng(11), 4, 20, 5, 6))
    shares, mirror = (xp.to_numpy(way(run.xp, run.backend.scan, lattice)[1]) for way in (forward_and_occupancy_by_shares, forward_and_occupancy_by_mirror))
    assert not np.array_equal(shares, mirror)
    chosen = xp.to_numpy(adapter.forward_and_occupancy(run.xp, run.backend.scan, lattice)[1])
    np.testing.assert_array_equal(chosen, shares if platform == "cpu" else mirror)
