"""Forced alignment and label posteriors from the same lattice recursion as the loss.

:func:`forced_align` runs :func:`ctc_multi.lattice.run_recursion` under the max-plus semiring
(:class:`~ctc_multi.lattice.MaxSemiring`), which also returns, per frame and lattice state, the
move that won (stay, advance one state, or skip a blank). A second scan, backwards over the
frames with the same backend adapter, follows those moves from the best final state: the
backtrace. :func:`ctc_posteriors` takes the state occupancies that the loss's gradient uses
(the backend's ``forward_and_occupancy``). Nothing here is written per framework.

Everything happens in the lattice's renormalised log domain (each frame's state vector has its
maximum subtracted): comparisons between states of the same frame do not depend on the offset.
"""

from __future__ import annotations

import dataclasses
import math
import operator
from typing import Any, NamedTuple

import numpy as np

from .inputs import as_blank_id, as_numpy, check_inputs
from .lattice import MaxSemiring, frames_without_softmax, log_softmax_of_classes
from .losses import DEFAULT_LOG_EPSILON, _Problem

Array = Any


class TokenSpan(NamedTuple):
    """One label of an alignment: frames ``start`` (inclusive) to ``end`` (exclusive)."""

    label: int
    start: int
    end: int
    score: float  # mean log-probability of the label over its valid frames


def forced_align(logits: Array, logit_paddings: Array, labels: Array, label_paddings: Array, *, blank_id: int = 0) -> tuple[Array, Array]:
    """The most likely CTC path (Viterbi) for each sequence, and the log-probability of each frame on it.

    Args:
      logits: (B, T, K)-array of unnormalised class scores; the log-softmax is applied inside.
        Its namespace (NumPy, JAX, torch, or any array-API namespace) and device decide where
        the computation runs and what comes back.
      logit_paddings: (B, T)-array, 1 (or True) where a frame is padding; padded frames may sit
        anywhere and are skipped.
      labels: (B, N)-array of integer class ids in [0, K), right-padded.
      label_paddings: (B, N)-array, 1 (or True) where a label is padding.
      blank_id: class id of the blank, in [0, K).

    Returns:
      ``(tokens, scores)``: ``tokens`` (B, T) int32, the class emitted at frame t on the best
      path (the blank or a label); ``scores`` (B, T), its log-probability ``log_softmax(logits)``
      at that frame, float32 for float32/float16/bfloat16 logits, float64 for float64 logits.
      The sum of a sequence's scores is the log-probability of its best path. Padded frames get
      token -1 and score 0. A sequence that no path can align (fewer valid frames than labels
      plus the blanks needed between repeated labels, or every path through a frame where its
      class has probability 0, a ``-inf`` logit) gets token -1 on every frame and score
      ``-inf`` on its valid frames. A sequence with a NaN or ``+inf`` logit on a valid frame
      (no softmax there) has no alignment either: token -1 on every frame, score NaN on its
      valid frames. The results are not differentiable (gradients are stopped).

    Ties between equally likely best paths are broken deterministically: the path returned is
    the one whose lattice states, read from the last frame back to the first, are
    lexicographically largest. The backtrace ends on the final blank rather than on the last
    label and, going back, prefers staying on a state over stepping back one state (the
    previous blank or label) over stepping back two (skipping a blank). So where tied paths
    differ, the returned one is the furthest along the labels at the last frame they differ.

    Works under ``jax.jit`` and ``jax.vmap`` (over extra leading axes) and on torch (CPU or CUDA).

    Example:
      >>> import numpy as np, ctc_multi
      >>> logits = np.log(np.array([[[0.1, 0.9], [0.2, 0.8], [0.7, 0.3]]]))
      >>> tokens, scores = ctc_multi.forced_align(logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
      >>> tokens.tolist(), np.round(np.exp(scores), 3).tolist()
      ([[1, 1, 0]], [[0.9, 0.8, 0.7]])
    """
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=DEFAULT_LOG_EPSILON)
    inputs = dataclasses.replace(inputs, log_epsilon=viterbi_log_epsilon(inputs.xp, inputs.logits.dtype, inputs.logits.shape[1]))
    run = inputs.backend.compiled(_forced_align, num_static=1)
    return run(_Problem.of(inputs), inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded)


def viterbi_log_epsilon(xp, dtype, num_frames: int) -> float:
    """``forced_align``'s "log 0": as low as the compute ``dtype`` allows while every sum the
    recursion makes stays finite.

    Not the loss's -1e5: with it, a path that enters the lattice past its first state, or jumps
    a blank it may not, cost 1e5 and won over a valid path that costs more (a near-tight
    alignment of peaky logits), and came back as the alignment. Not a fixed fraction of the
    dtype's lowest value either: a state that emits with probability 0 (a -inf logit, floored
    to this) frame after frame adds this once per frame, and a third of the lowest value
    overflowed to -inf after three frames (NaN in the offsets). A state's value is at least
    ``(T + 1)`` times this (it may stay put, and each frame's emission is floored to this),
    and a step adds at most two more (a forbidden jump, an emission) beside the edge states'
    half of the lowest value: so a ``2 (T + 4)``-th of the lowest value keeps all of them finite.
    A symbolic T (``jax.export`` for any number of frames) takes the bound for any int32 count.
    """
    try:
        num_frames = operator.index(num_frames)
    except TypeError:
        num_frames = 2**31 - 1
    return float(xp.finfo(dtype).min) / (2 * (num_frames + 4))


def _forced_align(problem: _Problem, logits, *others):
    return problem.where_the_loop_runs_fastest(_forced_align_here, problem.backend.detach(logits), *others)


def _forced_align_here(problem: _Problem, *arrays):
    xp, scan = problem.xp, problem.backend.scan
    lattice = problem.lattice(*arrays)
    final, (_, choices) = problem.recursion(lattice, semiring=MaxSemiring)

    log_state, offset_hi, offset_lo = final  # (B, S) renormalised, which leaves the comparison below unchanged
    final_blank = 2 * xp.astype(lattice.label_lengths, problem.index_dtype)
    last_label = xp.maximum(final_blank - 1, xp.zeros_like(final_blank))
    on_blank = _pick(xp, log_state, final_blank)
    on_label = _pick(xp, log_state, last_label)
    end_state = xp.where(on_blank >= on_label, final_blank, last_label)
    # A best path that costs at least a "log 0" (viterbi_log_epsilon) went through a forbidden
    # move or an emission of probability 0 (a -inf logit, floored to log 0): every path that
    # reads the labels has probability 0, and the best one is no alignment. A valid path of
    # positive probability costs a sum of finite log-probabilities, far less.
    best = (xp.maximum(on_blank, on_label) + offset_lo) + offset_hi
    aligned = lattice.feasible & ~(best <= problem.log_epsilon)

    _, states = scan(_backtrace_step(xp), end_state, (choices, lattice.frame_padded), reverse=True)
    states = xp.permute_dims(states, (1, 0))  # (B, T)
    classes = xp.take_along_axis(lattice.state_classes, states, axis=1)
    scores = log_softmax_of_classes(xp, lattice, classes)

    padded = lattice.logit_padded
    # A valid frame without a softmax (a NaN or +inf logit, or none finite) leaves no path to compare: no
    # alignment either, its scores NaN.
    undefined = xp.any(frames_without_softmax(xp, arrays[0], padded), axis=1)
    infeasible = ~(aligned & ~undefined)[:, None]
    tokens = xp.astype(classes, xp.int32)
    tokens = xp.where(padded | infeasible, xp.full_like(tokens, -1), tokens)
    scores = xp.where(infeasible, xp.full_like(scores, -math.inf), scores)
    scores = xp.where(undefined[:, None], xp.full_like(scores, math.nan), scores)
    scores = xp.where(padded, xp.zeros_like(scores), scores)
    return tokens, scores


def _pick(xp, values: Array, index: Array) -> Array:
    """(B, S) values, (B,) indices -> (B,) ``values[b, index[b]]``."""
    return xp.take_along_axis(values, index[:, None], axis=1)[:, 0]


def _backtrace_step(xp):
    """The reverse-scan step: carry the state at frame t, emit it, move to the state at t - 1.

    frame: (choices (B, S) int8, the move that won at each state of frame t; padded (B,)).
    Padded frames carried the forward state over, so the backtrace stays put on them.
    """

    def step(state, frame):
        choices, padded = frame
        move = xp.astype(_pick(xp, choices, state), state.dtype)
        previous = xp.where(padded, state, state - move)
        # Only the (ignored) paths of infeasible sequences could step below the first state;
        # keep them in range so that no gather anywhere sees a negative index.
        return xp.maximum(previous, xp.zeros_like(previous)), state

    return step


def merge_tokens(tokens: Array, scores: Array, *, blank_id: int = 0) -> list[list[TokenSpan]]:
    """Per sequence, the spans of frames on which a forced alignment emits each label.

    Args:
      tokens: (B, T) integer array, as returned by :func:`forced_align` (any backend).
      scores: (B, T) floating array of the matching per-frame log-probabilities.
      blank_id: class id of the blank; blank frames belong to no span.

    Returns:
      A list of B lists of :class:`TokenSpan` ``(label, start, end, score)``: consecutive
      frames with the same label form one span, from ``start`` (inclusive) to ``end``
      (exclusive, like a Python slice); ``score`` is the mean of its frames' scores. Blank
      frames end a span and are dropped. Frames with token -1 (padding) are skipped over as
      the recursion skips them: equal labels on the valid frames either side of them form one
      span, whose mean covers only valid frames.

    Example:
      >>> import numpy as np, ctc_multi
      >>> ctc_multi.merge_tokens(np.array([[0, 3, 3, 0, 5, -1]]), np.array([[-0.1, -0.25, -0.75, 0.0, -1.0, 0.0]]))
      [[TokenSpan(label=3, start=1, end=3, score=-0.5), TokenSpan(label=5, start=4, end=5, score=-1.0)]]
    """
    blank_id = as_blank_id(blank_id, None)  # K is not known here
    tokens, scores = as_numpy(tokens), as_numpy(scores)
    if tokens.ndim != 2 or scores.shape != tokens.shape:
        raise ValueError(f"tokens and scores must be (B, T)-arrays of the same shape; got {tokens.shape} and {scores.shape}")
    if tokens.size and tokens.dtype.kind not in "iu":  # [[]] reads as float: no frames, no spans
        raise ValueError(f"tokens must be an integer array; got dtype {tokens.dtype}")
    if scores.size and scores.dtype.kind not in "iuf":
        raise ValueError(f"scores must be a real array; got dtype {scores.dtype}")
    return [_spans(row_tokens, row_scores, blank_id) for row_tokens, row_scores in zip(tokens, scores)]


def _spans(tokens: np.ndarray, scores: np.ndarray, blank_id: int) -> list[TokenSpan]:
    spans: list[TokenSpan] = []
    label, start, end, total, count = None, 0, 0, 0.0, 0
    for frame, (token, score) in enumerate(zip(tokens.tolist(), scores.tolist())):
        if token == -1:
            continue
        if token != label:
            if label is not None:
                spans.append(TokenSpan(label, start, end, total / count))
            label, start, total, count = (None if token == blank_id else token), frame, 0.0, 0
        if label is not None:
            end, total, count = frame + 1, total + score, count + 1
    if label is not None:
        spans.append(TokenSpan(label, start, end, total / count))
    return spans


def ctc_posteriors(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    *,
    blank_id: int = 0,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
) -> Array:
    """(B, T, N) probability that frame t is aligned to label n, given the whole label sequence.

    Graves et al. (2006), eq. 14: over all CTC paths that read the labels, weighted by their
    probability, the fraction that emit label n (its own occurrence, not another equal label)
    at frame t; from the occupancies of the loss recursion that its gradient uses.

    Args: as :func:`ctc_multi.ctc_loss_with_forward_probs`.

    Returns:
      (B, T, N)-array, float32 for float32/float16/bfloat16 logits, float64 for float64 logits.
      On every valid frame of a sequence that can be aligned, the label posteriors plus the
      posterior of the blank (``1 - posteriors.sum(-1)``) sum to 1. Padded frames, padded
      labels and sequences that no path can align (too few valid frames) get 0.

    Example:
      >>> import numpy as np, ctc_multi
      >>> posteriors = ctc_multi.ctc_posteriors(np.zeros((1, 2, 2)), np.zeros((1, 2)), np.array([[1]]), np.zeros((1, 1)))
      >>> np.round(posteriors[0, :, 0], 4).tolist()   # paths "11", "10", "01"
      [0.6667, 0.6667]
    """
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon)
    run = inputs.backend.compiled(_posteriors, num_static=1)
    return run(_Problem.of(inputs), inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded)


def _posteriors(problem: _Problem, *arrays):
    return problem.where_the_loop_runs_fastest(_posteriors_here, *arrays)


def _posteriors_here(problem: _Problem, *arrays):
    xp = problem.xp
    lattice = problem.lattice(*arrays)
    _, occupancy = problem.occupancy(lattice)  # (T, B, N + 1): the blanks' total, then the labels
    # Probabilities: rounding put float32 ones a few ulps outside [0, 1] (-6.5e-8), where their
    # log is NaN.
    posteriors = xp.clip(xp.permute_dims(occupancy[:, :, 1:], (1, 0, 2)), 0.0, 1.0)
    counts = lattice.feasible[:, None, None] & ~lattice.logit_padded[:, :, None]
    return xp.where(counts, posteriors, xp.zeros_like(posteriors))
