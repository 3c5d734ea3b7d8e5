"""NumPy, and any other array-API namespace: the scan is a plain Python loop."""

from __future__ import annotations

import functools
import math
import sys
import threading

from array_api_compat import array_namespace, device, is_numpy_namespace

from ..lattice import (
    finite_peak,
    forward_and_occupancy_by_shares,
    gather_states_by_take,
    log_softmax_of_frames_by_where,
    log_softmax_parts_by_where,
    subtract_log_total,
    subtract_per_class_by_matmul,
    zero_frames_by_where,
)
from ..scan import python_loop_scan

NAME = "numpy"
INDEX_DTYPE_NAME = "int64"


def _stack(arrays):
    return array_namespace(arrays[0]).stack(arrays, axis=0)


def _output_buffer(y, length):
    if is_numpy_namespace(array_namespace(y)):
        return _scratch((length,) + tuple(y.shape), y.dtype)
    return array_namespace(y).empty((length,) + tuple(y.shape), dtype=y.dtype, device=device(y))


# Whether NumPy's large scratch arrays (the gathered emissions, the scans' outputs: the shares,
# the occupancies) are kept after a call, for the next call of the same sizes in the same
# thread. A fresh array of 1 MB or more costs a page fault per 4 kB page where glibc's malloc
# has handed the freed memory back to the system, which it does after each call of these
# sizes: ctc_loss_and_grad on `char` 89 -> 68 ms and on `long` 175 -> 146 ms with them kept,
# 0 faults a call instead of about 3500 and 3900 (`python benchmarks/faults.py [--fresh]`;
# README, Performance). Each thread keeps at most
# SCRATCH_KEPT arrays and SCRATCH_MAX_BYTES in all (about 90 MB on `long`), and an array is
# handed out again only where nothing else holds it or a view of it (its reference count): a
# result or anything a caller keeps is never written over. False: a fresh array each time,
# and a thread's kept arrays are let go at its next call (now: :func:`release_scratch`).
# Where the interpreter counts no references (PyPy), nothing is kept.
REUSE_SCRATCH = True
SCRATCH_KEPT = 4
SCRATCH_MAX_BYTES = 1 << 27
SCRATCH_MIN_BYTES = 1 << 20
_kept = threading.local()
_getrefcount = getattr(sys, "getrefcount", None)


def _references(arrays: list, index: int) -> int:
    return _getrefcount(arrays[index])


# What that count is where only the list holds the object (2 on CPython 3.11: the list's and
# getrefcount's argument), measured rather than assumed, as interpreters change what a call
# counts (CPython 3.14 borrows some references).
_HELD_BY_THE_LIST_ALONE = _references([object()], 0) if _getrefcount is not None else None


def release_scratch() -> None:
    """Let go of the scratch arrays this thread keeps (:data:`REUSE_SCRATCH`)."""
    _kept.__dict__.pop("arrays", None)


def _scratch(shape, dtype):
    """``np.empty(shape, dtype)``, or an array of that shape and dtype that this thread had and
    that nothing else holds now (:data:`REUSE_SCRATCH`)."""
    import numpy as np

    shape, dtype = tuple(int(n) for n in shape), np.dtype(dtype)
    size = math.prod(shape) * dtype.itemsize
    if not REUSE_SCRATCH or _HELD_BY_THE_LIST_ALONE is None:
        release_scratch()
        return np.empty(shape, dtype=dtype)
    if size < SCRATCH_MIN_BYTES:
        return np.empty(shape, dtype=dtype)
    kept = _kept.__dict__.setdefault("arrays", [])  # this thread's, the latest handed out last
    for index in range(len(kept)):
        if kept[index].shape == shape and kept[index].dtype == dtype and _references(kept, index) == _HELD_BY_THE_LIST_ALONE:
            array = kept.pop(index)
            break
    else:
        array = np.empty(shape, dtype=dtype)
    if size <= SCRATCH_MAX_BYTES:
        kept.append(array)
    while len(kept) > SCRATCH_KEPT or sum(x.nbytes for x in kept) > SCRATCH_MAX_BYTES:
        del kept[0]  # the one handed out longest ago
    return array


# Up to this many classes, subtract_per_class uses a one-hot matmul (B*T*C*K) rather than a scatter-add.
ONE_HOT_MAX_CLASSES = 128

# Whether the log-softmax comes before the lattice's gather (see ctc_multi.lattice.build_lattice).
NORMALISE_BEFORE_GATHER = True

# Lattice frames per scan step (see ctc_multi.lattice.run_recursion).
FRAMES_PER_STEP = 8


def gather_in_scan(num_cells: int) -> bool:
    return False  # normalised before the gather, which takes a block of frames at a time


def scan(step, init, xs, *, reverse=False):
    return python_loop_scan(step, init, xs, reverse=reverse, stack=_stack, output_buffer=_output_buffer)


def is_concrete(x) -> bool:
    return True


def with_explicit_gradient(forward, forward_with_residuals, backward):
    return forward  # no autodiff to wire: ctc_loss_and_grad calls backward itself


def subtract_per_class(xp, minuend, values, state_classes):
    """(B, T, K) minus the (B, T, C) values summed per class ((B, C) class of each column), in
    place: NumPy's unbuffered ``subtract.at`` at flat indices for many classes (a float64
    bincount was 5x slower on `bpe`); the one-hot matmul for few (faster up to about a hundred)
    and for other array-API namespaces, which have no scatter-add."""
    num_classes = minuend.shape[2]
    if not is_numpy_namespace(xp) or num_classes <= ONE_HOT_MAX_CLASSES:
        return subtract_per_class_by_matmul(xp, minuend, values, state_classes)
    import numpy as np

    batch, frames, _ = values.shape
    rows = np.arange(batch * frames).reshape(batch, frames, 1) * num_classes
    minuend = np.ascontiguousarray(minuend)  # so that reshape(-1) below is a view
    np.subtract.at(minuend.reshape(-1), (rows + state_classes[:, None, :]).ravel(), values.ravel())
    return minuend


def zero_frames(xp, values, frame_zeroed):
    """(B, T, X) values with the (B, T) flagged frames set to zero: for NumPy in place, writing
    only those frames (a select reads and writes all of them)."""
    if not is_numpy_namespace(xp):
        return zero_frames_by_where(xp, values, frame_zeroed)
    values[frame_zeroed] = 0
    return values


# Elements per chunk of NumPy's log-softmax: about 1 MB of float32, so that its five passes
# (peak, shift, exp, sum, subtract) find the chunk in cache.
LOG_SOFTMAX_CHUNK = 1 << 18


def log_softmax_of_frames(xp, logits, frame_zeroed):
    """(B, T, K), (B, T) -> (B, T, K) log-softmax, the flagged frames taken as zero logits: for
    NumPy a cache-sized block of frames at a time (1.6x faster than whole arrays on `bpe` and
    `vocab5k`, where the (B, T, K) array is 26 MB and every pass over it is a trip to memory)."""
    if not is_numpy_namespace(xp):
        return log_softmax_of_frames_by_where(xp, logits, frame_zeroed)
    import numpy as np

    num_classes = logits.shape[-1]
    rows, zeroed = np.reshape(logits, (-1, num_classes)), np.reshape(frame_zeroed, (-1, 1))
    result = np.empty(rows.shape, dtype=logits.dtype)
    block = max(1, LOG_SOFTMAX_CHUNK // num_classes)
    for start in range(0, rows.shape[0], block):
        part = slice(start, start + block)
        chunk = rows[part] if not np.count_nonzero(zeroed[part]) else np.where(zeroed[part], 0, rows[part])
        np.subtract(chunk, finite_peak(np, chunk)[:, None], out=result[part])
        subtract_log_total(np, result[part])
    return np.reshape(result, logits.shape)


log_softmax_parts_of_frames = log_softmax_parts_by_where  # unused: NumPy normalises, then gathers


# Elements per block of NumPy's gather: 256 KB of float32, so that the stand-ins and the floor
# are written while the block is in cache.
GATHER_BLOCK = 1 << 16


def gather_states(xp, values, state_classes, replaced=None, replacement=None, floor=None):
    """(B, T, K), (B, S) -> (T, B, S), then ``replace_and_floor`` with the rest: for NumPy one
    ``take`` per sequence and block of frames, written into the time-major result, and the
    stand-ins and the floor applied to that block in place (2-3x faster than one take at flat
    indices on `long` and `bpe`, 3x or more than take_along_axis; and the block-wise finish 2x
    faster on `char`, 1.5x on `long` than a select and a clip over the whole result). Other
    namespaces take along the class axis."""
    if not is_numpy_namespace(xp):
        return gather_states_by_take(xp, values, state_classes, replaced, replacement, floor)
    import numpy as np

    batch, frames, _ = values.shape
    num_states = state_classes.shape[1]
    gathered = _scratch((frames, batch, num_states), values.dtype)
    block = max(1, GATHER_BLOCK // num_states)
    for sequence in range(batch):
        classes = state_classes[sequence]
        stand_ins = None if replaced is None or not replaced[sequence].any() else replaced[sequence]
        for start in range(0, frames, block):
            part = gathered[start : start + block, sequence, :]
            np.take(values[sequence, start : start + block], classes, axis=1, out=part)
            if stand_ins is not None:
                part[:, stand_ins] = replacement[sequence, stand_ins]
            if floor is not None:
                np.maximum(part, floor, out=part)
    return gathered


def scaled_sums(dtype) -> bool:
    """Log space: the scaled step has about twice as many ops, each a dispatch from the loop
    (``ctc_loss_and_grad`` on `char`, `bpe`, `long` 1.2x, 1.3x, 1.9x slower with it in float32:
    ``benchmarks/ab.py --backends numpy``, medians of 7 rounds)."""
    return False


# Bound by its arithmetic (an exp on a (4, 801) state costs about as much as its dispatch): with
# the mirror image's doubled state and exp/log, ctc_loss_and_grad ran 1.2x to 1.7x slower on
# `char`, `bpe` and `long` than with the shares (README, Performance: run.py --occupancy).
forward_and_occupancy = forward_and_occupancy_by_shares


def numpy_views(arrays):
    return None  # the loop is NumPy's (or the namespace's) already


def from_numpy(x):
    raise NotImplementedError("the NumPy adapter's loop is NumPy's already")


def xla_views(arrays):
    return None  # the loop is NumPy's (or the namespace's) already


def from_xla(x):
    raise NotImplementedError("the NumPy adapter never hands its loop to XLA")


def is_all_ones(x) -> bool:
    return False  # no autodiff here calls a backward (ctc_loss_and_grad returns the gradient)


def detach(x):
    return x


def refuse_derivatives(logits, outputs, message):
    return outputs  # no autodiff


def compiled(function, num_static):
    """``function`` itself (it runs op by op: nothing to compile), under NumPy's error state
    for underflow set to ignore: the recursion's exp of "log 0" (-1e5) underflows to 0 by
    design, and a caller's ``np.seterr(all="raise")`` made every call raise
    FloatingPointError (``"warn"``: dozens of warnings). Their other settings stay."""
    import numpy as np

    @functools.wraps(function)
    def run(*arguments):
        with np.errstate(under="ignore"):
            return function(*arguments)

    return run


def placed_like(x, logits):
    return x  # one device, no sharding
