"""The CTC recursion over the blank-extended label lattice, written once against ``xp``.

Graves et al. (2006), section 4.1. A label sequence ``l`` of length ``N`` is extended with
blanks to ``S = 2N + 1`` states: even states ``s = 2n`` are "blank after n labels", odd states
``s = 2n + 1`` emit label ``n``. Going forward in time a path may stay on its state, move to
the next one, or jump over a blank (``s - 2 -> s``) when the two labels around it differ.

Everything here is written against an array namespace ``xp`` (numpy, jax.numpy, torch via
array-api-compat, array_api_strict ...) and contains no Python branch on array values (one
NumPy-only shortcut aside, :func:`carry_over_padded`, which skips a select that would change
nothing), so the same functions run under ``jax.jit`` and in a torch or NumPy loop. The
recursion is driven by a :mod:`ctc_multi.scan` adapter, never by a loop written here.

Numerics, shared by every backend:

* log space, with the state vector renormalised after every scan step of one or a few frames
  (its maximum subtracted); the shifts are summed with a compensated (two-sum) accumulator, so
  a float32 loss over thousands of frames keeps float32 relative accuracy instead of losing
  digits to a large running log value. Or, for the sum over paths where the backend asks
  (JAX's float32 on a CPU), scaled probabilities, each state with its own integer power of two
  (:class:`ScaledSemiring`): no renormalisation, and float32 relative precision at any depth;
* the backward pass follows the forward pass's choices back (the winning move for Viterbi,
  the shares of each predecessor for the gradient), so it needs no exp or log;
* "log 0" is the finite ``log_epsilon`` (optax's convention), so no ``-inf - -inf`` can make
  NaN; emissions are clamped to at least :func:`emission_floor` (-1e5, or a lower
  ``log_epsilon``) for the same reason;
* padded frames are replaced by zeros *before* the log-softmax (or, where no autodiff runs
  through the lattice, what is computed from them is masked: :func:`build_lattice`), so NaN
  or inf stored there cannot reach the loss, the alphas of valid frames or the gradients.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any, Callable

from array_api_compat import is_jax_namespace, is_numpy_namespace, is_torch_namespace

from .scan import Scan, tree_map

Array = Any


@dataclass(frozen=True)
class Lattice:
    """The per-batch inputs of the recursion, all on the device of the logits.

    Attributes:
      logits: (B, T, K) the logits, read only where ``log_probs`` is None (JAX); there, zeros
        on padded frames (so uniform probabilities there) when built ``differentiable``, else
        what the input held (mask what is derived from them). Where ``log_probs`` is set, the
        logits as given.
      log_probs: (B, T, K) their log-softmax, where the backend normalises before gathering
        (NumPy, torch); else None.
      frame_peak: (B, T) each frame's largest logit (0 where none is finite), and
      frame_log_total: (B, T) the log of each frame's sum of exp(logits - frame_peak), where
        ``log_probs`` is None (JAX): the log-softmax is ``(logits - frame_peak) -
        frame_log_total``, recomputed (and fused by XLA) where it is needed; else None.
      logit_padded: (B, T) bool, True on padded frames.
      state_classes: (B, S) class id each lattice state emits (clipped into [0, K)).
      feasible: (B,) bool, whether the valid frames can hold the labels and the blanks that
        must separate repeated labels.
      log_emissions: (T, B, S) log-probability that state ``s`` emits at frame ``t``; or None
        where the scan gathers each frame's own (built ``gather_in_scan``: see
        :func:`frame_emissions`, and :func:`with_all_emissions` for the whole array).
      stand_ins: where ``log_emissions`` is None, the (B, S) bool states that emit a stand-in
        instead of their class's log-probability, and the (B, S) stand-ins (padded labels,
        classes outside [0, K): see :func:`build_lattice`); else None.
      frame_padded: (T, B) bool, True on padded frames (the recursion carries its state over).
      skip_allowed: (B, S) bool, True where the jump ``s - 2 -> s`` is allowed.
      label_lengths: (B,) int, number of unpadded labels ``L``.
      log_epsilon: the finite stand-in for log(0).
    """

    logits: Array
    log_probs: Array | None
    frame_peak: Array | None
    frame_log_total: Array | None
    logit_padded: Array
    state_classes: Array
    feasible: Array
    log_emissions: Array | None
    frame_padded: Array
    skip_allowed: Array
    label_lengths: Array
    log_epsilon: float
    stand_ins: tuple[Array, Array] | None = None


class _LogSpace:
    """How a log-space semiring holds a state: one (..., S) array of log values, renormalised
    after each scan step (its maximum subtracted, the shifts kept in the carry's offsets)."""

    renormalised = True

    @staticmethod
    def edge_and_penalty(xp, skip_allowed: Array, log_epsilon: float, dtype):
        return _edge_and_penalty(xp, skip_allowed, log_epsilon, dtype)

    @staticmethod
    def from_log(xp, log_values: Array) -> Array:
        return log_values

    @staticmethod
    def forbid(xp, skip: Array, penalty: Array) -> Array:
        return skip + penalty

    @staticmethod
    def times(xp, combined: Array, emissions: Array) -> Array:
        return combined + emissions

    @staticmethod
    def as_log_carry(xp, carry, on_paths):
        return carry


# How far below the other term torch's logaddexp may see one, where autograd records it.
LOGADDEXP_GAP = 50.0


def _logaddexp_twice_differentiable(xp, a: Array, b: Array) -> Array:
    """torch's logaddexp(a, b), each term first raised to at least the other less
    ``LOGADDEXP_GAP``. torch differentiates logaddexp through exp(b - a), and its second
    derivative through exp(b - a) / (1 + exp(b - a))**2, which is inf / inf (NaN) where the two
    lie more than about 709 apart (88 in float32), as log_epsilon puts them. Raised, a term adds
    at most exp(-50) = 2e-22 of the other's probability, below float64's rounding except for
    sums within 1e-6 of log 1 (there an absolute 2e-22), and its derivatives alike."""
    return xp.logaddexp(xp.maximum(a, b - LOGADDEXP_GAP), xp.maximum(b, a - LOGADDEXP_GAP))


class LogSemiring(_LogSpace):
    """Sum over paths (the CTC loss): ``log(exp(stay) + exp(advance) + exp(skip))``; no choices."""

    with_shares = False

    @classmethod
    def combine(cls, xp, stay, advance, skip):
        if is_torch_namespace(xp):
            # torch, an explicit exception: each op is a separate dispatch from the Python loop,
            # and two logaddexp kernels cost less than the ten ops below (2.5x on `char`).
            if stay.requires_grad:  # autograd records the loop: see _logaddexp_twice_differentiable
                combined = _logaddexp_twice_differentiable(xp, _logaddexp_twice_differentiable(xp, stay, advance), skip)
            else:
                combined = xp.logaddexp(xp.logaddexp(stay, advance), skip)
            if not cls.with_shares:
                return combined, None
            return combined, (xp.exp(advance - combined), xp.exp(skip - combined))
        # NumPy's logaddexp is a scalar loop, ten times slower than these vectorised exp/log on
        # a (32, 201) state; XLA fuses them (1.2x faster than logaddexp under jax.jit).
        peak = xp.maximum(xp.maximum(stay, advance), skip)
        from_advance, from_skip = xp.exp(advance - peak), xp.exp(skip - peak)
        total = xp.exp(stay - peak) + from_advance + from_skip
        if not cls.with_shares:
            return peak + xp.log(total), None
        return peak + xp.log(total), (from_advance / total, from_skip / total)


class LogSemiringWithShares(LogSemiring):
    """:class:`LogSemiring` whose choices are soft: the shares of each state's new value that came
    by advancing (from s - 1) and by skipping (from s - 2); staying has the rest. They are what
    the gradient follows back (:func:`forward_and_occupancy_by_shares`), as the backtrace follows
    :class:`MaxSemiring`'s moves, so the backward pass needs no exp or log at all."""

    with_shares = True


class MaxSemiring(_LogSpace):
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


# The lowest power of two a scaled state holds (far below any path: about -3.7e8 in log space):
# the lattice's edge, forbidden jumps, and the floor that keeps the int32 sums from wrapping.
_LOWEST_POWER = -(1 << 29)

# The lowest log_epsilon with which the sums may run scaled. An impossible alignment costs about
# -log_epsilon for each "log 0" on its best path (one where it starts off state 0, one for each
# unpadded label outside [0, K) under jit), and a scaled state cannot go below the lowest
# power: from here, more than 370 of them would be needed to reach it. Below, log space runs
# (float32 powers instead would have cost the JAX step 1.3x on `char` and `long`).
SCALED_MIN_LOG_EPSILON = -1e6


def _two_columns(xp, like: Array, fill, dtype) -> Array:
    """(..., 2) of ``fill``, shaped after the (..., S) ``like``: two columns also where S is 1
    (a lattice of one state, no labels), which a slice ``[..., :2]`` of it would not give
    (twice a bug here: a state counted as its own predecessor, a scan's carry changing shape)."""
    column = xp.full_like(like[..., :1], fill, dtype=dtype)
    return xp.concat([column, column], axis=-1)


def _bitcast(xp, values: Array, dtype) -> Array:
    """The same bits as another dtype of the same width (float32 <-> int32)."""
    if is_jax_namespace(xp):
        import jax

        return jax.lax.bitcast_convert_type(values, dtype)
    return values.view(dtype)  # NumPy, torch


def _power_of_two(xp, power: Array) -> Array:
    """float32 2**power for int32 powers <= 0; 0 below -126 (too small to count beside 2**0)."""
    biased = xp.maximum(power + 127, xp.zeros_like(power))
    return _bitcast(xp, biased << 23, xp.float32)


class ScaledSemiring:
    """:class:`LogSemiring`'s sum over paths, in probability space: each state is a float32
    mantissa in [1, 2) and its own int32 power of two, ``(mantissa, power)``, so the three
    predecessors add with multiplies and integer adds and no exp or log (the frame's emission
    takes one exp2). Each state keeps its own scale, so, unlike a probability-space recursion
    renormalised by the frame (where states more than about e^-87 below the frame's best
    underflow, and paths that a later frame favours are lost), nothing is lost that a log-space
    float32 sum keeps: a predecessor below 2^-126 of the largest of the three is rounded away
    by both. No renormalisation either (the powers are exact integers), so no row maximum.

    float32 only; the JAX adapter takes it on a CPU, where XLA is bound by the exp and log of
    the log-space step (the measurements are beside ``SCALED_SUMS`` in
    ``ctc_multi.backends.jax``). A dispatch-bound loop (NumPy, torch) pays for its twice as
    many ops. Viterbi and the forward probabilities stay in log space.
    """

    with_shares = False
    renormalised = False

    @staticmethod
    def edge_and_penalty(xp, skip_allowed: Array, log_epsilon: float, dtype):
        """The edge states (mantissa 1, the lowest power), and a forbidden jump's weight
        exp(log_epsilon), scaled like a state (as the log-space step adds log_epsilon)."""
        edge = (_two_columns(xp, skip_allowed, 1.0, dtype), _two_columns(xp, skip_allowed, _LOWEST_POWER, xp.int32))
        weight, power = ScaledSemiring.from_log(xp, xp.full_like(skip_allowed, log_epsilon, dtype=dtype))
        power = xp.where(_is_blank(xp, skip_allowed), xp.full_like(power, _LOWEST_POWER), power)
        allowed_power = xp.zeros_like(skip_allowed, dtype=xp.int32)
        return edge, (xp.where(skip_allowed, xp.ones_like(weight), weight), xp.where(skip_allowed, allowed_power, power))

    @staticmethod
    def from_log(xp, log_values: Array) -> tuple[Array, Array]:
        """log values -> (mantissa in [1, 2], int32 power): exp2 of the fraction of log2 (2 where
        that fraction rounds up to 1; :meth:`times` brings any mantissa back into [1, 2))."""
        log2 = xp.maximum(log_values * (1 / math.log(2)), xp.full_like(log_values, float(_LOWEST_POWER)))
        power = xp.floor(log2)
        return xp.exp2(log2 - power), xp.astype(power, xp.int32)

    @staticmethod
    def forbid(xp, skip, penalty):
        return skip[0] * penalty[0], skip[1] + penalty[1]

    @classmethod
    def combine(cls, xp, stay, advance, skip):
        """The three predecessors' sum as (mantissa in [1, 8], the largest power); with shares,
        advance's and skip's parts of it."""
        (stay_m, stay_p), (advance_m, advance_p), (skip_m, skip_p) = stay, advance, skip
        top = xp.maximum(xp.maximum(stay_p, advance_p), skip_p)
        from_advance, from_skip = advance_m * _power_of_two(xp, advance_p - top), skip_m * _power_of_two(xp, skip_p - top)
        total = stay_m * _power_of_two(xp, stay_p - top) + from_advance + from_skip
        if not cls.with_shares:
            return (total, top), None
        return (total, top), (from_advance / total, from_skip / total)

    @staticmethod
    def times(xp, combined, emissions):
        """The sum times the emission, its mantissa brought back into [1, 2): the product lies
        in [1, 16], a normal float32, so dividing by the power of two of its exponent field is
        exact. A NaN or inf product stays NaN or inf (no NaN turns into a number)."""
        (total, top), (emission_m, emission_p) = combined, emissions
        product = total * emission_m
        field = (_bitcast(xp, product, xp.int32) >> 23) & 255
        mantissa = product * _bitcast(xp, (254 - field) << 23, xp.float32)
        power = xp.maximum((top + emission_p) + (field - 127), xp.full_like(top, _LOWEST_POWER))
        return mantissa, power

    @staticmethod
    def as_log_carry(xp, carry, on_paths):
        """The final carry as a log-space one: (log_state (..., S) relative to the largest power
        of the states ``on_paths`` (:func:`states_on_paths`: the padded labels' may lie far above
        them, and their distance in float32 rounded the loss), offset_hi, offset_lo), that
        power's log in the offsets."""
        (mantissa, power), offset_hi, offset_lo = carry
        top = xp.max(xp.where(on_paths, power, xp.full_like(power, _LOWEST_POWER)), axis=-1)
        log_state = xp.log(mantissa) + xp.astype(power - top[..., None], mantissa.dtype) * math.log(2)
        return (log_state,) + _accumulate(offset_hi, offset_lo, xp.astype(top, mantissa.dtype) * math.log(2))


class ScaledSemiringWithShares(ScaledSemiring):
    """:class:`ScaledSemiring` that also records the shares, as :class:`LogSemiringWithShares`."""

    with_shares = True


def sum_semiring(scaled: bool, with_shares: bool = False):
    """The semiring of the sum over paths: log space, or scaled probabilities (:class:`ScaledSemiring`)."""
    if scaled:
        return ScaledSemiringWithShares if with_shares else ScaledSemiring
    return LogSemiringWithShares if with_shares else LogSemiring


def finite_peak(xp, logits: Array) -> Array:
    """(…, K) -> (…,) each row's largest value, 0 where it is -inf (rows all -inf). A +inf or
    NaN peak stays, so that its row's log-softmax is NaN (inf - inf): with 0 there, a +inf logit
    on a class that no label emits left the others at -inf, floored to log 0, and the loss
    finite (1e5), where optax, torch and the README give NaN."""
    peak = xp.max(logits, axis=-1)
    return xp.where(peak == -math.inf, xp.zeros_like(peak), peak)


def frames_without_softmax(xp, logits: Array, logit_padded: Array) -> Array:
    """(B, T, K) logits, (B, T) bool padding -> (B, T) True on the valid frames that have no
    softmax: a NaN or a +inf logit, or no finite one (every class's log-probability is then
    NaN, or -inf beside a NaN): those whose largest logit is not finite (NaN propagates)."""
    return ~xp.isfinite(xp.max(logits, axis=2)) & ~logit_padded


def log_softmax(xp, logits: Array) -> Array:
    """(…, K) -> (…, K) log-softmax over the last axis, safe for rows that are all -inf."""
    return subtract_log_total(xp, logits - finite_peak(xp, logits)[..., None])


def subtract_log_total(xp, shifted: Array) -> Array:
    """(…, K) logits less their row's peak -> the log-softmax: less the log of the row's total.

    In place where the namespace allows it (NumPy, torch: one (…, K) array fewer; autograd is
    fine, exp keeps its result, not its input); a JAX array is simply rebound.
    """
    shifted -= xp.log(xp.sum(xp.exp(shifted), axis=-1, keepdims=True))
    return shifted


def log_softmax_of_frames_by_where(xp, logits: Array, frame_zeroed: Array) -> Array:
    """(B, T, K) logits, (B, T) bool -> (B, T, K) log-softmax over the classes, the flagged
    frames taken as zero logits (uniform), so NaN or inf stored there reach nothing."""
    return log_softmax(xp, zero_frames_by_where(xp, logits, frame_zeroed))


def log_softmax_parts_by_where(xp, logits: Array, frame_zeroed: Array) -> tuple[Array, Array]:
    """(B, T, K), (B, T) -> :func:`log_softmax_parts`, with those of a zero frame (a uniform
    one: peak 0, log-total log K) on the flagged frames, whatever they hold (NaN, inf): their
    results are replaced, which spares XLA a select over every (B, T, K) element (log-softmax
    parts on `vocab5k` 25 ms with one, 6 ms without). The derivative at a flagged frame's NaN
    is NaN all the same; JAX's adapter mends that (``backends.jax.log_softmax_parts_of_frames``)."""
    peak, log_total = log_softmax_parts(xp, logits)
    peak = xp.where(frame_zeroed, xp.zeros_like(peak), peak)
    log_total = xp.where(frame_zeroed, xp.full_like(log_total, math.log(logits.shape[-1])), log_total)
    return peak, log_total


def log_softmax_parts(xp, logits: Array) -> tuple[Array, Array]:
    """(…, K) -> the (…,) peak and log-total of the log-softmax ``(logits - peak) - log_total``:
    what the recursion needs besides the few gathered logits, without a (…, K) array of
    log-probabilities (XLA gathers from it 3-4x slower than from the logits on `bpe`)."""
    peak = finite_peak(xp, logits)
    return peak, xp.log(xp.sum(xp.exp(logits - peak[..., None]), axis=-1))


# Elements per block of NumPy's scaled softmax: the product with the scale reads each block of
# exponentials while it is still in cache.
SCALED_EXP_BLOCK = 1 << 16


def softmax(xp, lattice: "Lattice", *, overwrite_log_probs: bool = False, scale: Array | None = None, frame_zeroed: Array | None = None) -> Array:
    """(B, T, K) probabilities of every class, each sequence's times its ``scale`` (B,) if given.

    ``frame_zeroed`` (B, T), where the lattice holds no log-probabilities (the logits gathered
    before they are normalised: JAX): those frames come out zero, in the same pass.

    ``overwrite_log_probs``: the caller needs the lattice's ``log_probs`` no more, so NumPy
    writes the probabilities over them (one (B, T, K) array fewer per gradient: each new page
    of a fresh array costs a fault, and on `vocab5k` the array is 48 MB), and scales them a
    block of frames at a time while the block is in cache.
    """
    if lattice.log_probs is not None:
        if overwrite_log_probs and is_numpy_namespace(xp):
            log_probs = lattice.log_probs
            if scale is None:
                return xp.exp(log_probs, out=log_probs)
            frames = max(1, SCALED_EXP_BLOCK // log_probs.shape[2])
            for sequence in range(log_probs.shape[0]):
                for start in range(0, log_probs.shape[1], frames):
                    block = log_probs[sequence, start : start + frames]
                    xp.multiply(xp.exp(block, out=block), scale[sequence], out=block)
            return log_probs
        probabilities = xp.exp(lattice.log_probs)
    else:
        exponents = (lattice.logits - lattice.frame_peak[..., None]) - lattice.frame_log_total[..., None]
        if frame_zeroed is not None:  # exp(-inf): zero, and no exp of a padded frame's NaN, whose
            # derivative, times zero, was NaN in a second derivative (see build_lattice)
            exponents = xp.where(frame_zeroed[..., None], xp.full_like(exponents, -math.inf), exponents)
        probabilities = xp.exp(exponents)
    return probabilities if scale is None else probabilities * xp.astype(scale, probabilities.dtype)[:, None, None]


def log_softmax_of_classes(xp, lattice: "Lattice", classes: Array) -> Array:
    """(B, T) class ids -> (B, T) their log-softmax at each frame."""
    if lattice.log_probs is not None:
        return xp.take_along_axis(lattice.log_probs, classes[:, :, None], axis=2)[:, :, 0]
    chosen = xp.take_along_axis(lattice.logits, classes[:, :, None], axis=2)[:, :, 0]
    return (chosen - lattice.frame_peak) - lattice.frame_log_total


def replace_and_floor(xp, gathered: Array, replaced: Array | None = None, replacement: Array | None = None, floor: float | None = None) -> Array:
    """(T, B, S) or (B, S) gathered values, with ``replacement`` (B, S) where ``replaced`` (B, S)
    is True, then at least ``floor``: what :func:`build_lattice` makes of the gathered emissions."""
    if replaced is not None:
        gathered = xp.where(replaced, replacement, gathered)
    if floor is not None:
        gathered = xp.clip(gathered, floor)
    return gathered


def gather_states_by_take(xp, values: Array, state_classes: Array, replaced=None, replacement=None, floor=None) -> Array:
    """(B, T, K) values, (B, S) class of each state -> (T, B, S) value of each state's class,
    time-major, as the scan reads it (gathering from the time-major view is 2-4x faster under
    XLA than gathering, then transposing); then :func:`replace_and_floor` with the rest."""
    gathered = xp.take_along_axis(xp.permute_dims(values, (1, 0, 2)), state_classes[None, ...], axis=2)
    return replace_and_floor(xp, gathered, replaced, replacement, floor)


# The floor of the emissions: their log-probabilities are clamped to at least this, or
# log_epsilon where that is lower, so that no -inf (a -inf logit) meets another in a
# difference. Not log_epsilon itself: with a log_epsilon of, say, -10, emissions below it
# are real probabilities that optax counts, and a clamp there changed the loss.
EMISSION_FLOOR = -1e5


def emission_floor(log_epsilon: float) -> float:
    return min(log_epsilon, EMISSION_FLOOR)


def normalised_emissions(xp, gathered: Array, peak: Array, log_total: Array, padded: Array | None, stand_ins, log_epsilon: float) -> Array:
    """(..., S) logits gathered at the states' classes -> their log-emissions, given their frames'
    (...) peak and log-total (:func:`log_softmax_parts`), and (...) padded flags where padded
    frames still hold their logits (else None): a padded frame's gathered logits are taken as
    zeros (whatever NaN they hold reaches nothing), then the (B, S) ``stand_ins`` (replaced,
    replacement) go in and :func:`emission_floor` is the floor. Frames (T, B, S) or one frame (B, S)."""
    if padded is not None:
        gathered = xp.where(padded[..., None], xp.zeros_like(gathered), gathered)
    gathered = (gathered - peak[..., None]) - log_total[..., None]
    return replace_and_floor(xp, gathered, *stand_ins, emission_floor(log_epsilon))


def frame_emissions(xp, lattice: Lattice, frame: Array, peak: Array, log_total: Array, padded: Array | None = None) -> Array:
    """The (B, S) log-emissions of one frame, for a lattice built ``gather_in_scan``: its logits
    (the 0-d integer ``frame``) gathered at the states' classes, then :func:`normalised_emissions`
    with the frame's (B,) peak and log-total, and its (B,) ``padded`` flags, if given.

    A padded frame's logits are zeroed here. Their values (NaN, inf) went only into the new
    state that the step's :func:`carry_over_padded` leaves unselected, but a second derivative
    (JAX: through the custom_vjp's traced forward) multiplied their derivative by zero: NaN.
    The select per frame cost nothing measurable (JAX on `char` and `long`, ``benchmarks/ab.py``:
    old/new forward 0.98, 0.99, forward+backward 1.01, 0.99)."""
    gathered = xp.take_along_axis(xp.take(lattice.logits, frame[None], axis=1)[:, 0, :], lattice.state_classes, axis=1)
    return normalised_emissions(xp, gathered, peak, log_total, padded, lattice.stand_ins, lattice.log_epsilon)


def _time_major(xp, per_frame: Array) -> Array:
    """(B, T) -> (T, B), as the scan reads it."""
    return xp.permute_dims(per_frame, (1, 0))


def with_all_emissions(xp, lattice: Lattice) -> Lattice:
    """The lattice with its (T, B, S) ``log_emissions``, gathered now if the scan was to gather them
    frame by frame (for what reads them all: several frames per step, the mirror image)."""
    if lattice.log_emissions is not None:
        return lattice
    gathered = gather_states_by_take(xp, lattice.logits, lattice.state_classes)
    emissions = normalised_emissions(
        xp, gathered, _time_major(xp, lattice.frame_peak), _time_major(xp, lattice.frame_log_total), lattice.frame_padded, lattice.stand_ins, lattice.log_epsilon
    )
    return replace(lattice, log_emissions=emissions, stand_ins=None)


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
    gather_states: Callable = gather_states_by_take,
    normalise_before_gather: bool = True,
    log_softmax_of_frames: Callable = log_softmax_of_frames_by_where,
    log_softmax_parts_of_frames: Callable = log_softmax_parts_by_where,
    differentiable: bool = True,
    gather_in_scan: bool = False,
) -> Lattice:
    """Gather what the recursion needs from validated inputs.

    Args:
      logits: (B, T, K) floating array, in the dtype the recursion runs in.
      logit_padded: (B, T) bool.
      labels: (B, N) integer array, right-padded.
      label_padded: (B, N) bool.
      gather_states: the backend's (B, T, K), (B, S) -> (T, B, S) gather, by default
        :func:`gather_states_by_take`; with ``normalise_before_gather`` it also takes what
        :func:`replace_and_floor` does next, so it can do that as it gathers.
      normalise_before_gather: take the log-softmax of all (B, T, K) logits, keep it for the
        gradient, and gather from it (NumPy, torch: every op is a pass over memory, and the
        gradient's softmax is then one exp); or gather the logits and normalise the (T, B, S)
        gathered values (JAX: XLA fuses either; gathering first ran 1.8x faster on `bpe`).
      log_softmax_of_frames: with ``normalise_before_gather``, the backend's (B, T, K), (B, T)
        -> (B, T, K) log-softmax that takes the flagged (padded) frames as zero logits; by
        default :func:`log_softmax_of_frames_by_where`.
      log_softmax_parts_of_frames: without ``normalise_before_gather`` and where nothing
        differentiates through the lattice, the backend's (B, T, K), (B, T) -> (B, T) peak and
        log-total of each frame, the flagged (padded) ones those of zero logits; by default
        :func:`log_softmax_parts_by_where`.
      differentiable: whether autodiff will run through what is built here (then padded
        frames are zeroed in the logits themselves, so their NaN cannot reach a gradient).
      gather_in_scan: where the logits are gathered before they are normalised and nothing
        differentiates through the lattice, leave ``log_emissions`` None: the scan gathers each
        frame's (:func:`frame_emissions`), and no (T, B, S) array is made (JAX on a CPU: each
        call's new array costs page faults, and the whole gather a pass over memory; the
        forward on `char` and `long` 1.25x to 1.55x faster, see ``ctc_multi.backends.jax``).
        Ignored elsewhere.
    """
    num_classes = logits.shape[2]
    # Padded frames may hold NaN or inf. Zeroing them in the (B, T, K) logits keeps those out of
    # every value and out of autodiff's gradients. Where nothing differentiates through the
    # lattice and the logits are gathered before they are normalised (JAX), masking the (B, T)
    # and (T, B, S) results instead spares XLA that pass (log-softmax parts on `vocab5k`: 25 ms
    # with it, 6 ms without). Where the backend normalises first, its log-softmax takes the
    # padded frames as zeros itself.
    mask_results_only = not (differentiable or normalise_before_gather)
    if differentiable and not normalise_before_gather:
        clean_logits = zero_frames_by_where(xp, logits, logit_padded)
    else:
        clean_logits = logits

    # An indexed gather costs B*T*S; optax's one-hot einsum costs B*T*K*N (and TF32 on GPUs).
    in_range = (labels >= 0) & (labels < num_classes)
    class_ids = interleave_with_blanks(xp, xp.clip(labels, 0, num_classes - 1), blank_id, logit_padded)
    class_ids = xp.astype(class_ids, index_dtype)
    frame_padded = _time_major(xp, logit_padded)
    # Labels outside [0, K) emit like optax's all-zero one-hot row (log-prob 0) where padded;
    # unpadded ones (caught by validation whenever values are concrete) make the path impossible.
    missing = interleave_with_blanks(xp, ~in_range, False, logit_padded)
    stand_in = xp.where(label_padded, xp.zeros_like(logits[:, 0, :1]), xp.full_like(logits[:, 0, :1], log_epsilon))
    stand_in = interleave_with_blanks(xp, stand_in, 0.0, logit_padded)
    stand_ins = None  # kept only where the scan gathers the emissions
    if normalise_before_gather:
        log_probs, frame_peak, frame_log_total = log_softmax_of_frames(xp, logits, logit_padded), None, None
        # (T, B, S); the stand-ins and the floor applied as the backend gathers (NumPy: a block of
        # frames at a time, while it is in cache: 2x faster on `char`, 1.5x on `long`).
        gathered = gather_states(xp, log_probs, class_ids, missing, stand_in, emission_floor(log_epsilon))
    else:
        log_probs = None
        if mask_results_only:  # the parts of the raw logits, padded frames' those of zeroed ones
            frame_peak, frame_log_total = log_softmax_parts_of_frames(xp, logits, logit_padded)
        else:
            frame_peak, frame_log_total = log_softmax_parts(xp, clean_logits)
        if gather_in_scan and mask_results_only:
            gathered, stand_ins = None, (missing, stand_in)
        else:
            gathered = normalised_emissions(
                xp,
                gather_states(xp, clean_logits, class_ids),
                _time_major(xp, frame_peak),
                _time_major(xp, frame_log_total),
                frame_padded if mask_results_only else None,
                (missing, stand_in),
                log_epsilon,
            )

    # Per label n: may a path jump into it over a blank (it differs from label n - 1), and does
    # it repeat label n - 1 (one more frame needed)? Neither for n = 0. Shape-static, N = 0 too
    # (no slice beyond an empty axis: the array API leaves it unspecified); for N = 1 the
    # slices are empty. ``>= 1`` has an answer for a symbolic N (jax.export knows N >= 1).
    num_labels = labels.shape[1]
    can_jump = repeats_previous = label_padded & ~label_padded
    if num_labels >= 1:
        first = can_jump[:, :1]
        can_jump = xp.concat([first, labels[:, 1:] != labels[:, :-1]], axis=1)
        repeats_previous = xp.concat([first, labels[:, 1:] == labels[:, :-1]], axis=1)
    label_lengths = num_labels - xp.sum(xp.astype(label_padded, xp.int32), axis=1)
    repeats = xp.sum(xp.astype(repeats_previous & ~label_padded, xp.int32), axis=1)
    valid_frames = logits.shape[1] - xp.sum(xp.astype(logit_padded, xp.int32), axis=1)
    return Lattice(
        logits=clean_logits,
        frame_peak=frame_peak,
        frame_log_total=frame_log_total,
        log_probs=log_probs,
        logit_padded=logit_padded,
        state_classes=class_ids,
        # An unpadded label outside [0, K) (possible only under jax.jit, where values go
        # unchecked) makes its sequence impossible: for the loss through its stand-in, and here
        # for what reads feasibility (zero_infinity, the alignment, the posteriors).
        feasible=(label_lengths + repeats <= valid_frames) & ~xp.any(~in_range & ~label_padded, axis=1),
        log_emissions=gathered,
        frame_padded=frame_padded,
        skip_allowed=interleave_with_blanks(xp, can_jump, False, logit_padded),
        label_lengths=label_lengths,
        log_epsilon=log_epsilon,
        stand_ins=stand_ins,
    )


def carry_over_padded(xp, padded: Array, carried: Array, new: Array) -> Array:
    """(..., S) the ``carried`` states where the (...,) ``padded`` flags are set, else ``new``.

    The one Python branch on array values here: for NumPy arrays (always concrete), a frame that
    pads no sequence returns ``new`` without the select, which would change nothing (a
    broadcast ``where`` is NumPy's costliest op in the loop, 4 to 7 us on a (32, 201) state;
    most frames pad nothing; ``count_nonzero`` is the cheapest check, 0.7 us against 1.35 for
    ``any``). Traced or device arrays keep the select, so nothing waits on a value.
    """
    if is_numpy_namespace(xp) and not xp.count_nonzero(padded):
        return new
    return xp.where(padded[..., None], carried, new)


def _device(x: Array):
    from array_api_compat import device

    return device(x)


def _accumulate(hi: Array, lo: Array, value: Array) -> tuple[Array, Array]:
    """Compensated sum (Knuth's two-sum): hi + lo is the running total, lo its rounding error."""
    total = hi + value
    back = total - hi
    error = (hi - (total - back)) + (value - back)
    return total, lo + error


def log_nothing(xp, dtype) -> float:
    """What a log state holds where no path can be: half the dtype's most negative number, finite
    (so no ``-inf - -inf``) and far below anything a path holds (see :func:`_edge_and_penalty`)."""
    return float(xp.finfo(dtype).min) / 2


def _edge_and_penalty(xp, skip_allowed: Array, log_epsilon: float, dtype):
    """Built once per scan: two states beyond the lattice's edge, and log_epsilon on forbidden
    jumps (added rather than selected: one op, and a forbidden jump can't win or count); on a
    jump into a blank from the blank before it, nothing (the edge's value): optax's lattice has
    no such move, and where the lattice's first state or the mirror image's starts, it would
    be a path that starts (or ends) on another blank, which the loss does not count
    (:func:`with_mirror_image`).

    The edge states hold nothing: half the dtype's most negative number, finite (so no
    ``-inf - -inf``) and far below anything a path holds. Not log_epsilon: the log values are
    relative to each frame's peak, and a fixed log_epsilon below it, fed into the first state
    every frame, outweighed the paths once they fell -log_epsilon below a peak held elsewhere
    (by padded labels that emit with probability one), cutting losses of that size to about
    -log_epsilon. optax's log 0 is absolute, and feeds nothing in.
    """
    nothing = log_nothing(xp, dtype)
    edge = _two_columns(xp, skip_allowed, nothing, dtype)
    forbidden = xp.where(_is_blank(xp, skip_allowed), xp.full_like(skip_allowed, nothing, dtype=dtype), xp.full_like(skip_allowed, log_epsilon, dtype=dtype))
    penalty = xp.where(skip_allowed, xp.zeros_like(skip_allowed, dtype=dtype), forbidden)
    return edge, penalty


def _as_rank(xp, x: Array, ndim: int) -> Array:
    """``x`` with leading axes of size one up to ``ndim`` axes: broadcasting made explicit, as
    JAX's ``jax_numpy_rank_promotion="raise"`` requires (optax runs under it)."""
    return xp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _is_blank(xp, skip_allowed: Array) -> Array:
    """(..., S) True on the blank states, the even ones (also in the mirror image: S is odd)."""
    state_ids = xp.arange(skip_allowed.shape[-1], device=_device(skip_allowed))
    # made from an array like skip_allowed, so that it has its sharding (a batch-sharded mesh)
    return (xp.zeros_like(skip_allowed, dtype=state_ids.dtype) + _as_rank(xp, state_ids, skip_allowed.ndim)) % 2 == 0


def make_lattice_step(
    xp, *, semiring, skip_allowed: Array, on_paths: Array, log_epsilon: float, dtype, keep_history: bool, frames_per_step: int = 1
) -> tuple[Callable, Callable, Callable]:
    """The one step of the CTC recursion, for the scan: a block of frames, then a renormalisation.

    alpha_t(s) = y_t(s) * (alpha_{t-1}(s) + alpha_{t-1}(s-1) + [skip] alpha_{t-1}(s-2)), in the
    semiring's "sum" (log-sum-exp for the loss, max for Viterbi) and "product" (``times``).
    States are (..., S): the batch, and any other leading axes, ride along.

    carry: (log_state (..., S) with maximum 0, offset_hi (...), offset_lo (...)); the true log
    value of a state is ``log_state + offset_lo + offset_hi``. Under :class:`ScaledSemiring`
    the state is its (mantissa, power) pair instead, never renormalised (offsets stay as they
    came), and the emissions, given as log values, are scaled as they come. With one frame per
    step the carried state holds the two edge states in front, (..., S + 2): the predecessors
    are then slices of the carry, and XLA makes the joining the end of the kernel that computes
    the new state, where a join at the start of the step was a kernel of its own each frame
    (JAX forward 1.04x to 1.20x faster on the named shapes, `benchmarks/ab.py`, 21 rounds).
    With several, each frame's state is joined to the edge before it, as before (NumPy with
    the edge in the carry, its first state of a block a view: 0.95x and 0.96x on `char` and
    `long`, 31 rounds; within this VM's noise, but nothing to gain there).
    The renormalisation takes the maximum over the (..., S) states ``on_paths``: see
    :func:`states_on_paths`.
    block: (log_emissions (F, ..., S), padded (F, ...)) for F = ``frames_per_step`` consecutive
    frames; without the F axis when F is 1 (a blocked layout made XLA 25% slower on `long`).
    Outputs per block: if ``keep_history``, the F states after each frame (relative to the
    block's starting offsets) and those offsets; and the semiring's choices (F, ..., S), if any.

    Returns the step, and the functions that turn a state into the carried form and back.
    """
    num_states = skip_allowed.shape[-1]
    edge, penalty = semiring.edge_and_penalty(xp, skip_allowed, log_epsilon, dtype)
    edge_in_carry = frames_per_step == 1
    if semiring.renormalised:  # what stands in for the states off the paths in the maximum, made once per scan
        off_paths = xp.full_like(on_paths, float(xp.finfo(dtype).min), dtype=dtype)

    def with_edge(state):  # the edge states in front (each array of a scaled state alike)
        return tree_map(lambda beyond, part: xp.concat([beyond, part], axis=-1), edge, state)

    def to_carry(state):
        return with_edge(state) if edge_in_carry else state

    def from_carry(held):
        return tree_map(lambda part: part[..., 2:], held) if edge_in_carry else held

    def frame_step(state, extended, log_emissions, padded):
        # The predecessors s-1, s-2 of every state s, from the state with the edge in front.
        advance = tree_map(lambda part: part[..., 1 : num_states + 1], extended)
        skip = semiring.forbid(xp, tree_map(lambda part: part[..., :num_states], extended), penalty)
        combined, choice = semiring.combine(xp, state, advance, skip)
        new = semiring.times(xp, combined, semiring.from_log(xp, log_emissions))
        return tree_map(lambda carried, fresh: carry_over_padded(xp, padded, carried, fresh), state, new), choice

    def join(*per_frame):  # the block's outputs, one per frame, stacked (or the one frame's)
        return per_frame[0] if frames_per_step == 1 else xp.stack(per_frame, axis=0)

    def step(carry, block):
        held, offset_hi, offset_lo = carry
        if frames_per_step == 1:
            frames = [block]
        else:
            emissions, padded = block
            frames = [(emissions[i, ...], padded[i, ...]) for i in range(frames_per_step)]
        state, extended = from_carry(held), (held if edge_in_carry else None)
        states, choices = [], []
        for log_emissions, padded in frames:
            state, choice = frame_step(state, with_edge(state) if extended is None else extended, log_emissions, padded)
            extended = None
            states.append(state)
            choices.append(choice)
        if semiring.renormalised:  # a log state: its maximum into the offsets
            peak = xp.max(xp.where(on_paths, state, off_paths), axis=-1)
            new_carry = (to_carry(state - peak[..., None]),) + _accumulate(offset_hi, offset_lo, peak)
        else:  # a scaled state keeps its own powers of two
            new_carry = (to_carry(state), offset_hi, offset_lo)
        history = (join(*states), offset_hi, offset_lo) if keep_history else None
        return new_carry, (history, tree_map(join, *choices))

    step.renormalised = semiring.renormalised  # for the scan (JAX's unroll)
    return step, to_carry, from_carry


def states_on_paths(xp, lattice: Lattice, first_state: Array | None = None) -> Array:
    """(..., S) bool: the 2L + 1 states from each row's first one (state 0, or ``first_state``)
    on, through which the paths that the loss counts run. The states of padded labels lie
    beyond them and feed nothing into them (or, in the mirror image, only "log 0"); where
    those labels lie outside [0, K) they emit with probability one, so their states held each
    frame's peak, and a renormalisation by the peak of all states left the paths' states tens
    of thousands below it, where float32 resolves about 1e-2: on 20000 frames NumPy's float32
    loss was 0.67 from float64 with padded labels of -1, 0.006 with padded labels of 1."""
    state_ids = xp.arange(lattice.skip_allowed.shape[-1], device=_device(lattice.skip_allowed))
    first = xp.zeros_like(lattice.label_lengths) if first_state is None else first_state
    last = first + _as_rank(xp, 2 * lattice.label_lengths, first.ndim)
    state_ids = _as_rank(xp, state_ids, first.ndim + 1)
    return (state_ids >= first[..., None]) & (state_ids <= last[..., None])


def initial_state(xp, lattice: Lattice, first_state: Array | None = None, elsewhere: Array | None = None) -> tuple[Array, Array, Array]:
    """The state before the first frame: a virtual frame where every path sits in state 0 (or,
    per row, in the (...,) ``first_state``), so frame 0 can start on it or, advancing, on the
    state after it. The other states hold "log 0": ``log_epsilon``, as optax's alphas start, or
    per row the (...,) log values ``elsewhere``."""
    template = xp.zeros_like(lattice.skip_allowed, dtype=lattice.logits.dtype)  # (..., S)
    num_states = template.shape[-1]
    state_ids = xp.arange(num_states, device=_device(template))
    is_start = state_ids == 0 if first_state is None else _as_rank(xp, state_ids, first_state.ndim + 1) == first_state[..., None]
    log_zero = xp.full_like(template, lattice.log_epsilon) if elsewhere is None else xp.broadcast_to(elsewhere[..., None], template.shape)
    log_state = xp.where(is_start, xp.zeros_like(template), log_zero)
    zero = xp.zeros_like(template[..., 0])
    return log_state, zero, zero


def _in_blocks(xp, frames: Array, fill, block: int) -> Array:
    """(T, ...) -> (ceil(T / F), F, ...), the last block completed with ``fill`` (padded frames)."""
    num_frames = frames.shape[0]
    missing = -num_frames % block
    if missing:
        filler = xp.full_like(frames[:1, ...], fill)
        frames = xp.concat([frames] + [filler] * missing, axis=0)
    return xp.reshape(frames, (frames.shape[0] // block, block) + tuple(frames.shape[1:]))


def _per_frame(xp, blocked: Array, num_frames: int) -> Array:
    """(T / F, F, ...) -> (T, ...), dropping the filler frames of :func:`_in_blocks`."""
    return xp.reshape(blocked, (blocked.shape[0] * blocked.shape[1],) + tuple(blocked.shape[2:]))[:num_frames, ...]


def run_recursion(
    xp,
    scan: Scan,
    lattice: Lattice,
    *,
    semiring=LogSemiring,
    keep_history: bool = False,
    frames_per_step: int = 1,
    first_state: Array | None = None,
    elsewhere: Array | None = None,
):
    """Scan the lattice step over all frames; returns (final carry, (history, choices)).

    ``frames_per_step`` frames make one scan step, renormalised once at its end. A backend
    with a cost per operation (a torch or NumPy loop) takes several; under XLA one is best,
    because the per-frame maximum keeps frames from fusing into one kernel that recomputes each
    frame's three predecessors (8 frames per step ran 6x slower on a CPU). Within a step the
    log values drift by at most a few hundred (8 frames of peaky emissions), which leaves
    float32 differences between states exact to about 1e-5.

    ``history`` (with ``keep_history``) is (log_state (T, ..., S), offset_hi (T, ...),
    offset_lo (T, ...)): after each frame, a state and the offsets that make it absolute (see
    :func:`absolute`). ``choices`` (T, ..., S) are the semiring's, if any. ``first_state`` and
    ``elsewhere``: see :func:`initial_state`. A lattice built ``gather_in_scan`` has each frame's emissions
    gathered in the step (:func:`frame_emissions`), one frame per step.
    """
    if keep_history and not semiring.renormalised:
        raise ValueError("run_recursion keeps the history of log-space semirings only")
    if frames_per_step != 1:
        lattice = with_all_emissions(xp, lattice)
    on_paths = states_on_paths(xp, lattice, first_state)
    step, to_carry, from_carry = make_lattice_step(
        xp,
        semiring=semiring,
        skip_allowed=lattice.skip_allowed,
        log_epsilon=lattice.log_epsilon,
        dtype=lattice.logits.dtype,
        keep_history=keep_history,
        frames_per_step=frames_per_step,
        on_paths=on_paths,
    )
    log_state, offset_hi, offset_lo = initial_state(xp, lattice, first_state, elsewhere)
    init = (to_carry(semiring.from_log(xp, log_state)), offset_hi, offset_lo)
    if lattice.log_emissions is None:
        final, outputs = scan(_gathering(xp, lattice, step), init, _frames_to_gather(xp, lattice))
    elif frames_per_step == 1:
        final, outputs = scan(step, init, (lattice.log_emissions, lattice.frame_padded))
    else:
        final, outputs = _scan_in_blocks(xp, scan, step, init, lattice, frames_per_step)
    held, offset_hi, offset_lo = final
    return semiring.as_log_carry(xp, (from_carry(held), offset_hi, offset_lo), on_paths), outputs


def _scan_in_blocks(xp, scan: Scan, step: Callable, init, lattice: Lattice, frames_per_step: int):
    """The scan of a step that takes ``frames_per_step`` frames, its outputs laid out per frame."""
    num_frames = lattice.log_emissions.shape[0]
    blocks = (_in_blocks(xp, lattice.log_emissions, 0.0, frames_per_step), _in_blocks(xp, lattice.frame_padded, True, frames_per_step))
    final, (history, choices) = scan(step, init, blocks)
    if history is not None:
        states, offset_hi, offset_lo = history
        per_block = states.shape[:2] + tuple(offset_hi.shape[1:])
        history = (
            _per_frame(xp, states, num_frames),
            _per_frame(xp, xp.broadcast_to(offset_hi[:, None, ...], per_block), num_frames),
            _per_frame(xp, xp.broadcast_to(offset_lo[:, None, ...], per_block), num_frames),
        )
    choices = tree_map(lambda blocked: _per_frame(xp, blocked, num_frames), choices)
    return final, (history, choices)


def _frames_to_gather(xp, lattice: Lattice) -> tuple[Array, Array, Array, Array]:
    """What a gathering step reads per frame: its index, and its (B,) peak, log-total and padded flags."""
    num_frames = lattice.logits.shape[1]
    index = xp.arange(num_frames, dtype=lattice.state_classes.dtype, device=_device(lattice.logits))
    return index, _time_major(xp, lattice.frame_peak), _time_major(xp, lattice.frame_log_total), lattice.frame_padded


def _gathering(xp, lattice: Lattice, step: Callable) -> Callable:
    """``step`` (one frame per step) fed each frame's emissions as it comes (:func:`frame_emissions`)."""

    def gathering_step(carry, frame):
        index, peak, log_total, padded = frame
        return step(carry, (frame_emissions(xp, lattice, index, peak, log_total, padded), padded))

    gathering_step.renormalised = step.renormalised
    return gathering_step


def _ending_occupancy(xp, lattice: Lattice, final_log_state: Array) -> Array:
    """(B, S) where the paths are after the last frame: on the last blank (2L) or the last label
    (2L - 1), in proportion to their probabilities."""
    state_ids = xp.arange(final_log_state.shape[-1], device=_device(final_log_state))[None, :]
    last_blank = 2 * lattice.label_lengths[:, None]
    is_end = (state_ids == last_blank) | (state_ids == last_blank - 1)
    # The largest of the two end states alone, not of them and log_epsilon: where both lie far
    # below log_epsilon (a moderate one, and padded labels' states above them), exp of their
    # distance to it was 0 for both, and the occupancy 0 / 0.
    lowest = xp.full_like(final_log_state, float(xp.finfo(final_log_state.dtype).min))
    ending = xp.where(is_end, final_log_state, lowest)
    ending = xp.exp(ending - xp.max(ending, axis=-1, keepdims=True))
    ending = xp.where(is_end, ending, xp.zeros_like(ending))
    return ending / xp.sum(ending, axis=-1, keepdims=True)


def by_column(xp, occupancy: Array) -> Array:
    """(..., S) occupancy of each lattice state -> (..., N + 1) by column: the total over the
    blank states (every even state emits the blank), then each label's state. All that the
    gradient (one per-class sum over N + 1 columns instead of 2N + 1) and the posteriors read."""
    return xp.concat([xp.sum(occupancy[..., 0::2], axis=-1, keepdims=True), occupancy[..., 1::2]], axis=-1)


def _occupancy_step(xp, beyond: Array) -> Callable:
    """The backward step: occupancy of frame t - 1 from that of frame t (the soft backtrace).

    Each state hands its occupancy back to the predecessors that made its value, in the shares
    :class:`LogSemiringWithShares` recorded: gamma_{t-1}(s) = sum over the successors s' of s of
    gamma_t(s') * share_t(s' <- s). This is Graves et al.'s beta recursion in posterior form
    (gamma = alpha beta / P(l | x), eq. 14), and the reverse-mode derivative of the forward step.
    Shares sum to one per state, so the total occupancy stays 1 with no renormalisation.

    carry: occupancy (..., S) at frame t. frame: the (..., S) shares of frame t (advance, skip)
    as the forward scan left them, and the (...,) padded flags: a padded frame moves nothing.
    Output: frame t's occupancy of the label states (..., N), a strided view and no more, so
    that the scan keeps a (T, ..., N) array rather than a (T, ..., S) one (JAX
    forward+backward on `char` 1.17x to 1.31x faster with (T, ..., N + 1) in four
    `benchmarks/ab.py` runs: XLA's scratch fell from 37.9 to 31.8 MiB, below the 32 MiB up to
    which glibc's malloc reuses freed memory instead of mapping fresh pages each call). The
    blanks' total is left to the caller: each frame's occupancies sum to one.
    ``beyond``: (..., 2) zeros, the occupancy handed back from beyond the lattice's last state
    (made once per scan: a ``zeros_like`` per frame cost NumPy 20 ms on `long`); one array for
    both shifts, which XLA turns into pads inside one fusion (with a (..., 1) array twice in
    the concatenation it made a separate concatenation and product each frame).
    """

    def step(occupancy, frame):
        share_advance, share_skip, padded = frame
        # What each state hands one and two states back; it keeps the rest. The products are
        # shifted in the loop: no pass over the (T, B, S) shares outside it (JAX
        # forward+backward on `long` 1.1-1.2x faster than shifting the shares beforehand).
        advanced, skipped = occupancy * share_advance, occupancy * share_skip
        num_states = occupancy.shape[-1]
        from_next = xp.concat([advanced, beyond], axis=-1)[..., 1 : num_states + 1]
        from_after_next = xp.concat([skipped, beyond], axis=-1)[..., 2 : num_states + 2]
        earlier = ((occupancy - advanced) - skipped) + (from_next + from_after_next)
        return carry_over_padded(xp, padded, occupancy, earlier), occupancy[..., 1::2]

    return step


def forward_and_occupancy_by_shares(xp, scan: Scan, lattice: Lattice, *, frames_per_step: int = 1, scaled: bool = False):
    """The forward recursion's final carry, and the (T, B, N + 1) occupancies :func:`by_column`:
    the probability that the path is in state s at frame t given the labels (Graves et al. 2006,
    eq. 14), summed over the blank states.

    One forward scan under :class:`LogSemiringWithShares` (with ``scaled``,
    :class:`ScaledSemiringWithShares`), then one reverse scan of
    :func:`_occupancy_step` from where the paths end. Normalised by construction (each frame's
    occupancies sum to 1), never divided by the likelihood, so float32 accuracy holds over any
    number of frames. Zero on the columns of padded labels; a padded frame repeats the next
    valid frame's occupancy (mask it where it matters, as :func:`logits_gradient` does).
    """
    final, (_, shares) = run_recursion(xp, scan, lattice, semiring=sum_semiring(scaled, with_shares=True), frames_per_step=frames_per_step)
    frames = (shares[0], shares[1], lattice.frame_padded)
    ending = _ending_occupancy(xp, lattice, final[0])
    beyond = _two_columns(xp, ending, 0.0, ending.dtype)
    _, labels = scan(_occupancy_step(xp, beyond), ending, frames, reverse=True)
    # The blank states' total, once over all frames, not a strided sum in each loop step: the
    # rest of one, since the step hands occupancy only between states (JAX forward+backward
    # 1.03x to 1.13x faster, NumPy's 1.04x to 1.08x, on the named shapes, with the (..., 2)
    # ``beyond``; gradient errors against float64 as before, benchmarks/accuracy.py).
    blanks = 1 - xp.sum(labels, axis=-1, keepdims=True)
    return final, xp.concat([blanks, labels], axis=-1)


# An occupancy below exp(this) times its frame's largest is taken as 0 by the mirror image.
_NEGLIGIBLE_LOG_SHARE = -80.0

def with_mirror_image(xp, lattice: Lattice) -> tuple[Lattice, Array, Array]:
    """The lattice and its mirror image side by side, where the paths of each start, and what
    the other states hold before the first frame.

    The mirror image reads the frames backwards and the states from the last down (its state
    S - 1 - s is state s here); its paths start on the last blank (2L), may advance to the last
    label, and skip between the same labels, so the forward recursion over it is Graves et al.'s
    beta. Its arrays are flips of this lattice's. Each sequence's padded labels fall below its
    first state there and hold nothing; they emit ``log_epsilon``, so that no sum over them
    adds up over the frames (about k log(t / k) for k states, t frames).

    Before the first frame the lattice's other states hold ``log_epsilon``, optax's "log 0": the
    loss counts the paths that start on them with that weight. The mirror image's hold nothing
    (the edge's value): a path the loss counts ends on the last blank or label, so beta may start
    nowhere else. With ``log_epsilon`` there, alpha times beta counted paths that end on any
    state, which decide the gradient where paths weighted by "log 0" count (where no path can
    align the labels: 0.05 off the loss's own gradient in a review's test; and wherever the
    paths cost more than about -log_epsilon). The lattice's jumps from a blank to the next blank
    are not taken at all (:func:`_edge_and_penalty`), so that the jump from the mirror image's
    start into the blank two states on, which would end a path on that blank, is not either.

    Returns a Lattice of only what :func:`run_recursion` reads, each per-frame array with a new
    axis after the frames' (log_emissions (T, 2, B, S), frame_padded (T, 2, B), skip_allowed
    (2, B, S)), the (2, B) ``first_state`` of each and the (2, B) log value ``elsewhere``.
    """
    lattice = with_all_emissions(xp, lattice)
    emissions, skip_allowed = lattice.log_emissions, lattice.skip_allowed
    num_states = emissions.shape[-1]
    mirror_start = (num_states - 1) - 2 * lattice.label_lengths  # (B,): the last blank, mirrored
    below_start = xp.arange(num_states, device=_device(emissions))[None, :] < mirror_start[:, None]
    mirrored = xp.where(below_start, xp.full_like(emissions, lattice.log_epsilon), xp.flip(emissions, axis=(0, 2)))
    # Into mirrored state s' from s' - 2 is from s + 2 to s here: the jump into state s + 2.
    mirrored_skips = xp.concat([xp.zeros_like(skip_allowed[:, :2]), xp.flip(skip_allowed, axis=1)[:, :-2]], axis=1)
    both = replace(
        lattice,
        log_emissions=xp.stack([emissions, mirrored], axis=1),
        frame_padded=xp.stack([lattice.frame_padded, xp.flip(lattice.frame_padded, axis=0)], axis=1),
        skip_allowed=xp.stack([skip_allowed, mirrored_skips], axis=0),
    )
    log_zero = xp.full_like(emissions[0, :, 0], lattice.log_epsilon)  # (B,)
    nothing = xp.full_like(log_zero, log_nothing(xp, emissions.dtype))  # as the edge states hold
    return both, xp.stack([xp.zeros_like(mirror_start), mirror_start], axis=0), xp.stack([log_zero, nothing], axis=0)


def forward_and_occupancy_by_mirror(xp, scan: Scan, lattice: Lattice, *, frames_per_step: int = 1, scaled: bool = False):
    """What :func:`forward_and_occupancy_by_shares` returns, from one scan of the plain loss step
    over the lattice and its mirror image side by side (:func:`with_mirror_image`): alpha and
    beta at once.

    gamma_t(s) is alpha_t(s) beta_t(s) / y_t(s) (Graves et al. 2006, eq. 14; both hold the
    emission y_t(s)), normalised over each frame's states: the offsets of the two scans cancel,
    so float32 keeps its accuracy over any number of frames (gradient errors against float64
    within 2.5x of the shares' in ``benchmarks/accuracy.py``). The loop runs half as many steps
    as the shares and the reverse scan together, each on a state twice as large and with the
    plain step's exp and log: faster where each operation costs a dispatch or a kernel launch
    (torch's own ops on a CPU: forward+backward 1.0x to 1.6x faster, README, Performance),
    slower where the arithmetic is the cost (NumPy, XLA on a CPU). It holds (T, 2, B, S)
    emissions and states where the shares hold two (T, B, S) arrays: about twice the memory.

    Beta counts exactly the paths that alpha and the loss count (:func:`with_mirror_image`), so
    the occupancies are the loss's for any ``log_epsilon``, also where paths weighted by it
    count (until commit fab590b a ``log_epsilon`` above -1000 handed over to the shares, and
    such paths made the gradient of an impossible alignment 0.05 off). ``scaled`` is ignored:
    the mirror image keeps its history, so runs in log space. A padded frame's occupancy means
    nothing here (mask it, as :func:`logits_gradient` does).
    """
    lattice = with_all_emissions(xp, lattice)
    both, first_state, elsewhere = with_mirror_image(xp, lattice)
    final, (history, _) = run_recursion(xp, scan, both, keep_history=True, frames_per_step=frames_per_step, first_state=first_state, elsewhere=elsewhere)
    states = history[0]  # (T, 2, B, S), each frame's up to a (T, 2, B) offset
    log_occupancy = (states[:, 0, ...] + xp.flip(states[:, 1, ...], axis=(0, 2))) - lattice.log_emissions
    shifted = log_occupancy - xp.max(log_occupancy, axis=-1, keepdims=True)
    # Below e^-80 of its frame's largest an occupancy is 0, and exp never sees those values:
    # "log 0" near -1e5 takes torch's CPU exp 3x longer, and subnormal results NumPy's 10x.
    kept = shifted > _NEGLIGIBLE_LOG_SHARE
    occupancy = xp.where(kept, xp.exp(xp.clip(shifted, _NEGLIGIBLE_LOG_SHARE)), xp.zeros_like(shifted))
    return tree_map(lambda both_ways: both_ways[0, ...], final), by_column(xp, occupancy / xp.sum(occupancy, axis=-1, keepdims=True))


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
    """(B,) negative log-likelihood of each label sequence, never below zero unless a label is
    the blank."""
    log_state, offset_hi, offset_lo = final_carry
    per_length = blank_row_with_final_labels(xp, log_state)
    lengths = xp.astype(lattice.label_lengths, index_dtype)[:, None]
    log_likelihood = xp.take_along_axis(per_length, lengths, axis=1)[:, 0]
    loss = -((log_likelihood + offset_lo) + offset_hi)
    # A probability is at most one; a rounding-level negative value is clamped, nothing more,
    # and a certain sequence's loss is +0.0 (a log-likelihood of 0.0 negates to -0.0, which
    # torch's maximum would keep); NaN stays NaN.
    # Where an unpadded label is the blank (state 0's class), the lattice counts some frame
    # sequences twice and the sum may pass one: that loss is optax's and torch's, and the
    # gradient's, so it stays as it is. (Not for an impossible sequence: under jax.jit an
    # out-of-range label, clipped into [0, K), may land on the blank's class.)
    label_classes = lattice.state_classes[:, 1::2]
    positions = xp.arange(label_classes.shape[-1], device=_device(label_classes))
    unpadded = positions[None, :] < xp.astype(lattice.label_lengths, positions.dtype)[:, None]
    blank_as_label = xp.any((label_classes == lattice.state_classes[:, :1]) & unpadded, axis=1) & lattice.feasible
    return xp.where(blank_as_label, loss, xp.where(loss <= 0.0, xp.zeros_like(loss), loss))


def forward_probs_from_history(xp, history) -> tuple[Array, Array]:
    """optax's (logalpha_blank (T, B, N + 1), logalpha_nonblank (T, B, N)) from the scan history."""
    log_alpha = absolute(xp, *history[:3])
    blank = log_alpha[..., 0::2]
    last_row = blank_row_with_final_labels(xp, log_alpha[-1, ...])
    blank = xp.concat([blank[:-1, ...], last_row[None, ...]], axis=0)
    # A copy, in memory of its own: a strided view of the (T, B, 2N + 1) history kept all of it
    # alive (and pickled it), about twice its own size, and torch's .view() refused it.
    return blank, xp.concat([log_alpha[..., 1::2]], axis=0)


def per_class_sum_by_matmul(xp, values: Array, state_classes: Array, num_classes: int) -> Array:
    """(B, T, S) values, (B, S) class of each state -> (B, T, K) sums per class, for namespaces
    without a scatter-add (the array API has none): a one-hot matmul, B*T*S*K multiply-adds."""
    class_axis = xp.arange(num_classes, dtype=state_classes.dtype, device=_device(state_classes))
    emits_class = state_classes[:, :, None] == class_axis[None, None, :]
    return xp.matmul(values, xp.astype(emits_class, values.dtype))


def subtract_per_class_by_matmul(xp, minuend: Array, values: Array, state_classes: Array) -> Array:
    """(B, T, K) minus the (B, T, C) values summed per class (the (B, C) class of each column),
    by :func:`per_class_sum_by_matmul`: the fallback ``subtract_per_class`` of the adapters."""
    # In place where the namespace allows it (one (B, T, K) array fewer); JAX rebinds.
    minuend -= per_class_sum_by_matmul(xp, values, state_classes, minuend.shape[2])
    return minuend


def zero_frames_by_where(xp, values: Array, frame_zeroed: Array) -> Array:
    """(B, T, X) values, (B, T) bool -> the values with the flagged frames set to zero."""
    return xp.where(frame_zeroed[:, :, None], xp.zeros_like(values), values)


def logits_gradient(
    xp,
    lattice: Lattice,
    occupancy: Array,
    subtract_per_class: Callable,
    zero_frames: Callable,
    zeroed_sequences: Array | None = None,
    scale: Array | None = None,
) -> Array:
    """(B, T, K) d loss / d logits = softmax - occupancy summed per class (eq. 16 through the
    softmax), from the (T, B, N + 1) ``occupancy`` :func:`by_column`.

    ``subtract_per_class(xp, minuend (B, T, K), values (B, T, C), classes (B, C))`` and
    ``zero_frames(xp, values (B, T, X), frame_zeroed (B, T))`` are the backend's (see
    :mod:`ctc_multi.backends`); both may write into the arrays they are handed, which are made
    here and owned by no one else (on `bpe` NumPy's gradient took 15 ms in place against 43 ms
    with a scatter into zeros, a subtraction and a select). Here C = N + 1 columns.
    Padded frames get zero, and so does every frame of the ``zeroed_sequences`` (B,), if given.
    Each sequence's gradient is multiplied by its ``scale`` (B,), if given (a mean's weights).
    The lattice's ``log_probs`` are spent here: NumPy writes the softmax over them.
    """
    columns = xp.permute_dims(occupancy, (1, 0, 2))  # zero on the padded labels' columns
    if scale is not None:
        scale = xp.astype(scale, columns.dtype)
        columns = columns * scale[:, None, None]
    classes = xp.concat([lattice.state_classes[:, :1], lattice.state_classes[:, 1::2]], axis=-1)
    frame_zeroed = lattice.logit_padded
    if zeroed_sequences is not None:
        frame_zeroed = frame_zeroed | zeroed_sequences[:, None]
    # Zeroed before the per-class sum, not after it: XLA then makes the softmax and scatters
    # into it in place, two passes over (B, T, K) instead of four (JAX forward+backward on
    # `bpe` and `vocab5k` 1.1x faster). A padded frame's occupancy repeats the next valid one's.
    columns = zero_frames(xp, columns, frame_zeroed)
    if lattice.log_probs is None:
        probabilities = softmax(xp, lattice, scale=scale, frame_zeroed=frame_zeroed)
    else:
        probabilities = zero_frames(xp, softmax(xp, lattice, overwrite_log_probs=True, scale=scale), frame_zeroed)
    return subtract_per_class(xp, probabilities, columns, classes)
