"""Test data and independent expected values shared by several test files.

Nothing here calls ctc_multi: problems are generated in NumPy, expected values come from the
float64 reference in ``reference.py``, from :func:`reference_forward_probs` (optax's alpha
conventions written as a plain loop), or from counting paths (:func:`uniform_logits_loss`).
"""

from __future__ import annotations

import itertools
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pytest
from hypothesis import strategies as st

# ctc_multi's and optax's default stand-in for log(0).
LOG_EPSILON = -1e5


class Problem(NamedTuple):
    """One batch of CTC inputs as NumPy arrays; unpack it as ``*problem`` into the CTC functions."""

    logits: np.ndarray  # (B, T, K) float64
    logit_paddings: np.ndarray  # (B, T) float64, 1.0 on padded frames
    labels: np.ndarray  # (B, N) int64
    label_paddings: np.ndarray  # (B, N) float64, 1.0 on padded labels


def frames_needed(label) -> int:
    """The fewest frames that can emit ``label``: one per label, plus a blank between repeats."""
    return len(label) + sum(1 for a, b in zip(label[:-1], label[1:]) if a == b)


def feasible_rows(problem: Problem) -> np.ndarray:
    """(B,) bool: whether each sequence's valid frames can hold its unpadded labels."""
    valid_frames = (problem.logit_paddings == 0).sum(axis=1)
    needed = [frames_needed([int(v) for v, p in zip(row, pads) if p == 0]) for row, pads in zip(problem.labels, problem.label_paddings)]
    return np.array(needed) <= valid_frames


def assert_gradient_structure(grad: np.ndarray, logit_paddings: np.ndarray, atol: float) -> None:
    """Finite; exactly zero on padded frames; each valid frame sums to zero over the classes."""
    assert np.all(np.isfinite(grad)), "non-finite gradient"
    padded = logit_paddings != 0
    assert np.all(grad[padded] == 0.0), "padded frames must get exactly zero gradient"
    np.testing.assert_allclose(grad[~padded].sum(axis=-1), 0.0, atol=atol)


def random_problem(
    rng: np.random.Generator,
    B: int,
    T: int,
    K: int,
    N: int,
    *,
    blank_id: int = 0,
    pad_label: int = 0,
    frame_layout: str = "right",
    repeat_probability: float = 0.3,
    min_label_length: int = 0,
    scale: float = 2.0,
) -> Problem:
    """A random, feasible CTC problem.

    Every sequence has at least one valid frame and enough valid frames for its labels (label
    lengths are cut down when ``T`` is too short). Labels never use ``blank_id``; padded label
    positions hold ``pad_label`` (which may be outside [0, K), e.g. -1).

    frame_layout: "right" (valid frames first, padding after), "middle" (first and last frame
      valid, the padded frames in between, whenever there is room for both) or "anywhere"
      (a random subset of frames is valid).
    """
    if frame_layout not in ("right", "middle", "anywhere"):
        raise ValueError(f"unknown frame_layout {frame_layout!r}")
    classes = [c for c in range(K) if c != blank_id]
    logits = rng.normal(scale=scale, size=(B, T, K))
    logit_paddings = np.ones((B, T))
    labels = np.full((B, N), pad_label, dtype=np.int64)
    label_paddings = np.ones((B, N))
    for b in range(B):
        length = int(rng.integers(min(min_label_length, N), N + 1)) if classes else 0
        label: list[int] = []
        for _ in range(length):
            if label and rng.random() < repeat_probability:
                label.append(label[-1])
            else:
                label.append(int(rng.choice(classes)))
        while frames_needed(label) > T:
            label.pop()
        labels[b, : len(label)] = label
        label_paddings[b, : len(label)] = 0.0
        num_valid = int(rng.integers(max(frames_needed(label), 1), T + 1))
        if frame_layout == "right" or num_valid == T:
            valid = np.arange(num_valid)
        elif frame_layout == "middle" and num_valid >= 2:
            inner = rng.choice(np.arange(1, T - 1), size=num_valid - 2, replace=False)
            valid = np.concatenate([[0, T - 1], inner])
        else:
            valid = rng.choice(T, size=num_valid, replace=False)
        logit_paddings[b, valid] = 0.0
    return Problem(logits, logit_paddings, labels, label_paddings)


def poison_padded_frames(problem: Problem) -> Problem:
    """The same problem with NaN, +inf and -inf written into the padded frames."""
    logits = problem.logits.copy()
    poison = np.array([np.nan, np.inf, -np.inf])
    padded = problem.logit_paddings != 0
    cycle = np.resize(poison, logits.shape)
    logits[padded] = cycle[padded]
    return problem._replace(logits=logits)


# ---------------------------------------------------------------------------------------------
# Expected values
# ---------------------------------------------------------------------------------------------


def _log_softmax(x: np.ndarray) -> np.ndarray:
    peak = np.max(x)
    return x - peak - math.log(np.sum(np.exp(x - peak)))


def reference_forward_probs(logits, logit_paddings, labels, label_paddings, blank_id: int = 0):
    """optax's ``(logalpha_blank (T, B, N + 1), logalpha_nonblank (T, B, N))`` in float64.

    Graves et al. (2006) alpha (emission of frame t included), in the conventions optax
    documents and returns: the lattice runs over all N label positions, padded ones included
    (a padded label outside [0, K) emits with probability one, like optax's all-zero one-hot
    row); padded frames carry the state over; on the last frame, blank entry n also holds the
    paths that end on label n. log 0 is -inf here (optax and ctc_multi use log_epsilon).
    ``label_paddings`` only matters through the labels' values, as in optax.
    """
    del label_paddings
    logits = np.asarray(logits, dtype=np.float64)
    batch, frames, num_classes = logits.shape
    num_labels = np.asarray(labels).shape[1]
    states = 2 * num_labels + 1
    blank = np.full((frames, batch, num_labels + 1), -np.inf)
    nonblank = np.full((frames, batch, num_labels), -np.inf)
    for b in range(batch):
        label = [int(v) for v in labels[b]]
        alpha = [-np.inf] * states
        alpha[0] = 0.0  # a virtual frame before the first one, every path in the first blank
        for t in range(frames):
            if logit_paddings[b][t] == 0:
                log_probs = _log_softmax(logits[b, t])
                new = []
                for s in range(states):
                    if s % 2 == 0:
                        emission = log_probs[blank_id]
                    else:
                        symbol = label[s // 2]
                        emission = log_probs[symbol] if 0 <= symbol < num_classes else 0.0
                    terms = [alpha[s]]
                    if s >= 1:
                        terms.append(alpha[s - 1])
                    if s % 2 == 1 and s >= 3 and label[s // 2] != label[s // 2 - 1]:
                        terms.append(alpha[s - 2])
                    new.append(np.logaddexp.reduce(terms) + emission)
                alpha = new
            blank[t, b] = alpha[0::2]
            nonblank[t, b] = alpha[1::2]
        blank[-1, b, 1:] = np.logaddexp(blank[-1, b, 1:], nonblank[-1, b])
    return blank, nonblank


def collapse(path, blank_id: int) -> tuple[int, ...]:
    """The CTC many-to-one map B: merge repeated symbols, then drop blanks."""
    merged = [symbol for i, symbol in enumerate(path) if i == 0 or symbol != path[i - 1]]
    return tuple(symbol for symbol in merged if symbol != blank_id)


def uniform_logits_loss(num_classes: int, frames: int, label, blank_id: int) -> float:
    """Exact CTC loss for uniform logits by counting paths: -log(#paths reading label / K^T)."""
    count = sum(1 for path in itertools.product(range(num_classes), repeat=frames) if collapse(path, blank_id) == tuple(label))
    return math.inf if count == 0 else frames * math.log(num_classes) - math.log(count)


# ---------------------------------------------------------------------------------------------
# Moving data between NumPy and a backend, and comparing
# ---------------------------------------------------------------------------------------------


def round_to(xp, logits: np.ndarray, dtype: str) -> tuple[object, np.ndarray]:
    """``logits`` as a backend array of ``dtype``, and the values it really holds, as float64."""
    if not hasattr(xp.namespace, dtype):
        pytest.skip(f"{xp.name} has no {dtype}")
    array = xp.asarray(logits, dtype=xp.dtype(dtype))
    if xp.name == "torch":
        held = array.double().numpy()
    else:
        held = np.asarray(xp.to_numpy(array), dtype=np.float64)
    return array, held


def to_backend(xp, problem: Problem, dtype: str = "float64") -> tuple[tuple, Problem]:
    """The problem's arrays as ``xp`` arrays (logits in ``dtype``), and the problem as held."""
    logits, held = round_to(xp, problem.logits, dtype)
    arrays = (logits, xp.asarray(problem.logit_paddings), xp.asarray(problem.labels), xp.asarray(problem.label_paddings))
    return arrays, problem._replace(logits=held)


def assert_log_probs_close(actual, expected, *, log_epsilon: float = LOG_EPSILON, rtol: float, atol: float) -> None:
    """Reachable entries (expected above log_epsilon / 10) match; the others stay below it too."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape
    assert not np.any(np.isnan(actual)), "NaN in the log probabilities"
    reachable = expected > log_epsilon / 10
    np.testing.assert_allclose(actual[reachable], expected[reachable], rtol=rtol, atol=atol)
    unreachable = actual[~reachable]
    assert np.all(unreachable < log_epsilon / 10), f"unreachable states above log_epsilon / 10: {unreachable.max()}"


def assert_impossible(loss, log_epsilon: float = LOG_EPSILON) -> None:
    """An impossible alignment costs about -log_epsilon (as in optax): finite, never NaN."""
    loss = np.asarray(loss, dtype=np.float64)
    assert np.all(np.isfinite(loss)), f"impossible alignment gave {loss}"
    np.testing.assert_allclose(loss, -log_epsilon, rtol=0.01)


def loss_gradient(xp, function, logits, *rest, **options) -> np.ndarray:
    """d sum(loss) / d logits through the backend's autodiff (jax.grad or torch autograd).

    ``function`` is a ctc_multi function; a tuple result counts by its first entry (the loss).
    Skips on backends without autodiff (NumPy, array_api_strict).
    """

    def total_loss(x):
        result = function(x, *rest, **options)
        loss = result[0] if isinstance(result, tuple) else result
        xp.check_type(loss)
        return loss.sum()

    if xp.name == "jax":
        import jax

        return np.asarray(jax.grad(total_loss)(logits))
    if xp.name == "torch":
        leaf = logits.detach().clone().requires_grad_(True)
        total_loss(leaf).backward()
        return leaf.grad.detach().cpu().numpy()
    pytest.skip(f"{xp.name} has no automatic differentiation")


def compiled(xp, function):
    """``function`` under jax.jit on JAX, as is elsewhere.

    One compile per test (about a second) costs less than eager dispatch of the same calls, and
    it runs ctc_multi on traced inputs, as a jitted training step does (the value checks that
    need concrete values are skipped there). Eager JAX is covered by tests/test_losses.py
    (``loss_gradient``).
    """
    if xp.name == "jax":
        import jax

        return jax.jit(function)
    return function


def autodiff(xp, scalar_function, x, *rest) -> np.ndarray | None:
    """d scalar_function(x, *rest) / dx through jax.grad or torch autograd; None without autodiff."""
    if xp.name == "jax":
        import jax

        return np.asarray(compiled(xp, jax.grad(scalar_function))(x, *rest))
    if xp.name == "torch":
        leaf = x.detach().clone().requires_grad_(True)
        scalar_function(leaf, *rest).backward()
        return leaf.grad.detach().cpu().numpy()
    return None


def run_in_fresh_python(script: str, *, timeout: float | None = None, **environment: str) -> subprocess.CompletedProcess:
    """Run ``script`` in a new interpreter that imports this checkout's ctc_multi (``timeout``:
    seconds after which a hung script is stopped, raising ``subprocess.TimeoutExpired``)."""
    root = Path(__file__).resolve().parent.parent
    path = os.pathsep.join(filter(None, [str(root), os.environ.get("PYTHONPATH")]))
    env = dict(os.environ, PYTHONPATH=path, **environment)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=timeout)


@st.composite
def small_problems(draw) -> tuple[Problem, int]:
    """B <= 4, T <= 12, K <= 6, N <= 5; frames padded anywhere; any blank_id; repeated labels.

    Some sequences cannot be aligned (too few valid frames); padded label positions hold
    the blank, -1 or K.
    """
    B, T, K, N = draw(st.integers(1, 4)), draw(st.integers(1, 12)), draw(st.integers(1, 6)), draw(st.integers(0, 5))
    blank_id = draw(st.integers(0, K - 1))
    classes = [c for c in range(K) if c != blank_id]
    labels = np.full((B, N), draw(st.sampled_from([blank_id, -1, K])), dtype=np.int64)
    label_paddings = np.ones((B, N))
    logit_paddings = np.ones((B, T))
    for b in range(B):
        logit_paddings[b] = [0.0 if valid else 1.0 for valid in draw(st.lists(st.booleans(), min_size=T, max_size=T))]
        label: list[int] = []
        for _ in range(draw(st.integers(0, N)) if classes else 0):
            label.append(label[-1] if label and draw(st.booleans()) else draw(st.sampled_from(classes)))
        labels[b, : len(label)] = label
        label_paddings[b, : len(label)] = 0.0
    scale = draw(st.sampled_from([0.5, 2.0, 8.0]))
    logits = np.random.default_rng(draw(st.integers(0, 2**32 - 1))).normal(scale=scale, size=(B, T, K))
    return Problem(logits, logit_paddings, labels, label_paddings), blank_id
