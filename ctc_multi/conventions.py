"""Other libraries' argument conventions, translated to ctc_multi's and run on its recursion.

ctc_multi (like optax) takes batch-major ``(B, T, K)`` logits with ``(B, T)`` and ``(B, N)``
paddings. PyTorch's ``torch.nn.functional.ctc_loss`` takes time-major ``(T, B, C)`` log
probabilities with lengths, and targets either padded ``(B, S)`` or concatenated. This module
holds the conversions between lengths and paddings, and :func:`torch_ctc_loss`, a drop-in for
the torch function that accepts NumPy and JAX arrays too. Nothing here is recursion: every
function ends in :func:`ctc_multi.ctc_loss` or in a few array operations.
"""

from __future__ import annotations

import operator
from typing import Any

from array_api_compat import device, is_jax_namespace, is_numpy_namespace

from .backends import backend_for, index_dtype
from .inputs import _as_padding_mask, first_offender, in_namespace_of, namespace_of, unsigned_in_index_dtype
from .losses import DEFAULT_LOG_EPSILON, ctc_loss

Array = Any


def _as_int(name: str, value, why: str) -> int:
    """A Python int from an integer (NumPy and 0-d integer arrays included), or a ValueError naming ``name``."""
    try:
        if isinstance(value, bool):
            raise TypeError
        return operator.index(value)  # refuses floats, float arrays and, under jax.jit, traced values
    except TypeError as error:
        raise ValueError(f"{name} must be {why}; got {value!r}") from error


def _as_size(name: str, value) -> int:
    value = _as_int(name, value, "a non-negative integer")
    if value < 0:
        raise ValueError(f"{name} must be a non-negative integer; got {value}")
    return value


def _check_integers(xp, name: str, x: Array) -> None:
    if not xp.isdtype(x.dtype, "integral"):
        raise ValueError(f"{name} must hold integers; got dtype {x.dtype}")


def _known(xp, value: Array) -> Array | None:
    """``value`` when it can be read now, None under tracing (jax.jit, vmap, torch.compile).

    Asked of the computed value, not of the inputs: inside ``jax.jit`` even operations on
    concrete arrays closed over by the traced function give tracers.
    """
    return value if backend_for(xp).is_concrete(value) else None


def _violated(xp, condition: Array) -> bool:
    """Whether any entry of a (boolean) check is True, as far as the values can be read now."""
    flag = _known(xp, xp.any(condition))
    return flag is not None and bool(flag)


def _in_range(xp, name: str, lengths: Array, upper: int | None, upper_name: str = "") -> Array:
    """Integer ``lengths`` checked (for concrete values) to lie in [0, ``upper``] (``upper_name``
    names it in the error), or with ``upper`` None to be non-negative and fit the index dtype; then in
    the namespace's index dtype. The check runs in their own dtype, which may be too narrow to
    hold ``upper`` (int8 lengths against 130 frames): then no length can exceed it, and the
    conversion after the check is exact."""
    wide = index_dtype(xp)
    given = lengths  # for the error message: a length past int64's largest turns negative below
    lengths = unsigned_in_index_dtype(xp, lengths)
    # Without an upper bound, one below the index dtype's largest: a wider length beside JAX
    # logits without x64 arrives clipped to that largest (inputs._within_integers_of) and is
    # refused here, rather than in a later message that would quote the clipped number.
    limit = xp.iinfo(wide).max - 1 if upper is None else upper
    outside = lengths < 0
    if xp.iinfo(lengths.dtype).max > limit:
        outside = outside | (lengths > limit)
    if _violated(xp, outside):
        got = first_offender(name, outside, given)
        if upper is None:
            raise ValueError(f"{name} must be non-negative (and at most {limit}){got}")
        raise ValueError(f"{name} must lie in [0, {upper_name}] = [0, {upper}]{got}")
    return xp.astype(lengths, wide)


def _device_for_positions(xp, x: Array):
    """Where to make a range of positions that is combined with ``x``: ``x``'s device, except in
    JAX, where that may be a batch sharding (the positions axis was then sharded over the batch's
    devices: refused where they do not divide it, and a (B, T) result sharded along T), and an
    unplaced range goes where ``x`` is."""
    return None if is_jax_namespace(xp) else device(x)


def _is_real_dtype(xp, dtype) -> bool:
    if dtype in (bool, int, float):  # Python's types: every namespace's astype takes them
        return True
    try:
        if is_numpy_namespace(xp):
            import numpy as np

            dtype = np.dtype(dtype)  # NumPy's astype also takes bool, float, "f4"
        return bool(xp.isdtype(dtype, ("bool", "integral", "real floating")))
    except Exception:  # not a dtype of xp (another framework's, a string)
        return False


def lengths_to_paddings(lengths: Array, max_len: int, *, dtype=None) -> Array:
    """(B,) lengths -> (B, max_len) paddings: 1 on positions ``>= length``, 0 before.

    The padding convention of :func:`ctc_multi.ctc_loss` (and optax) from the length
    convention of torch: row ``b`` holds ``lengths[b]`` zeros, then ones.

    Args:
      lengths: (B,)-array of integers in [0, max_len], or a list or tuple of them. The
        result has its namespace (NumPy for lists and tuples) and device.
      max_len: the number of positions T (a Python integer, so the shape is static under
        ``jax.jit``).
      dtype: dtype of the result, a bool, integer or real floating dtype of the lengths'
        namespace (others are refused); default float32.

    Returns:
      (B, max_len)-array of 0.0 (valid) and 1.0 (padded).

    Raises:
      ValueError: naming the argument, when ``lengths`` is not a 1-D integer array, when
        ``max_len`` is not a non-negative integer, when ``dtype`` is not one of the lengths'
        namespace, or (for concrete values) when a length lies outside [0, max_len].

    Example:
      >>> import numpy as np, ctc_multi
      >>> ctc_multi.lengths_to_paddings(np.array([3, 1]), 4)
      array([[0., 0., 0., 1.],
             [0., 1., 1., 1.]], dtype=float32)
    """
    xp, lengths = namespace_of(lengths, "lengths")
    max_len = _as_size("max_len", max_len)
    if lengths.ndim != 1:
        raise ValueError(f"lengths must be a (B,)-array; got shape {tuple(lengths.shape)}")
    _check_integers(xp, "lengths", lengths)
    lengths = _in_range(xp, "lengths", lengths, max_len, "max_len")
    if dtype is not None and not _is_real_dtype(xp, dtype):
        raise ValueError(f"dtype must be a bool, integer or real floating dtype of the lengths' namespace, {xp.__name__}; got {dtype!r}")
    positions = xp.arange(max_len, dtype=lengths.dtype, device=_device_for_positions(xp, lengths))
    padded = positions[None, :] >= lengths[:, None]
    return xp.astype(padded, xp.float32 if dtype is None else dtype)


def paddings_to_lengths(paddings: Array) -> Array:
    """(B, T) paddings -> (B,) lengths: the number of valid (0) entries in each row.

    For right-padded rows this inverts :func:`lengths_to_paddings`; where padding sits in the
    middle (which :func:`ctc_multi.ctc_loss` allows) it still counts the valid frames.

    Args:
      paddings: (B, T)-array, 1 (or True) where an entry is padding, 0 where it is valid;
        bool, integer or floating. The result has its namespace and device.

    Returns:
      (B,)-array of integers: int64 (int32 for JAX).

    Raises:
      ValueError: naming ``paddings``, when it is not 2-D, or (for concrete values) holds
        anything but 0 and 1.

    Example:
      >>> import numpy as np, ctc_multi
      >>> ctc_multi.paddings_to_lengths(np.array([[0.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
      array([2, 1])
    """
    xp, paddings = namespace_of(paddings, "paddings")
    if paddings.ndim != 2:
        raise ValueError(f"paddings must be a (B, T)-array; got shape {tuple(paddings.shape)}")
    concrete = _known(xp, xp.any(xp.astype(paddings, xp.bool))) is not None
    padded = _as_padding_mask(xp, "paddings", paddings, concrete)
    return xp.sum(xp.astype(~padded, index_dtype(xp)), axis=1)


def _lengths_argument(xp, reference: Array, name: str, lengths, batch: int, unbatched: bool) -> Array:
    lengths = in_namespace_of(xp, reference, name, lengths)
    if unbatched and lengths.ndim == 0:
        lengths = xp.reshape(lengths, (1,))
    if tuple(lengths.shape) != (batch,):
        layout = "a number, or a (1,)-array, for unbatched log_probs" if unbatched else f"a (B,)-array with B = {batch}"
        raise ValueError(f"{name} must be {layout}; got shape {tuple(lengths.shape)}")
    _check_integers(xp, name, lengths)
    return lengths


def _concatenated_to_padded(xp, targets: Array, target_lengths: Array, width: int, index_dtype) -> Array:
    """(sum(lengths),) concatenated targets -> (B, width) right-padded ones (padding holds target 0)."""
    lengths = xp.astype(target_lengths, index_dtype)
    starts = xp.cumulative_sum(lengths) - lengths
    positions = starts[:, None] + xp.arange(width, dtype=index_dtype, device=_device_for_positions(xp, targets))[None, :]
    if targets.shape[0] == 0:
        return xp.zeros(positions.shape, dtype=targets.dtype, device=device(targets))
    positions = xp.clip(positions, 0, targets.shape[0] - 1)
    return xp.reshape(xp.take(targets, xp.reshape(positions, (-1,)), axis=0), positions.shape)


def torch_ctc_loss(
    log_probs: Array,
    targets: Array,
    input_lengths: Array,
    target_lengths: Array,
    blank: int = 0,
    reduction: str = "mean",
    zero_infinity: bool = False,
    *,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
) -> Array:
    """``torch.nn.functional.ctc_loss``'s conventions, computed by ctc_multi's recursion.

    Same arguments, defaults and results as the torch function, for torch tensors (CPU or
    CUDA, with autograd through ctc_multi's explicit backward), JAX arrays (jit, vmap, grad)
    and NumPy arrays; the result has the type of ``log_probs``. The log-softmax that
    ctc_multi applies to its logits leaves log probabilities unchanged, so the gradient with
    respect to ``log_probs`` is torch's: ``exp(log_probs) - occupancy``.

    Three differences:

    - A sequence that cannot be aligned (``input_length`` shorter than its target plus the
      blanks between repeated labels) gets a large finite loss (about 1e5, ctc_multi's
      ``-log_epsilon``) and a finite gradient, where torch gives ``inf`` and NaN gradients.
      ``zero_infinity=True`` gives loss 0 and gradient 0 for them, as in torch. Not for a
      sequence that ``-inf`` log-probabilities block (every path through a class of
      probability 0): its loss is finite, about 1e5 per blocked frame, where torch gives
      ``inf``, or 0 with ``zero_infinity=True`` (see :func:`ctc_multi.ctc_loss`).
    - ``log_probs`` that are not log probabilities (frames whose exponentials do not sum to
      one: scores with a log prior subtracted, say) are normalised first, so the loss is that of
      their log-softmax; torch sums such scores as given. Pass ``log_probs.log_softmax(-1)``
      to torch for the same number, or normalise the scores yourself before either.
    - ``log_epsilon``, ctc_multi's finite stand-in for log 0 (keyword only; torch has none):
      where every valid path costs more than ``-log_epsilon`` nats (near-tight alignments of
      peaky log-probabilities), the loss follows a path that only the stand-in allows, about
      ``-log_epsilon`` (99999.3 where torch gives 120000 in a tested case). Pass a lower one
      (``log_epsilon=-1e7``) for torch's number there.

    Args:
      log_probs: (T, B, C)-array of log probabilities (T frames, B sequences, C classes), or
        (T, C) for one unbatched sequence.
      targets: integer class ids, not ``blank``: (B, S)-array padded to S >= max target
        length (values past each length are ignored), or (sum(target_lengths),)-array of
        the targets concatenated. Unbatched: (S,)-array with S = target length, or (1, S).
      input_lengths: (B,) valid frames per sequence, each in [0, T]: an integer array of any
        supported framework, a list or a tuple (a number when unbatched).
      target_lengths: (B,) target length per sequence, in the same forms.
      blank: class id of the blank, in [0, C).
      reduction: "mean" (default): each loss divided by its target length (at least 1), then
        averaged over the batch; "sum"; or "none": the (B,) losses (a 0-d array when
        unbatched).
      zero_infinity: when True, sequences that cannot be aligned get loss 0 and gradient 0.
      log_epsilon: as in :func:`ctc_multi.ctc_loss`; default -1e5.

    Returns:
      The loss in the dtype of ``log_probs`` (float32 for 16-bit floats): a 0-d array, or
      (B,) for ``reduction="none"``.

    Raises:
      ValueError: naming the argument, on a bad rank or shape, non-integer targets or lengths,
        ``blank`` outside [0, C), an unknown ``reduction``, and (for concrete values) lengths
        out of range or concatenated targets whose length is not ``sum(target_lengths)``.

    Example:
      >>> import numpy as np, ctc_multi
      >>> log_probs = np.log(np.full((3, 1, 2), 0.5))    # T=3 uniform frames over {blank, 1}
      >>> loss = ctc_multi.torch_ctc_loss(log_probs, np.array([[1]]), [3], [1], reduction="none")
      >>> round(float(loss[0]), 4)                      # 6 of the 8 paths read "1": log(8/6)
      0.2877
    """
    xp, log_probs = namespace_of(log_probs, "log_probs")
    if log_probs.ndim not in (2, 3):
        raise ValueError(f"log_probs must be a (T, B, C)-array, or (T, C) when unbatched; got shape {tuple(log_probs.shape)}")
    unbatched = log_probs.ndim == 2
    if unbatched:
        log_probs = xp.expand_dims(log_probs, axis=1)
    frames, batch, num_classes = log_probs.shape
    blank = _as_int("blank", blank, f"an integer in [0, C) = [0, {num_classes})")
    if not 0 <= blank < num_classes:
        raise ValueError(f"blank must be an integer in [0, C) = [0, {num_classes}); got {blank}")
    input_lengths = _lengths_argument(xp, log_probs, "input_lengths", input_lengths, batch, unbatched)
    target_lengths = _lengths_argument(xp, log_probs, "target_lengths", target_lengths, batch, unbatched)
    targets = in_namespace_of(xp, log_probs, "targets", targets)
    _check_integers(xp, "targets", targets)
    input_lengths = _in_range(xp, "input_lengths", input_lengths, frames, "T")
    target_lengths = _in_range(xp, "target_lengths", target_lengths, None)
    longest = _known(xp, xp.max(target_lengths)) if batch else 0

    if targets.ndim == 2:
        if targets.shape[0] != batch:
            raise ValueError(f"targets must be a (B, S)-array with B = {batch} when 2-D; got shape {tuple(targets.shape)}")
        if longest is not None and int(longest) > targets.shape[1]:
            raise ValueError(f"targets of shape {tuple(targets.shape)} are narrower than the longest target_lengths, {int(longest)}")
        labels = targets
    elif targets.ndim == 1:
        total = targets.shape[0]
        expected_total = _known(xp, xp.sum(target_lengths))
        if expected_total is not None and int(expected_total) != total:
            raise ValueError(f"targets, when 1-D, must hold sum(target_lengths) = {int(expected_total)} ids; got {total}")
        # Under jax.jit the longest target is unknown; the total length bounds it statically.
        width = total if longest is None else int(longest)
        labels = _concatenated_to_padded(xp, targets, target_lengths, max(width, 1), index_dtype(xp))
    else:
        raise ValueError(f"targets must be a (B, S)-array or a 1-D concatenation; got shape {tuple(targets.shape)}")

    loss = ctc_loss(
        xp.permute_dims(log_probs, (1, 0, 2)),
        lengths_to_paddings(input_lengths, frames),
        labels,
        lengths_to_paddings(target_lengths, labels.shape[1]),
        blank_id=blank,
        reduction=reduction,
        zero_infinity=zero_infinity,
        log_epsilon=log_epsilon,
    )
    return xp.reshape(loss, ()) if unbatched and reduction == "none" else loss
