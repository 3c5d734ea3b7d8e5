"""forced_align, merge_tokens and ctc_posteriors on every backend, against brute force.

Expected values come from enumerating every path of K classes over the valid frames (K^T of
them, T <= 7, K <= 4) and keeping those that collapse to the label sequence: the best one,
its log-probability, and the posteriors as weighted path counts. Never from ctc_multi itself,
except the loss bound, where ``ctc_multi.ctc_loss`` is itself checked against the reference
in ``test_losses.py``.
"""

from __future__ import annotations

import functools
import itertools

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from helpers import Problem, collapse, random_problem, to_backend

import ctc_multi

# One shape (B, T, K, N) for every problem: eager JAX compiles each operation once per shape.
SHAPE = (4, 7, 4, 3)
CASES = {
    "plain": dict(),
    "blank_last": dict(blank_id=3, frame_layout="middle"),
    "blank_inside": dict(blank_id=1, pad_label=-1, frame_layout="anywhere"),
    "many_repeats": dict(repeat_probability=0.8, min_label_length=2),
}
# float32 runs one case only, for the same reason.
CASES_AND_DTYPES = [(case, "float64") for case in CASES] + [("blank_inside", "float32")]


def make_problem(case: str, seed: int = 0) -> tuple[Problem, int]:
    rng = np.random.default_rng(seed + sorted(CASES).index(case))
    return random_problem(rng, *SHAPE, **CASES[case]), CASES[case].get("blank_id", 0)


def hand_problem(sequences, *, logits=None) -> Problem:
    """A problem of ``SHAPE`` from B pairs (label, number of valid frames), frames right-padded."""
    batch, frames, num_classes, num_labels = SHAPE
    if logits is None:
        logits = np.random.default_rng(len(sequences)).normal(scale=2.0, size=(batch, frames, num_classes))
    labels, label_paddings, logit_paddings = np.zeros((batch, num_labels), np.int64), np.ones((batch, num_labels)), np.ones((batch, frames))
    for b, (label, num_valid) in enumerate(sequences):
        labels[b, : len(label)], label_paddings[b, : len(label)], logit_paddings[b, :num_valid] = label, 0.0, 0.0
    return Problem(logits, logit_paddings, labels, label_paddings)


# ---------------------------------------------------------------------------------------------
# Brute force
# ---------------------------------------------------------------------------------------------


def log_softmax(x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, dtype=np.float64)
    peak = x.max(axis=-1, keepdims=True)
    return x - peak - np.log(np.exp(x - peak).sum(axis=-1, keepdims=True))


@functools.lru_cache(maxsize=None)
def all_paths(num_classes: int, frames: int, blank_id: int):
    """Every path of ``frames`` symbols, its collapsed reading, and its lattice states.

    The lattice state at frame t is 2n - 1 on a label (n the number of labels read so far,
    that one included) and 2n on a blank, as in Graves et al.
    """
    paths = np.array(list(itertools.product(range(num_classes), repeat=frames)), dtype=np.int64).reshape(-1, frames)
    readings = [collapse(tuple(path), blank_id) for path in paths.tolist()]
    is_label = paths != blank_id
    starts_label = is_label & np.concatenate([np.ones_like(paths[:, :1], bool), paths[:, 1:] != paths[:, :-1]], axis=1)
    states = 2 * np.cumsum(starts_label, axis=1) - is_label
    return paths, readings, states


def valid_alignments(log_probs: np.ndarray, label: list[int], blank_id: int):
    """(paths (P, T), states (P, T), log-probabilities (P,)) of every path reading ``label``."""
    frames, num_classes = log_probs.shape
    paths, readings, states = all_paths(num_classes, frames, blank_id)
    keep = np.array([reading == tuple(label) for reading in readings], dtype=bool)
    paths, states = paths[keep], states[keep]
    return paths, states, log_probs[np.arange(frames), paths].sum(axis=1)


def sequence(problem: Problem, b: int):
    """(valid frame indices, their log-softmax (Tv, K), the unpadded label) of sequence b."""
    valid = np.flatnonzero(problem.logit_paddings[b] == 0)
    label = [int(v) for v, p in zip(problem.labels[b], problem.label_paddings[b]) if p == 0]
    return valid, log_softmax(problem.logits[b][valid]), label


def brute_force_best(log_probs, label, blank_id):
    """The best path; among exact ties, the one whose states read backwards are largest."""
    paths, states, scores = valid_alignments(log_probs, label, blank_id)
    tied = np.flatnonzero(scores >= scores.max() - 1e-12)
    chosen = max(tied, key=lambda i: tuple(states[i, ::-1]))
    return paths[chosen], scores[chosen], len(tied)


# ---------------------------------------------------------------------------------------------
# forced_align
# ---------------------------------------------------------------------------------------------


def align(xp, problem: Problem, *, dtype="float64", blank_id=0):
    arrays, held = to_backend(xp, problem, dtype)
    tokens, scores = ctc_multi.forced_align(*arrays, blank_id=blank_id)
    xp.check_type(tokens, scores)
    assert tokens.dtype == xp.dtype("int32")
    assert scores.dtype == xp.dtype(dtype)
    return xp.to_numpy(tokens), xp.to_numpy(scores), held


def check_padded_frames(problem: Problem, tokens, scores):
    padded = problem.logit_paddings != 0
    assert np.all(tokens[padded] == -1)
    assert np.all(scores[padded] == 0.0)


@pytest.mark.parametrize(("case", "dtype"), CASES_AND_DTYPES)
def test_best_path_matches_brute_force(xp, case, dtype):
    problem, blank_id = make_problem(case)
    tokens, scores, held = align(xp, problem, dtype=dtype, blank_id=blank_id)
    check_padded_frames(problem, tokens, scores)
    for b in range(problem.logits.shape[0]):
        valid, log_probs, label = sequence(held, b)
        best_path, best_score, _ = brute_force_best(log_probs, label, blank_id)
        np.testing.assert_array_equal(tokens[b, valid], best_path)
        # Each score is the log-probability of its own frame, so they add up to the path's.
        tolerance = TOLERANCE[dtype]
        np.testing.assert_allclose(scores[b, valid], log_probs[np.arange(len(valid)), best_path], **tolerance)
        np.testing.assert_allclose(scores[b].sum(), best_score, **tolerance)


def test_ties_follow_the_documented_rule(xp):
    """Uniform frames make many paths equally likely; the backwards-largest states must win."""
    problem, blank_id = make_problem("plain")
    logits = problem.logits.copy()
    logits[np.random.default_rng(100).random(logits.shape[:2]) < 0.6] = 0.0
    tokens, _, held = align(xp, problem._replace(logits=logits), blank_id=blank_id)
    ties = 0
    for b in range(problem.logits.shape[0]):
        valid, log_probs, label = sequence(held, b)
        best_path, _, num_tied = brute_force_best(log_probs, label, blank_id)
        ties += num_tied - 1
        np.testing.assert_array_equal(tokens[b, valid], best_path)
    assert ties > 0, "the test problem has no ties to break"


def test_ties_by_hand(xp):
    """Uniform logits, every path ties. Label "1" on 2 frames: "11" (states 1 1), "10" (1 2) and
    "01" (0 1); backwards, (2 1) is the largest, so "10". On 3 frames: "100" (states 1 2 2)."""
    problem = hand_problem([([1], 2), ([1], 3), ([1, 1], 3), ([], 2)], logits=np.zeros(SHAPE[:3]))
    tokens, _, _ = align(xp, problem)
    padding = [-1] * 4
    np.testing.assert_array_equal(tokens, [[1, 0, -1] + padding, [1, 0, 0] + padding, [1, 0, 1] + padding, [0, 0, -1] + padding])


def test_viterbi_score_is_at_most_minus_loss(xp):
    """One path is at most all paths: sum of the scores <= log P(labels) = -loss."""
    problem = random_problem(np.random.default_rng(7), *SHAPE, frame_layout="middle", pad_label=-1)
    arrays, _ = to_backend(xp, problem)
    _, scores = ctc_multi.forced_align(*arrays)
    loss = xp.to_numpy(ctc_multi.ctc_loss(*arrays))
    path_log_probability = xp.to_numpy(scores).sum(axis=1)
    assert np.all(path_log_probability <= -loss + TOLERANCE["float64"]["atol"])


def test_infeasible_sequences(xp):
    """Too few valid frames for the labels (and the blank between repeats): -1 and -inf."""
    problem = hand_problem([([1, 1], 2), ([2, 3, 1], 2), ([1, 2], 3), ([3], 0)])
    tokens, scores, held = align(xp, problem)
    check_padded_frames(problem, tokens, scores)
    for b in (0, 1, 3):  # "1 1" and "2 3 1" need 3 frames each and have 2; "3" has none
        valid = problem.logit_paddings[b] == 0
        assert np.all(tokens[b] == -1)
        assert np.all(scores[b, valid] == -np.inf)
    valid, log_probs, label = sequence(held, 2)  # a feasible neighbour is unaffected
    best_path, best_score, _ = brute_force_best(log_probs, label, 0)
    np.testing.assert_array_equal(tokens[2, valid], best_path)
    np.testing.assert_allclose(scores[2].sum(), best_score, **TOLERANCE["float64"])


def test_empty_labels_align_to_blanks(xp):
    problem = hand_problem([([], 3), ([], 7), ([2], 1), ([3, 3, 0], 6)])
    tokens, scores, held = align(xp, problem, blank_id=1)
    np.testing.assert_array_equal(tokens[:2], [[1, 1, 1, -1, -1, -1, -1], [1] * 7])
    for b in range(4):
        valid, log_probs, label = sequence(held, b)
        best_path, best_score, _ = brute_force_best(log_probs, label, 1)
        np.testing.assert_array_equal(tokens[b, valid], best_path)
        np.testing.assert_allclose(scores[b].sum(), best_score, **TOLERANCE["float64"])


def test_jax_jit_and_vmap_match_eager(jax_x64):
    """JAX only: jit traces the recursion and the backtrace once; vmap adds a leading axis."""
    import jax.numpy as jnp

    problems = [make_problem("blank_inside", seed)[0] for seed in range(3)]
    stacked = [jnp.asarray(np.stack(parts)) for parts in zip(*problems)]

    def align_one(*arrays):
        return ctc_multi.forced_align(*arrays, blank_id=1)

    jitted = [jax_x64.jit(align_one)(*(array[i] for array in stacked)) for i in range(3)]
    mapped_tokens, mapped_scores = jax_x64.jit(jax_x64.vmap(align_one))(*stacked)
    for i, problem in enumerate(problems):
        eager_tokens, eager_scores = align_one(*(jnp.asarray(part) for part in problem))
        for tokens, scores in (jitted[i], (mapped_tokens[i], mapped_scores[i])):
            np.testing.assert_array_equal(np.asarray(tokens), np.asarray(eager_tokens))
            np.testing.assert_allclose(np.asarray(scores), np.asarray(eager_scores), **TOLERANCE["float64"])


def test_torchaudio_parity():
    """torch only: torchaudio.functional.forced_align (batch size 1) on each sequence."""
    if not installed("torchaudio"):
        pytest.skip("torchaudio is not installed, so there is nothing to compare with")
    import torch
    import torchaudio.functional

    if not hasattr(torchaudio.functional, "forced_align"):
        pytest.skip("this torchaudio has no functional.forced_align")
    problem, blank_id = make_problem("blank_last")
    problem = problem._replace(logit_paddings=np.sort(problem.logit_paddings, axis=1))  # torchaudio pads on the right
    tokens, scores = ctc_multi.forced_align(*(torch.as_tensor(part) for part in problem), blank_id=blank_id)
    for b in range(problem.logits.shape[0]):
        valid, log_probs, label = sequence(problem, b)
        if not label:
            continue  # torchaudio wants at least one target
        expected_tokens, expected_scores = torchaudio.functional.forced_align(
            torch.as_tensor(log_probs[None]), torch.tensor([label], dtype=torch.int32), blank=blank_id
        )
        np.testing.assert_array_equal(tokens[b, valid].numpy(), expected_tokens[0].numpy())
        np.testing.assert_allclose(scores[b, valid].numpy(), expected_scores[0].numpy(), **TOLERANCE["float64"])


# ---------------------------------------------------------------------------------------------
# merge_tokens
# ---------------------------------------------------------------------------------------------


def test_merge_tokens_by_hand(xp):
    """Blank 2; a blank splits equal labels, a padded frame (-1) does not; end is exclusive."""
    tokens = np.array(
        [
            [2, 5, 5, 2, 5, 0, 0, 2, -1],
            [-1, 3, -1, 3, 2, 2, 4, 4, 4],
            [-1, -1, -1, -1, -1, -1, -1, -1, -1],
        ],
        dtype=np.int32,
    )
    scores = np.array(
        [
            [-0.5, -1.0, -2.0, -0.1, -4.0, -0.25, -0.75, -0.3, 0.0],
            [0.0, -1.0, 0.0, -3.0, -0.2, -0.2, -1.0, -2.0, -3.0],
            [-np.inf] * 9,
        ]
    )
    spans = ctc_multi.merge_tokens(xp.asarray(tokens), xp.asarray(scores), blank_id=2)
    assert spans == [
        [(5, 1, 3, -1.5), (5, 4, 5, -4.0), (0, 5, 7, -0.5)],
        [(3, 1, 4, -2.0), (4, 6, 9, -2.0)],
        [],
    ]
    assert spans[0][0].label == 5 and spans[0][0].start == 1 and spans[0][0].end == 3


def test_merge_tokens_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match="same shape"):
        ctc_multi.merge_tokens(np.zeros((2, 3), dtype=np.int32), np.zeros((2, 4)))


def test_merge_tokens_rejects_float_tokens():
    """A float token would become a span's label (1.5) without a word."""
    with pytest.raises(ValueError, match="^tokens must be an integer array"):
        ctc_multi.merge_tokens(np.array([[0.0, 1.5, 1.5]]), np.zeros((1, 3)))
    assert ctc_multi.merge_tokens([[]], [[]]) == [[]]  # no frames: a list reads as float, and that is fine


@pytest.mark.parametrize("blank_id, message", [("0", "must be an integer"), (1.0, "must be an integer"), (True, "must be an integer"), (-1, "must be a class id, at least 0")])
def test_merge_tokens_rejects_a_blank_id_that_is_not_a_class_id(blank_id, message):
    """Unchecked, a blank_id of "0" or -1 matched no token, and the blank frames came back as
    spans of label 0, as forced_align would refuse the same blank_id."""
    with pytest.raises(ValueError, match=f"^blank_id {message}"):
        ctc_multi.merge_tokens(np.array([[0, 1, -1, 1]]), np.zeros((1, 4)), blank_id=blank_id)
    assert ctc_multi.merge_tokens(np.array([[0, 1]]), np.zeros((1, 2)), blank_id=np.int64(0)) == [[ctc_multi.TokenSpan(1, 1, 2, 0.0)]]


def test_merge_tokens_takes_bfloat16_scores():
    """torch's and JAX's bfloat16 scores (NumPy has no bfloat16), read exactly as float32."""
    tokens, scores = np.array([[0, 3, 3, 0, 5]]), np.array([[-0.5, -0.25, -0.75, 0.0, -1.0]])
    forms = []
    if installed("torch"):
        import torch

        forms.append((torch.as_tensor(tokens), torch.tensor(scores, dtype=torch.bfloat16)))
    if installed("jax"):
        import jax.numpy as jnp

        forms.append((jnp.asarray(tokens), jnp.asarray(scores, dtype=jnp.bfloat16)))
    if not forms:
        pytest.skip("neither torch nor jax is installed")
    for form in forms:
        assert ctc_multi.merge_tokens(*form) == [[(3, 1, 3, -0.5), (5, 4, 5, -1.0)]]


# ---------------------------------------------------------------------------------------------
# ctc_posteriors
# ---------------------------------------------------------------------------------------------


def brute_force_posteriors(log_probs, label, blank_id, num_labels):
    """(Tv, N) label posteriors and (Tv,) blank posteriors as probability-weighted path counts."""
    paths, states, scores = valid_alignments(log_probs, label, blank_id)
    weights = np.exp(scores - np.logaddexp.reduce(scores))
    labels = np.stack([(weights[:, None] * (states == 2 * n + 1)).sum(axis=0) for n in range(num_labels)], axis=1)
    return labels, (weights[:, None] * (paths == blank_id)).sum(axis=0)


@pytest.mark.parametrize(("case", "dtype"), CASES_AND_DTYPES)
def test_posteriors_match_brute_force(xp, case, dtype):
    problem, blank_id = make_problem(case, seed=10)
    arrays, held = to_backend(xp, problem, dtype)
    posteriors = ctc_multi.ctc_posteriors(*arrays, blank_id=blank_id)
    xp.check_type(posteriors)
    assert posteriors.dtype == xp.dtype(dtype)
    posteriors = xp.to_numpy(posteriors)
    (batch, frames), num_labels = problem.logit_paddings.shape, problem.labels.shape[1]
    assert posteriors.shape == (batch, frames, num_labels)
    tolerance = TOLERANCE[dtype]
    padded = problem.logit_paddings != 0
    assert np.all(posteriors[padded] == 0.0)
    for b in range(batch):
        valid, log_probs, label = sequence(held, b)
        expected, blank = brute_force_posteriors(log_probs, label, blank_id, num_labels)
        np.testing.assert_allclose(posteriors[b, valid], expected, **tolerance)
        # Every valid frame is on exactly one label or on a blank.
        np.testing.assert_allclose(posteriors[b, valid].sum(axis=1) + blank, np.ones(len(valid)), **tolerance)


def test_posteriors_by_hand(xp):
    """Uniform logits. Sequences that cannot be aligned get zeros, and so do padded frames;
    "1 2" on 2 frames has one path; "3" on 1 frame too; "1" on 2 frames: "11", "10", "01"."""
    problem = hand_problem([([1, 1], 2), ([1, 2], 2), ([3], 1), ([1], 2)], logits=np.zeros(SHAPE[:3]))
    arrays, _ = to_backend(xp, problem)
    posteriors = xp.to_numpy(ctc_multi.ctc_posteriors(*arrays))
    expected = np.zeros(SHAPE[:2] + SHAPE[3:])
    expected[1, :2, :2] = np.eye(2)
    expected[2, 0, 0] = 1.0
    expected[3, :2, 0] = 2 / 3
    np.testing.assert_allclose(posteriors, expected, **TOLERANCE["float64"])


def test_float32_posteriors_are_probabilities(xp):
    """Peaky float32 logits (6 times a standard normal, 400 frames, 60 labels): rounding put
    posteriors a few ulps outside [0, 1] (-6e-8, 1.000001), where their log is NaN."""
    rng = np.random.default_rng(0)
    problem = Problem(6 * rng.standard_normal((3, 400, 20)), np.zeros((3, 400)), rng.integers(1, 20, (3, 60)), np.zeros((3, 60)))
    arrays, _ = to_backend(xp, problem, "float32")
    posteriors = xp.to_numpy(ctc_multi.ctc_posteriors(*arrays))
    assert posteriors.min() >= 0.0 and posteriors.max() <= 1.0
    assert posteriors.max() > 0.99  # and not all zero: frames the labels hold


def test_arrays_on_another_array_api_device():
    """array_api_strict's second device (standing in for a GPU namespace such as CuPy, whose
    arrays refuse np.asarray): merge_tokens reads forced_align's results there, and such labels
    and float16 paddings (array_api_strict has no float16) beside other logits are taken by value."""
    xs = pytest.importorskip("array_api_strict")
    other = xs.Device("device1")
    problem = random_problem(np.random.default_rng(70), 2, 6, 4, 2, min_label_length=1)
    tokens, scores = ctc_multi.forced_align(*problem)
    there = ctc_multi.forced_align(xs.asarray(problem.logits, device=other), *problem[1:])
    assert there[0].device == other
    assert ctc_multi.merge_tokens(*there) == ctc_multi.merge_tokens(tokens, scores)
    loss = ctc_multi.ctc_loss(problem.logits, problem.logit_paddings, xs.asarray(problem.labels, device=other), problem.label_paddings)
    np.testing.assert_allclose(loss, ctc_multi.ctc_loss(*problem), **TOLERANCE["float64"])
    strict_logits = xs.asarray(problem.logits.astype(np.float32))
    loss = ctc_multi.ctc_loss(strict_logits, problem.logit_paddings.astype(np.float16), *problem[2:])
    np.testing.assert_allclose(np.asarray(loss), ctc_multi.ctc_loss(problem.logits.astype(np.float32), *problem[1:]), **TOLERANCE["float32"])


def test_a_sequence_whose_every_path_has_probability_zero_has_no_alignment(xp):
    """-inf logits (masked classes) that no path reading the labels can avoid: every path has
    probability 0. The alignment came back as a path that reads no labels (all blank), scored
    0 (probability 1, above -loss), because a -inf emission, floored to "log 0", cost what a
    forbidden move costs. Now: no alignment (token -1, score -inf), as for too few frames, and
    no overflow on the way (a blank and a label of probability 0 on every frame of six).
    Beside them, a sequence with a -inf logit that a valid path avoids keeps its path."""
    inf = np.inf
    cases = [
        (np.array([[0.0, -inf, 0.0]]), [1], None),  # one frame, the label's class impossible
        (np.array([[0.0, -inf, 0.0], [0.0, -inf, 0.0]]), [1], None),
        (np.array([[-inf, -inf, 0.0]] * 6), [1], None),  # blank and label impossible
        (np.array([[0.0, -inf, 0.0], [0.0, 0.0, 0.0], [0.0, -inf, 0.0]]), [1], [0, 1, 0]),  # avoidable
    ]
    for logits, labels, expected in cases:
        arrays, _ = to_backend(xp, Problem(logits[None], np.zeros((1, len(logits))), np.array([labels]), np.zeros((1, 1))))
        with np.errstate(all="raise"):  # no overflow (NumPy's loop) on the way
            tokens, scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
        if expected is None:
            assert tokens.tolist() == [[-1] * len(logits)]
            assert np.all(scores == -inf)
        else:
            assert tokens.tolist() == [expected]
            np.testing.assert_allclose(scores, -np.log([[2.0, 3.0, 2.0]]), rtol=1e-6)


def test_a_nan_or_plus_inf_logit_on_a_valid_frame_leaves_no_alignment(xp):
    """A NaN logit on a valid frame came back as a path that does not read the labels (labels
    [4, 2], tokens all 2) with NaN scores; a +inf one as "no path" (-inf scores), as if a class
    had probability 0. Neither frame has a softmax: now both give token -1 and score NaN on
    every valid frame, as the loss is NaN. A NaN in a padded frame changes nothing, and the
    batch's other sequences keep their paths."""
    rng = np.random.default_rng(5)
    logits = rng.standard_normal((4, 10, 5))
    logits[0, 0, 0], logits[1, 3, 2], logits[3, 9, 1] = np.nan, np.inf, np.nan
    paddings = np.zeros((4, 10))
    paddings[:, 9] = [0, 0, 0, 1]
    problem = Problem(logits, paddings, np.array([[4, 2], [1, 3], [2, 2], [1, 1]]), np.zeros((4, 2)))
    arrays, _ = to_backend(xp, problem)
    with np.errstate(invalid="ignore"):  # NumPy's log-softmax of the NaN frames
        tokens, scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
    assert np.all(tokens[:2] == -1) and np.all(np.isnan(scores[:2]))
    expected = Problem(*(a[2:] for a in problem))._replace(logits=np.where(np.isfinite(logits[2:]), logits[2:], 0.0))
    expected_tokens, expected_scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*to_backend(xp, expected)[0]))
    np.testing.assert_array_equal(tokens[2:], expected_tokens)
    np.testing.assert_allclose(scores[2:], expected_scores, rtol=1e-12)
    assert list(collapse(tokens[2], 0)) == [2, 2] and list(collapse(tokens[3][:9], 0)) == [1, 1]


def test_a_valid_frame_with_no_finite_logit_leaves_no_alignment(xp):
    """A valid frame of -inf logits has no softmax either (its log-probabilities are NaN, as
    is the loss): it came back as a path that read the labels, tokens [0, 1, 1, 1, ...], with
    NaN scores (a review's finding). Now token -1 and score NaN, as for a NaN logit; a padded
    frame of -inf logits changes nothing."""
    rng = np.random.default_rng(6)
    logits = rng.standard_normal((2, 10, 5))
    logits[0, 4, :] = -np.inf
    logits[1, 9, :] = -np.inf
    paddings = np.zeros((2, 10))
    paddings[1, 9] = 1.0
    problem = Problem(logits, paddings, np.array([[1, 3], [2, 4]]), np.zeros((2, 2)))
    arrays, _ = to_backend(xp, problem)
    with np.errstate(invalid="ignore"):  # NumPy's log-softmax of the -inf frame
        tokens, scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
        loss = xp.to_numpy(ctc_multi.ctc_loss(*arrays))
    assert np.all(tokens[0] == -1) and np.all(np.isnan(scores[0])) and np.isnan(loss[0])
    alone = Problem(*(a[1:] for a in problem))._replace(logits=np.where(np.isfinite(logits[1:]), logits[1:], 0.0))
    expected_tokens, expected_scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*to_backend(xp, alone)[0]))
    np.testing.assert_array_equal(tokens[1:], expected_tokens)
    np.testing.assert_allclose(scores[1:], expected_scores, rtol=1e-12)
    assert np.isfinite(loss[1])


def test_a_valid_path_costing_more_than_minus_log_epsilon_still_wins(xp):
    """Near-tight alignments of peaky logits, whose best valid path costs more than 1e5 nats:
    with the loss's "log 0" of -1e5, a path that enters the lattice past its first state (or
    jumps a blank it may not) cost only 1e5 and came back as the alignment, collapsing to fewer
    labels. Two frames with the blank certain (its only valid path "1 2" costs 1.2e5), and 200
    frames for 200 labels with logits 300 times a standard normal."""
    margin = 6e4
    logits = np.array([[[0.0, -margin, -margin], [0.0, -margin, -margin]]])
    arrays, _ = to_backend(xp, Problem(logits, np.zeros((1, 2)), np.array([[1, 2]]), np.zeros((1, 2))))
    tokens, scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
    assert tokens.tolist() == [[1, 2]]
    np.testing.assert_allclose(scores.sum(), -2 * margin, rtol=1e-12)

    rng = np.random.default_rng(71)
    labels = np.cumsum(rng.integers(1, 4, size=(1, 200)), axis=1) % 4 + 1  # neighbours differ
    problem = Problem(300 * rng.standard_normal((1, 200, 5)), np.zeros((1, 200)), labels, np.zeros((1, 200)))
    arrays, _ = to_backend(xp, problem)
    tokens, _ = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
    assert list(collapse(tokens[0], 0)) == labels[0].tolist()


def test_no_labels_and_a_blank_of_probability_zero_leave_no_alignment(xp):
    """No labels (both padded, holding classes 1 and 2 in range) and the blank's logit -inf on
    frame 1: the only path, all blanks, has probability 0, so no alignment (token -1, score
    -inf). The backtrace must compare the final blank (state 0) with itself when there is no
    last label (mutation A01: it read state -1, the padded labels' last state, reachable
    through the padded labels 1 2 without a blank on frame 1, and returned all blanks with
    scores [-1.1, -inf, -1.1, -1.1])."""
    logits = np.zeros((1, 4, 3))
    logits[0, 1, 0] = -np.inf
    problem = Problem(logits, np.zeros((1, 4)), np.array([[1, 2]]), np.ones((1, 2)))
    arrays, _ = to_backend(xp, problem)
    tokens, scores = (xp.to_numpy(r) for r in ctc_multi.forced_align(*arrays))
    assert tokens.tolist() == [[-1, -1, -1, -1]]
    assert np.all(scores == -np.inf)
