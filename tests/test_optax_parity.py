"""Parity with optax.ctc_loss_with_forward_probs (all three outputs) and torch's ctc_loss (the loss).

optax runs in float64 (``jax_x64``). Entries that optax gives as reachable (above
log_epsilon / 10) must match to the float64 tolerance; entries optax gives as "log 0" must be
below log_epsilon / 10 for ctc_multi too, whatever the exact value (both use log_epsilon as a
finite log 0, but add it up along different paths).
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import TOLERANCE
from helpers import LOG_EPSILON, Problem, assert_log_probs_close, random_problem, reference_forward_probs, to_backend
from reference import ctc_reference

import ctc_multi

OPTAX_CASES = {
    # random_problem(B, T, K, N, **options); padded labels hold 0 or -1, which optax reads
    # differently (0 is a class, -1 an all-zero one-hot row), so both are covered.
    "plain_pad0": ((4, 8, 5, 3), dict(pad_label=0)),
    "pad_minus1_middle_frames": ((4, 8, 5, 3), dict(pad_label=-1, frame_layout="middle")),
    "repeats_blank_last": ((4, 8, 5, 3), dict(repeat_probability=0.8, min_label_length=2, blank_id=4)),
    "blank_inside_anywhere": ((4, 8, 5, 3), dict(blank_id=2, frame_layout="anywhere", pad_label=-1)),
    "pad0_is_a_class_blank1": ((4, 8, 5, 3), dict(blank_id=1, pad_label=0, frame_layout="middle")),
}


def optax_outputs(jax_x64, problem, blank_id, log_epsilon=LOG_EPSILON):
    """optax's (loss, logalpha_blank, logalpha_nonblank) in float64, as NumPy arrays."""
    optax = pytest.importorskip("optax", reason="optax is not installed: no parity check against it")
    # Compiled once per shape and blank_id (eager optax re-traces its scan op by op on every call).
    function = jax_x64.jit(optax.ctc_loss_with_forward_probs, static_argnames=("blank_id", "log_epsilon"))
    arrays = [jax_x64.numpy.asarray(a) for a in problem]
    return tuple(np.asarray(r) for r in function(*arrays, blank_id=blank_id, log_epsilon=log_epsilon))


@functools.lru_cache(maxsize=None)
def optax_case(jax_x64, case: str):
    """The problem of ``case`` and optax's outputs for it, computed once for all backends."""
    shape, options = OPTAX_CASES[case]
    problem = random_problem(np.random.default_rng(100 + list(OPTAX_CASES).index(case)), *shape, **options)
    return problem, optax_outputs(jax_x64, problem, options.get("blank_id", 0))


def assert_loss_matches_optax(loss, expected):
    """Feasible losses match; a loss optax gives as impossible (about -log_epsilon) is so here too."""
    feasible = expected < -LOG_EPSILON / 10
    np.testing.assert_allclose(loss[feasible], expected[feasible], **TOLERANCE["float64"])
    assert np.all(loss[~feasible] > -LOG_EPSILON / 10)
    assert np.all(np.isfinite(loss))


@pytest.mark.parametrize("case", list(OPTAX_CASES))
def test_matches_optax(xp, jax_x64, case):
    blank_id = OPTAX_CASES[case][1].get("blank_id", 0)
    problem, (expected_loss, expected_blank, expected_nonblank) = optax_case(jax_x64, case)

    arrays, _ = to_backend(xp, problem)
    loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(*arrays, blank_id=blank_id)
    xp.check_type(loss, blank, nonblank)
    assert tuple(blank.shape) == expected_blank.shape
    assert tuple(nonblank.shape) == expected_nonblank.shape
    assert_loss_matches_optax(xp.to_numpy(loss), expected_loss)
    assert_log_probs_close(xp.to_numpy(blank), expected_blank, **TOLERANCE["float64"])
    assert_log_probs_close(xp.to_numpy(nonblank), expected_nonblank, **TOLERANCE["float64"])


def test_impossible_alignments_like_optax(jax_x64):
    """Labels that do not fit in the frames: optax and ctc_multi both say about -log_epsilon."""
    problem = random_problem(np.random.default_rng(110), 3, 2, 4, 3, min_label_length=1)
    labels = np.array([[1, 1, 0], [1, 2, 3], [2, 2, 2]])
    problem = problem._replace(labels=labels, label_paddings=np.array([[0, 0, 1], [0, 0, 0], [0, 0, 0.0]]), logit_paddings=np.zeros((3, 2)))
    expected_loss, expected_blank, expected_nonblank = optax_outputs(jax_x64, problem, 0)
    assert np.all(expected_loss > -LOG_EPSILON / 10)
    loss, blank, nonblank = (np.asarray(r) for r in ctc_multi.ctc_loss_with_forward_probs(*problem))
    assert_loss_matches_optax(loss, expected_loss)
    assert_log_probs_close(blank, expected_blank, **TOLERANCE["float64"])
    assert_log_probs_close(nonblank, expected_nonblank, **TOLERANCE["float64"])


def test_nothing_comes_from_beyond_the_first_state_as_in_optax(xp, jax_x64):
    """Losses of thousands of nats, beyond -log_epsilon, as optax gives them. Out-of-range padded
    labels emit with probability one, so their states hold each frame's peak, far above the
    paths. The states beyond the lattice's first one feed nothing into it; when they held
    log_epsilon below each frame's peak, that was worth more than the paths after a few hundred
    frames here and cut these losses to about -log_epsilon."""
    problem = random_problem(np.random.default_rng(3), 3, 1600, 4, 12, pad_label=-1, frame_layout="right")
    problem.label_paddings[:, 2:] = 1.0  # at most two labels
    problem.labels[:, 2:] = -1
    expected_loss, _, _ = optax_outputs(jax_x64, problem, 0, log_epsilon=-1000.0)
    assert np.all(expected_loss > 100) and np.any(expected_loss > 2000)
    arrays, _ = to_backend(xp, problem)
    loss = ctc_multi.ctc_loss(*arrays, log_epsilon=-1000.0)
    np.testing.assert_allclose(xp.to_numpy(loss), expected_loss, **TOLERANCE["float64"])


def test_forward_probs_reference_follows_optax(jax_x64):
    """The loop in helpers.reference_forward_probs (used by test_losses) reproduces optax."""
    for case, (_, options) in OPTAX_CASES.items():
        problem, (_, optax_blank, optax_nonblank) = optax_case(jax_x64, case)
        blank, nonblank = reference_forward_probs(*problem, blank_id=options.get("blank_id", 0))
        assert_log_probs_close(optax_blank, blank, **TOLERANCE["float64"])
        assert_log_probs_close(optax_nonblank, nonblank, **TOLERANCE["float64"])


# ---------------------------------------------------------------------------------------------
# torch.nn.functional.ctc_loss: the loss only; it needs the valid frames first (no middle padding).
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("blank_id", [0, 4])
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_loss_matches_torch_ctc_loss(blank_id, dtype):
    """torch backend only: torch.nn.functional.ctc_loss(reduction='none') after log_softmax."""
    torch = pytest.importorskip("torch", reason="torch is not installed: no parity check against torch.nn.functional.ctc_loss")
    problem = random_problem(np.random.default_rng(130 + blank_id), 5, 8, 5, 3, blank_id=blank_id, pad_label=-1, frame_layout="right")
    torch_dtype = getattr(torch, dtype)
    logits = torch.as_tensor(problem.logits, dtype=torch_dtype)
    frame_counts = torch.as_tensor((problem.logit_paddings == 0).sum(axis=1))
    label_counts = torch.as_tensor((problem.label_paddings == 0).sum(axis=1))
    # torch reads targets only up to each target length; fill the padding with a valid class anyway.
    targets = torch.as_tensor(np.where(problem.label_paddings != 0, (blank_id + 1) % 5, problem.labels))
    log_probs = torch.nn.functional.log_softmax(logits, dim=-1).transpose(0, 1)
    expected = torch.nn.functional.ctc_loss(log_probs, targets, frame_counts, label_counts, blank=blank_id, reduction="none")

    loss = ctc_multi.ctc_loss(logits, torch.as_tensor(problem.logit_paddings), torch.as_tensor(problem.labels), torch.as_tensor(problem.label_paddings), blank_id=blank_id)
    assert isinstance(loss, torch.Tensor) and loss.dtype == torch_dtype
    np.testing.assert_allclose(loss.numpy(), expected.numpy(), **TOLERANCE[dtype])
    # torch agrees with the independent reference, so the three sources agree with each other.
    np.testing.assert_allclose(expected.double().numpy(), ctc_reference(logits.double().numpy(), *problem[1:], blank_id=blank_id)[0], **TOLERANCE[dtype])


def test_labels_equal_to_blank_count_as_labels_as_in_optax_and_torch(xp, jax_x64):
    """Unpadded labels equal to blank_id (accepted, as optax accepts them): the loss, the alphas
    and the gradient are optax's (its gradient by autodiff), and the loss is torch's F.ctc_loss's.
    (torch's own gradient is wrong where the last label is the blank, sequence 0 here: 0.25 from
    central differences in one such case, so it is not compared.)"""
    rng = np.random.default_rng(140)
    problem = random_problem(rng, 4, 7, 5, 3, blank_id=2, frame_layout="right")
    labels = np.array([[4, 1, 2], [2, 2, 3], [2, 0, 0], [1, 2, 1]])
    frames = np.array([[0] * 7, [0] * 5 + [1] * 2, [0] * 7, [0] * 6 + [1]])
    problem = problem._replace(logit_paddings=frames.astype(float), labels=labels, label_paddings=np.array([[0, 0, 0], [0, 0, 0], [0, 1, 1], [0, 0, 0.0]]))
    expected = optax_outputs(jax_x64, problem, 2)
    optax = pytest.importorskip("optax")
    expected_grad = np.asarray(jax_x64.grad(lambda x: optax.ctc_loss(x, *problem[1:], blank_id=2).sum())(problem.logits))

    arrays, _ = to_backend(xp, problem)
    results = ctc_multi.ctc_loss_with_forward_probs(*arrays, blank_id=2)
    assert_loss_matches_optax(xp.to_numpy(results[0]), expected[0])
    for result, expected_alphas in zip(results[1:], expected[1:]):
        assert_log_probs_close(xp.to_numpy(result), expected_alphas, **TOLERANCE["float64"])
    loss, grad = ctc_multi.ctc_loss_and_grad(*arrays, blank_id=2)
    np.testing.assert_allclose(xp.to_numpy(grad), expected_grad, **TOLERANCE["float64"])

    torch = pytest.importorskip("torch")
    lengths = [torch.as_tensor((paddings == 0).sum(axis=1)) for paddings in (problem.logit_paddings, problem.label_paddings)]
    log_probs = torch.log_softmax(torch.as_tensor(problem.logits), dim=-1).transpose(0, 1)
    torch_loss = torch.nn.functional.ctc_loss(log_probs, torch.as_tensor(labels), *lengths, blank=2, reduction="none")
    np.testing.assert_allclose(xp.to_numpy(loss), torch_loss.numpy(), **TOLERANCE["float64"])


def test_a_label_equal_to_blank_can_make_the_loss_negative_as_in_optax_and_torch(xp, jax_x64):
    """K = 2, labels [0, 1] with blank 0: the lattice counts some frame sequences twice, the sum
    passes one, and optax and torch give a negative loss. ctc_multi gives the same value, not
    0: the clamp that keeps rounding-level negatives out must not cut it, or the loss would
    disagree with its own gradient (optax's) and with both anchors."""
    logits = 3 * np.random.default_rng(0).standard_normal((1, 5, 2))
    problem = Problem(logits, np.zeros((1, 5)), np.array([[0, 1]]), np.zeros((1, 2)))
    (expected, _, _) = optax_outputs(jax_x64, problem, 0)
    assert expected[0] < -0.1
    arrays, _ = to_backend(xp, problem)
    loss, grad = (xp.to_numpy(r) for r in ctc_multi.ctc_loss_and_grad(*arrays))
    np.testing.assert_allclose(loss, expected, **TOLERANCE["float64"])
    optax = pytest.importorskip("optax")
    expected_grad = np.asarray(jax_x64.grad(lambda x: optax.ctc_loss(x, *problem[1:]).sum())(logits))
    np.testing.assert_allclose(grad, expected_grad, **TOLERANCE["float64"])
    torch = pytest.importorskip("torch")
    log_probs = torch.log_softmax(torch.as_tensor(logits), dim=-1).transpose(0, 1)
    torch_loss = torch.nn.functional.ctc_loss(log_probs, torch.tensor([[0, 1]]), torch.tensor([5]), torch.tensor([2]), reduction="none")
    np.testing.assert_allclose(loss, torch_loss.numpy(), **TOLERANCE["float64"])


def test_a_valid_path_beyond_minus_log_epsilon_counts_with_a_lower_log_epsilon(xp, jax_x64):
    """Two frames whose blank is certain (margin 6e4), labels [1, 2]: the only valid path costs
    1.2e5. At the default log_epsilon (-1e5) a path entering the lattice past its first state
    costs less, and the loss is optax's, about 1e5; at -1e7 it is the exact 1.2e5 (README, Inputs)."""
    logits = np.array([[[0.0, -6e4, -6e4], [0.0, -6e4, -6e4]]])
    problem = Problem(logits, np.zeros((1, 2)), np.array([[1, 2]]), np.zeros((1, 2)))
    (expected, _, _) = optax_outputs(jax_x64, problem, 0)
    arrays, _ = to_backend(xp, problem)
    np.testing.assert_allclose(xp.to_numpy(ctc_multi.ctc_loss(*arrays)), expected, **TOLERANCE["float64"])
    assert expected[0] < 1e5
    np.testing.assert_allclose(xp.to_numpy(ctc_multi.ctc_loss(*arrays, log_epsilon=-1e7)), [1.2e5], **TOLERANCE["float64"])
