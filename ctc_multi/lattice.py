"""The CTC recursion over the blank-extended label lattice, written once against ``xp``.

Graves et al. (2006), section 4.1. A label sequence ``l`` of length ``N`` is extended with
blanks to ``S = 2N + 1`` states: even states ``s = 2n`` are "blank after n labels", odd states
``s = 2n + 1`` emit label ``n``. Going forward in time a path may stay on its state, move to
the next one, or jump over a blank (``s - 2 -> s``) when the two labels around it differ.

Everything here is written against an array namespace ``xp`` (numpy, jax.numpy, torch via
array-api-compat, array_api_strict ...) and contains no Python branch on array values, so the
same functions run under ``jax.jit`` and in a torch or NumPy loop. The recursion is driven by
a :mod:`ctc_multi.scan` adapter, never by a loop written here.

Numerics, shared by every backend:

* log space, with the state vector renormalised at every frame (its maximum subtracted); the
  per-frame shifts are summed with a compensated (two-sum) accumulator, so a float32 loss over
  thousands of frames keeps float32 relative accuracy instead of losing digits to a large
  running log value;
* "log 0" is the finite ``log_epsilon`` (optax's convention), so no ``-inf - -inf`` can make
  NaN; emissions are clamped to at least ``log_epsilon`` for the same reason;
* padded frames are replaced by zeros *before* the log-softmax, so NaN or inf stored there
  cannot reach the loss, the alphas of valid frames or the gradients.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from array_api_compat import is_torch_namespace

from .scan import Scan

Array = Any


@dataclass(frozen=True)
class Lattice:
    """The per-batch inputs of the recursion, all on the device of the logits.

    Attributes:
      log_probs: (B, T, K) log-softmax of the logits (zeros in, uniform out, on padded frames).
      logit_padded: (B, T) bool, True on padded frames.
      state_classes: (B, S) class id each lattice state emits (clipped into [0, K)).
      state_is_real: (B, S) bool, False for the states of padded labels.
      feasible: (B,) bool, whether the valid frames can hold the labels and the blanks that
        must separate repeated labels.
      log_emissions: (T, B, S) log-probability that state ``s`` emits at frame ``t``.
      frame_padded: (T, B) bool, True on padded frames (the recursion carries its state over).
      skip_allowed: (B, S) bool, True where the jump ``s - 2 -> s`` is allowed.
      label_lengths: (B,) int, number of unpadded labels ``L``.
      log_epsilon: the finite stand-in for log(0).
    """

    log_probs: Array
    logit_padded: Array
    state_classes: Array
    state_is_real: Array
    feasible: Array
    log_emissions: Array
    frame_padded: Array
    skip_allowed: Array
    label_lengths: Array
    log_epsilon: float


class LogSemiring:
    """Sum over paths (the CTC loss): ``log(exp(a) + exp(b) + exp(c))``."""

    @staticmethod
    def combine(xp, stay, advance, skip):
        if is_torch_namespace(xp):
            # torch, an explicit exception: each op is a separate dispatch from the Python loop,
            # and two logaddexp kernels cost less than the ten ops below (2.5x on `char`).
            return xp.logaddexp(xp.logaddexp(stay, advance), skip), None
        # NumPy's logaddexp is a scalar loop, ten times slower than these vectorised exp/log on
        # a (32, 201) state; XLA fuses them (1.2x faster than logaddexp under jax.jit).
        peak = xp.maximum(xp.maximum(stay, advance), skip)
        total = xp.exp(stay - peak) + xp.exp(advance - peak) + xp.exp(skip - peak)
        return peak + xp.log(total), None


class MaxSemiring:
    """Best single path (Viterbi): the maximum, and which move gave it (0 stay, 1 advance, 2 skip).

    Ties go to the shorter move (stay before advance before skip), so paths are deterministic.
    """

    @staticmethod
    def combine(xp, stay, advance, skip):
        best = xp.maximum(xp.maximum(stay, advance), skip)
        # Counting the moves passed over, rather than xp.where(..., 0, 1 or 2): strict array-API
        # namespaces refuse a where between two Python scalars.
        not_stay = stay < best
        move = xp.astype(not_stay, xp.int8) + xp.astype(not_stay & (advance < best), xp.int8)
        return best, move


def log_softmax(xp, logits: Array) -> Array:
    """(…, K) -> (…, K) log-softmax over the last axis, safe for rows that are all -inf."""
    peak = xp.max(logits, axis=-1, keepdims=True)
    peak = xp.where(xp.isfinite(peak), peak, xp.zeros_like(peak))
    shifted = logits - peak
    return shifted - xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))


def interleave_with_blanks(xp, per_label: Array, blank_value, column: Array) -> Array:
    """(B, N) values of the labels -> (B, 2N + 1) values of the lattice states.

    ``column`` is any (B, >= 1) array on the batch's device: new arrays are made ``*_like`` the
    inputs, so a batch-sharded input (jax.sharding) gives batch-sharded lattice arrays.
    """
    batch, num_labels = per_label.shape
    blanks = xp.full_like(per_label, blank_value)
    last_blank = xp.full_like(column[:, :1], blank_value, dtype=per_label.dtype)
    pairs = xp.stack([blanks, per_label], axis=2)
    return xp.concat([xp.reshape(pairs, (batch, 2 * num_labels)), last_blank], axis=1)


def build_lattice(
    xp,
    logits: Array,
    logit_padded: Array,
    labels: Array,
    label_padded: Array,
    *,
    blank_id: int,
    log_epsilon: float,
    index_dtype,
) -> Lattice:
    """Gather what the recursion needs from validated inputs.

    Args:
      logits: (B, T, K) floating array, in the dtype the recursion runs in.
      logit_padded: (B, T) bool.
      labels: (B, N) integer array, right-padded.
      label_padded: (B, N) bool.
    """
    num_classes = logits.shape[2]
    clean_logits = xp.where(logit_padded[:, :, None], xp.zeros_like(logits), logits)
    log_probs = log_softmax(xp, clean_logits)

    # An indexed gather costs B*T*S; optax's one-hot einsum costs B*T*K*N (and TF32 on GPUs).
    in_range = (labels >= 0) & (labels < num_classes)
    class_ids = interleave_with_blanks(xp, xp.clip(labels, 0, num_classes - 1), blank_id, logit_padded)
    class_ids = xp.astype(class_ids, index_dtype)
    gathered = xp.take_along_axis(log_probs, class_ids[:, None, :], axis=2)  # (B, T, S)

    # Labels outside [0, K) emit like optax's all-zero one-hot row (log-prob 0) where padded;
    # unpadded ones (caught by validation whenever values are concrete) make the path impossible.
    missing = interleave_with_blanks(xp, ~in_range, False, logit_padded)
    stand_in = xp.where(label_padded, xp.zeros_like(logits[:, 0, :1]), xp.full_like(logits[:, 0, :1], log_epsilon))
    stand_in = interleave_with_blanks(xp, stand_in, 0.0, logit_padded)
    gathered = xp.where(missing[:, None, :], stand_in[:, None, :], gathered)
    gathered = xp.clip(gathered, log_epsilon)

    # Per label n: may a path jump into it over a blank (it differs from label n - 1), and does
    # it repeat label n - 1 (one more frame needed)? Neither for n = 0. Shape-static, N = 0 too.
    num_labels = labels.shape[1]
    can_jump = repeats_previous = label_padded & ~label_padded
    if num_labels > 1:
        first = can_jump[:, :1]
        can_jump = xp.concat([first, labels[:, 1:] != labels[:, :-1]], axis=1)
        repeats_previous = xp.concat([first, labels[:, 1:] == labels[:, :-1]], axis=1)
    label_lengths = num_labels - xp.sum(xp.astype(label_padded, xp.int32), axis=1)
    repeats = xp.sum(xp.astype(repeats_previous & ~label_padded, xp.int32), axis=1)
    valid_frames = logits.shape[1] - xp.sum(xp.astype(logit_padded, xp.int32), axis=1)
    return Lattice(
        log_probs=log_probs,
        logit_padded=logit_padded,
        state_classes=class_ids,
        state_is_real=interleave_with_blanks(xp, ~label_padded, True, logit_padded),
        feasible=label_lengths + repeats <= valid_frames,
        log_emissions=xp.permute_dims(gathered, (1, 0, 2)),
        frame_padded=xp.permute_dims(logit_padded, (1, 0)),
        skip_allowed=interleave_with_blanks(xp, can_jump, False, logit_padded),
        label_lengths=label_lengths,
        log_epsilon=log_epsilon,
    )


def _device(x: Array):
    from array_api_compat import device

    return device(x)


def _accumulate(hi: Array, lo: Array, value: Array) -> tuple[Array, Array]:
    """Compensated sum (Knuth's two-sum): hi + lo is the running total, lo its rounding error."""
    total = hi + value
    back = total - hi
    error = (hi - (total - back)) + (value - back)
    return total, lo + error


def _edge_and_penalty(xp, skip_allowed: Array, log_epsilon: float, dtype):
    """Built once per scan: two log-0 states beyond the lattice's edge, and log_epsilon on
    forbidden jumps (added rather than selected: one op, and a forbidden jump can't win or count)."""
    edge_state = xp.full_like(skip_allowed[:, :1], log_epsilon, dtype=dtype)
    edge = xp.concat([edge_state, edge_state], axis=1)
    penalty = xp.where(skip_allowed, xp.zeros_like(skip_allowed, dtype=dtype), xp.full_like(skip_allowed, log_epsilon, dtype=dtype))
    return edge, penalty


def make_lattice_step(xp, *, semiring, skip_allowed: Array, log_epsilon: float, dtype, keep_history: bool) -> Callable:
    """The one step of the CTC recursion, for the scan.

    alpha_t(s) = y_t(s) * (alpha_{t-1}(s) + alpha_{t-1}(s-1) + [skip] alpha_{t-1}(s-2)), in the
    semiring's "sum" (log-sum-exp for the loss, max for Viterbi).

    carry: (log_state (B, S) with maximum 0, offset_hi (B,), offset_lo (B,)); the true log
    value of a state is ``log_state + offset_lo + offset_hi``.
    frame: (log_emissions (B, S), padded (B,)).
    Outputs per frame: (the new carry and the frame's shift ``peak`` (B,)) if ``keep_history``,
    and the semiring's choices, if any.
    """
    num_states = skip_allowed.shape[1]
    edge, penalty = _edge_and_penalty(xp, skip_allowed, log_epsilon, dtype)

    def step(carry, frame):
        log_state, offset_hi, offset_lo = carry
        log_emissions, padded = frame
        extended = xp.concat([edge, log_state], axis=1)  # predecessors s-1, s-2 of every state s
        advance = extended[:, 1 : num_states + 1]
        skip = extended[:, :num_states] + penalty
        combined, choice = semiring.combine(xp, log_state, advance, skip)
        updated = xp.where(padded[:, None], log_state, combined + log_emissions)
        peak = xp.max(updated, axis=1)
        updated = updated - peak[:, None]
        offset_hi, offset_lo = _accumulate(offset_hi, offset_lo, peak)
        new_carry = (updated, offset_hi, offset_lo)
        history = new_carry + (peak,) if keep_history else None
        return new_carry, (history, choice)

    return step


def initial_state(xp, lattice: Lattice) -> tuple[Array, Array, Array]:
    """The state before the first frame: a virtual frame where every path sits in state 0, so
    frame 0 can start on the first blank or, advancing, on the first label."""
    template = lattice.log_emissions[0, ...]
    num_states = template.shape[1]
    is_start = xp.arange(num_states, device=_device(template))[None, :] == 0
    log_state = xp.where(is_start, xp.zeros_like(template), xp.full_like(template, lattice.log_epsilon))
    zero = xp.zeros_like(template[:, 0])
    return log_state, zero, zero


def run_recursion(xp, scan: Scan, lattice: Lattice, *, semiring=LogSemiring, keep_history: bool = False):
    """Scan the lattice step over all frames; returns (final carry, (history, choices)).

    ``history`` (with ``keep_history``) is (log_state (T, B, S), offset_hi (T, B),
    offset_lo (T, B), peak (T, B)) after each frame.
    """
    step = make_lattice_step(
        xp,
        semiring=semiring,
        skip_allowed=lattice.skip_allowed,
        log_epsilon=lattice.log_epsilon,
        dtype=lattice.log_emissions.dtype,
        keep_history=keep_history,
    )
    return scan(step, initial_state(xp, lattice), (lattice.log_emissions, lattice.frame_padded))


def make_occupancy_step(xp, *, skip_allowed: Array, log_epsilon: float, dtype) -> Callable:
    """The backward step: occupancies of frame t - 1 from those of frame t.

    This is Graves et al.'s beta recursion carried in posterior form, gamma_t(s) =
    alpha_t(s) beta_t(s) / (y_t(s) P(l | x)), which is also the reverse-mode derivative of the
    forward step: each state hands its occupancy back to its predecessors s, s - 1 and (when
    allowed) s - 2 in proportion to what each contributed to it,
    ``exp(log alpha_{t-1}(s') - log sum of alpha_{t-1} over the predecessors of s)``. Every
    exponent is <= 0 (a part is at most its sum), so nothing overflows; occupancies lie in
    [0, 1] and are renormalised per frame, so nothing underflows that matters.

    carry: occupancy (B, S) at frame t.
    frame: (log_state before frame t (B, S), log_state after it (B, S), log_emissions (B, S),
    peak (B,), padded (B,)), the log states renormalised as the forward step left them.
    """
    num_states = skip_allowed.shape[1]
    edge, penalty = _edge_and_penalty(xp, skip_allowed, log_epsilon, dtype)
    jump_from = xp.concat([penalty, edge], axis=1)[:, 2:]  # penalty of the jump s -> s + 2
    no_occupancy = xp.zeros_like(edge)
    beyond_edge = -edge  # an "incoming sum" of exp(-log_epsilon): weights into it vanish

    def step(occupancy, frame):
        before, after, log_emissions, peak, padded = frame
        # log of the sum over the predecessors of each state s (undoing the renormalisation);
        # on padded frames replaced so that every weight vanishes (the frame hands over as is).
        incoming = xp.where(padded[:, None], -xp.ones_like(after) * log_epsilon, after + peak[:, None] - log_emissions)
        next_occupancy = xp.concat([occupancy, no_occupancy], axis=1)
        next_incoming = xp.concat([incoming, beyond_edge], axis=1)
        earlier = (
            occupancy * xp.exp(before - incoming)
            + next_occupancy[:, 1 : num_states + 1] * xp.exp(before - next_incoming[:, 1 : num_states + 1])
            + next_occupancy[:, 2:] * xp.exp(before + jump_from - next_incoming[:, 2:])
        )
        total = xp.sum(earlier, axis=1, keepdims=True)
        earlier = earlier / xp.where(total > 0, total, xp.ones_like(total))
        earlier = xp.where(padded[:, None], occupancy, earlier)
        return earlier, occupancy

    return step


def state_occupancy(xp, scan: Scan, lattice: Lattice, alpha_history: Array, peaks: Array) -> Array:
    """(T, B, S) probability that the path is in state s at frame t, given the labels.

    Graves et al. (2006), eq. 14, from the forward history (``alpha_history`` and ``peaks`` as
    :func:`run_recursion` returns them) and one reverse scan of :func:`make_occupancy_step`.
    Normalised per frame rather than divided by the loss, which keeps float32 accuracy over
    any number of frames. Zero on padded frames.
    """
    start = initial_state(xp, lattice)[0]
    before = xp.concat([start[None, ...], alpha_history[:-1, ...]], axis=0)
    final = alpha_history[-1, ...]
    # At the end, the paths finish on the last blank (2L) or the last label (2L - 1).
    state_ids = xp.arange(final.shape[1], device=_device(final))[None, :]
    last_blank = 2 * lattice.label_lengths[:, None]
    is_end = (state_ids == last_blank) | (state_ids == last_blank - 1)
    ending = xp.where(is_end, final, xp.full_like(final, lattice.log_epsilon))
    ending = xp.exp(ending - xp.max(ending, axis=1, keepdims=True))
    ending = xp.where(is_end, ending, xp.zeros_like(ending))
    ending = ending / xp.sum(ending, axis=1, keepdims=True)
    step = make_occupancy_step(xp, skip_allowed=lattice.skip_allowed, log_epsilon=lattice.log_epsilon, dtype=final.dtype)
    _, occupancy = scan(step, ending, (before, alpha_history, lattice.log_emissions, peaks, lattice.frame_padded), reverse=True)
    return xp.where(lattice.frame_padded[:, :, None], xp.zeros_like(occupancy), occupancy)


def absolute(xp, log_state: Array, offset_hi: Array, offset_lo: Array) -> Array:
    """Undo the per-frame renormalisation: (…, S) states plus their (…,) offsets."""
    return (log_state + offset_lo[..., None]) + offset_hi[..., None]


def blank_row_with_final_labels(xp, log_state: Array) -> Array:
    """optax's last-row convention: blank entry n also holds the paths that end on label n.

    (…, S) -> (…, N + 1): entry n is log P(exactly n labels emitted so far).
    """
    blanks = log_state[..., 0::2]
    finished_labels = xp.logaddexp(blanks[..., 1:], log_state[..., 1::2])
    return xp.concat([blanks[..., :1], finished_labels], axis=-1)


def loss_from_final_state(xp, lattice: Lattice, final_carry, index_dtype) -> Array:
    """(B,) negative log-likelihood of each label sequence, never below zero."""
    log_state, offset_hi, offset_lo = final_carry
    per_length = blank_row_with_final_labels(xp, log_state)
    lengths = xp.astype(lattice.label_lengths, index_dtype)[:, None]
    log_likelihood = xp.take_along_axis(per_length, lengths, axis=1)[:, 0]
    loss = -((log_likelihood + offset_lo) + offset_hi)
    # A probability is at most one; a rounding-level negative value is clamped, nothing more.
    return xp.maximum(loss, xp.zeros_like(loss))


def forward_probs_from_history(xp, history) -> tuple[Array, Array]:
    """optax's (logalpha_blank (T, B, N + 1), logalpha_nonblank (T, B, N)) from the scan history."""
    log_alpha = absolute(xp, *history[:3])
    blank = log_alpha[..., 0::2]
    last_row = blank_row_with_final_labels(xp, log_alpha[-1, ...])
    blank = xp.concat([blank[:-1, ...], last_row[None, ...]], axis=0)
    return blank, log_alpha[..., 1::2]


def logits_gradient(xp, lattice: Lattice, occupancy: Array) -> Array:
    """(B, T, K) d loss / d logits = softmax - occupancy summed per class (eq. 16 through the softmax)."""
    num_classes = lattice.log_probs.shape[2]
    class_axis = xp.arange(num_classes, dtype=lattice.state_classes.dtype, device=_device(lattice.state_classes))
    emits_class = (lattice.state_classes[:, :, None] == class_axis) & lattice.state_is_real[:, :, None]
    per_class = xp.matmul(xp.permute_dims(occupancy, (1, 0, 2)), xp.astype(emits_class, occupancy.dtype))
    gradient = xp.exp(lattice.log_probs) - per_class
    return xp.where(lattice.logit_padded[:, :, None], xp.zeros_like(gradient), gradient)
