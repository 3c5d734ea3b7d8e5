"""Checking and normalising the arguments of the public functions, before any recursion runs.

The namespace and device of ``logits`` decide where everything runs; the other arguments are
converted to it when they come from elsewhere (a NumPy label array beside JAX logits, say).
Shape, rank and dtype checks always run. Value checks (label range, right padding, 0/1
paddings) run whenever the values can be read: always for NumPy and torch, and for JAX outside
``jax.jit`` / ``jax.vmap`` tracing.
"""

from __future__ import annotations

import math
import operator
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from array_api_compat import array_namespace, device, is_jax_namespace, is_torch_array

from .backends import backend_for, index_dtype

Array = Any


@dataclass(frozen=True)
class CTCInputs:
    """Validated inputs: ``logits`` in the compute dtype, paddings as bool arrays."""

    xp: ModuleType
    backend: ModuleType
    logits: Array  # (B, T, K) float32 or float64
    logit_padded: Array  # (B, T) bool
    labels: Array  # (B, N) integer
    label_padded: Array  # (B, N) bool
    blank_id: int
    log_epsilon: float


def namespace_of(logits: Array, name: str = "logits") -> tuple[ModuleType, Array]:
    """The array namespace of ``logits``; anything that is not an array becomes a NumPy array,
    and a NumPy array a plain one (``plain_numpy``)."""
    try:
        xp = array_namespace(logits)
    except TypeError:
        logits = _numpy_of_python_values(logits, name)
        xp = array_namespace(logits)
    return xp, plain_numpy(logits)


def _numpy_of_python_values(x, name: str):
    """A list, a tuple or a number as a NumPy array; an empty list or tuple, which has no dtype
    to go by, as int64 (NumPy's float64 would be refused as lengths or labels)."""
    import numpy as np

    try:
        x = np.asarray(x)
    except Exception as error:  # ragged nesting, objects NumPy cannot hold
        raise ValueError(f"{name} must be an array, or a list or tuple of numbers nested to a rectangular shape; got {type(x).__name__} ({error})") from error
    return x.astype(np.int64) if x.size == 0 and x.dtype == np.float64 else x


def plain_numpy(x):
    """A NumPy array as one that every NumPy function takes as it is: the base class (not
    ``np.matrix``, whose products and reshapes differ), native byte order (``np.load`` of a
    big-endian file; its float64 is otherwise not ``np.float64``), and ml_dtypes' types (bfloat16,
    float8, int4: NumPy's asarray of JAX arrays) as float32 or int64, exactly. Anything else as it is."""
    import numpy as np

    if not isinstance(x, np.ndarray):
        return x
    x = np.asarray(x)
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    if x.dtype.kind == "V" or x.dtype.type.__module__ == "ml_dtypes":  # float8_e5m2 is of kind "f"
        x = x.astype(np.int64 if x.dtype.name.startswith(("int", "uint")) else np.float32)
    return x


def in_namespace_of(xp, reference: Array, name: str, x) -> Array:
    """``x`` (an array of any framework, a list, a tuple or a number) as an ``xp`` array on ``reference``'s device."""
    try:
        foreign = array_namespace(x) is not xp
    except TypeError:  # a number, a list, a tuple
        foreign = True
    if foreign:
        # Through NumPy: torch.asarray would reinterpret a JAX buffer's bytes instead of its values.
        import numpy as np

        if not hasattr(x, "dtype"):
            x = _numpy_of_python_values(x, name)
        try:  # a writable copy: torch warns on read-only NumPy buffers
            x = np.array(as_numpy(x))
        except Exception as error:
            raise ValueError(f"{name} must be an array, a list or a tuple; got {type(x).__name__} ({error})") from error
        try:
            x = _within_integers_of(xp, x)
            return xp.asarray(x, device=_where_to_put(reference))
        except Exception as error:  # strings, objects: torch cannot hold them
            if x.dtype.kind == "f" and x.dtype.itemsize < 4:  # a namespace without float16 (array_api_strict)
                return xp.asarray(x.astype(np.float32), device=_where_to_put(reference))  # exactly
            if x.dtype.kind in "biuf" and is_jax_namespace(xp):
                try:  # JAX logits sharded over a mesh with explicit axes, which asarray cannot place
                    return xp.asarray(x)  # on no device in particular: JAX moves it to the logits
                except Exception:
                    pass
            if x.dtype.kind in "biuf":  # array_api_strict's device "no_float64", say
                raise ValueError(f"{name} of dtype {x.dtype} cannot be put on the logits' device {device(reference)}: {error}") from error
            raise ValueError(f"{name} must hold numbers; got dtype {x.dtype}") from error
    if device(x) == device(reference) or device(x) is None:  # None: a JAX tracer under vmap, which JAX places
        return plain_numpy(x)
    try:
        return xp.asarray(x, device=device(reference))
    except Exception:  # JAX: an array committed to another device (or devices) than the logits
        try:
            values = as_numpy(x)
        except Exception as error:  # torch's meta device: shapes without values
            raise ValueError(f"{name} cannot be read onto the logits' device {device(reference)}: {error}") from error
        return in_namespace_of(xp, reference, name, values)


def _where_to_put(reference: Array):
    """The device for an argument converted beside ``reference``: its device, or none for a JAX
    array that is not committed to one (a plain ``jnp.asarray``), so that the converted array is
    not committed either. Committed, it made ``jax.jit`` compile the same shapes once more than
    beside uncommitted JAX arguments (1 to 2 s a shape)."""
    return None if getattr(reference, "committed", True) is False else device(reference)


def _placed_like(backend, logits: Array, name: str, x: Array) -> Array:
    try:
        return backend.placed_like(x, logits)
    except Exception as error:  # JAX: traced without the mesh that reshard needs
        raise ValueError(
            f"{name} must be sharded along its batch axis as the logits are (their mesh has explicit axes): "
            f"pass it so (jax.device_put with the logits' batch PartitionSpec), or call under jax.set_mesh(mesh); {error}"
        ) from error


def _within_integers_of(xp, x):
    """A NumPy integer array whose values ``xp`` would wrap (int64 into JAX's int32 without
    ``jax_enable_x64``: 2**32 + 1 read as 1) clipped to the integers it holds: every such value
    lies outside every range the callers accept (labels, lengths, 0/1 paddings), and stays so."""
    import numpy as np

    if x.dtype.kind not in "iu" or not x.size:
        return x
    held = xp.iinfo(xp.asarray(x.reshape(-1)[:0]).dtype)  # the dtype xp makes of x's
    if x.min() < held.min or x.max() > held.max:
        return np.clip(x, held.min, held.max).astype(np.int64 if x.dtype.kind == "u" else x.dtype)
    return x


def as_numpy(x):
    """An array of any framework (or a list, a number) as a NumPy array, by value: a torch tensor
    off autograd's graph and on the CPU; bfloat16, which NumPy lacks (torch's, and JAX's as an
    ml_dtypes type), as float32, exactly."""
    import numpy as np

    if is_torch_array(x):
        import torch

        x = x.detach().cpu()
        x = (x.float() if x.dtype == torch.bfloat16 else x).numpy()
    try:
        x = np.asarray(x)
    except (TypeError, RuntimeError, ValueError):  # an array-API array on another device (CuPy's refuses np.asarray)
        if not hasattr(x, "__dlpack__"):
            raise
        x = np.from_dlpack(x, device="cpu", copy=True)
    return plain_numpy(x)


def first_true(bad: Array) -> tuple[int, ...]:
    """The index of the first True of a concrete boolean array that holds one (row-major)."""
    import numpy as np

    return tuple(int(i) for i in np.argwhere(np.atleast_1d(as_numpy(bad)))[0])


def first_offender(name: str, bad: Array, values: Array) -> str:
    """For an error message: where the first True of a concrete (boolean) check lies, and the
    value of ``values`` there ("; got 4 at labels[0, 1]"). An integer at its dtype's limit may
    stand for a wider one clipped on the way in (``_within_integers_of``), and is written so."""
    import numpy as np

    where = first_true(bad)
    at = f"{name}[{', '.join(map(str, where))}]"
    held = np.atleast_1d(as_numpy(values))
    value = held[where].item()
    if held.dtype.kind in "iu" and value in (np.iinfo(held.dtype).min, np.iinfo(held.dtype).max):
        return f"; got {value} or beyond ({held.dtype}'s limit) at {at}"
    return f"; got {value!r} at {at}"


def unsigned_in_index_dtype(xp, x: Array) -> Array:
    """Unsigned integers no wider than the namespace's index dtype, converted to it (torch has
    few ops for uint16 and wider): exactly, or at the same width a value past the index dtype's
    largest turns negative, which the callers' range checks refuse. Anything else as it is."""
    own, wide = xp.iinfo(x.dtype), xp.iinfo(index_dtype(xp))
    return xp.astype(x, index_dtype(xp)) if own.min == 0 and own.bits <= wide.bits else x


def compute_dtype(xp, dtype, name: str = "logits"):
    """float32 and float64 stay; narrower floats (float16, bfloat16) are computed in float32;
    wider ones (NumPy's longdouble) are refused rather than computed in less than they hold."""
    if dtype in (xp.float32, xp.float64):
        return dtype
    if not xp.isdtype(dtype, "real floating"):
        raise ValueError(f"{name} must be a real floating-point array; got dtype {dtype}")
    if getattr(dtype, "itemsize", 0) > 8:
        raise ValueError(f"{name} of dtype {dtype}, wider than float64, is not supported: cast it to float64")
    return xp.float32


def _check_shape(name: str, actual: tuple, expected: tuple, why: str) -> None:
    if tuple(actual) != tuple(expected):
        raise ValueError(f"{name} must have shape {tuple(expected)} {why}; got {tuple(actual)}")


def _check_rank(name: str, x: Array, rank: int, layout: str) -> None:
    if x.ndim != rank:
        raise ValueError(f"{name} must be a {layout}-array (rank {rank}); got shape {tuple(x.shape)}")


def _padding_dtype_allowed(xp, paddings: Array) -> bool:
    return paddings.dtype == xp.bool or xp.isdtype(paddings.dtype, "integral") or xp.isdtype(paddings.dtype, "real floating")


def _not_zero_or_one(paddings: Array) -> Array:
    return (paddings != 0) & (paddings != 1)


def _as_padding_mask(xp, name: str, paddings: Array, concrete: bool) -> Array:
    if paddings.dtype == xp.bool:
        return paddings
    if not _padding_dtype_allowed(xp, paddings):
        raise ValueError(f"{name} must hold 0/1 values as bool, int or float; got dtype {paddings.dtype}")
    if concrete and bool(xp.any(bad := _not_zero_or_one(paddings))):
        raise ValueError(f"{name} must contain only 0 (valid) and 1 (padded){first_offender(name, bad, paddings)}")
    return paddings != 0


def as_blank_id(blank_id, num_classes: int | None) -> int:
    """``blank_id`` as a Python int, in [0, K), or at least 0 where K is not known."""
    try:
        if isinstance(blank_id, bool):
            raise TypeError
        # operator.index refuses floats, float arrays (which have __index__ but raise) and,
        # under jax.jit, traced values: blank_id picks lattice states, so it must be static.
        blank_id = operator.index(blank_id)
    except TypeError as error:
        static = " (a static one under jax.jit)" if num_classes is not None else ""  # merge_tokens is not jitted
        raise ValueError(f"blank_id must be an integer{static}; got {blank_id!r}") from error
    if num_classes is None and blank_id < 0:
        raise ValueError(f"blank_id must be a class id, at least 0; got {blank_id}")
    if num_classes is not None and not 0 <= blank_id < num_classes:
        raise ValueError(f"blank_id must be in [0, K) = [0, {num_classes}); got {blank_id}")
    return blank_id


def lowest_log_epsilon(xp, dtype) -> float:
    """The lowest ``log_epsilon`` that the compute ``dtype`` allows: a third of its lowest value,
    since the recursion adds a few log_epsilons together (a forbidden jump from an empty state)."""
    return float(xp.finfo(dtype).min) / 3


def _as_log_epsilon(log_epsilon, lowest: float) -> float:
    try:
        if isinstance(log_epsilon, (str, bytes, bool)):
            raise TypeError  # float("-7") would read a string
        value = float(log_epsilon)
    except Exception as error:  # a tracer, a string, an array of several values ...
        raise ValueError(f"log_epsilon must be a Python number (a static one under jax.jit); got {log_epsilon!r}") from error
    if not (math.isfinite(value) and value < 0):
        raise ValueError(f"log_epsilon must be finite and negative (it stands for log 0); got {value}")
    if value < lowest:
        raise ValueError(f"log_epsilon must be at least a third of the compute dtype's lowest value, {lowest:.7g}, so that sums of it stay finite; got {value}")
    return value


def check_inputs(logits, logit_paddings, labels, label_paddings, *, blank_id, log_epsilon) -> CTCInputs:
    """Validate the four arrays and two options of the CTC functions; see ``ctc_loss_with_forward_probs``."""
    xp, logits = namespace_of(logits)
    backend = backend_for(xp)
    logit_paddings = in_namespace_of(xp, logits, "logit_paddings", logit_paddings)
    labels = in_namespace_of(xp, logits, "labels", labels)
    label_paddings = in_namespace_of(xp, logits, "label_paddings", label_paddings)
    logit_paddings, labels, label_paddings = (
        _placed_like(backend, logits, name, x) for name, x in (("logit_paddings", logit_paddings), ("labels", labels), ("label_paddings", label_paddings))
    )

    _check_rank("logits", logits, 3, "(B, T, K)")
    _check_rank("labels", labels, 2, "(B, N)")
    batch, frames, num_classes = logits.shape
    _check_shape("logit_paddings", logit_paddings.shape, (batch, frames), "(B, T) to match logits (B, T, K)")
    if labels.shape[0] != batch:
        raise ValueError(f"labels must have batch size B = {batch} like logits; got shape {tuple(labels.shape)}")
    _check_shape("label_paddings", label_paddings.shape, labels.shape, "(B, N) to match labels")
    if num_classes < 1:
        raise ValueError(f"logits must have at least one class (K >= 1); got shape {tuple(logits.shape)}")
    if frames < 1:
        raise ValueError(f"logits must have at least one frame (T >= 1); got shape {tuple(logits.shape)}")
    blank_id = as_blank_id(blank_id, num_classes)
    dtype = compute_dtype(xp, logits.dtype)
    log_epsilon = _as_log_epsilon(log_epsilon, lowest_log_epsilon(xp, dtype))
    if not xp.isdtype(labels.dtype, "integral"):
        raise ValueError(f"labels must be an integer array; got dtype {labels.dtype}")
    given_labels = labels  # for the error message: a label past int64's largest turns negative below
    labels = unsigned_in_index_dtype(xp, labels)  # a label past int64's largest: refused as outside [0, K)
    if xp.iinfo(labels.dtype).max < num_classes:
        # The lattice puts blank_id and K - 1 beside the labels: widen (exactly) so they fit.
        labels = xp.astype(labels, index_dtype(xp))

    concrete = all(backend.is_concrete(x) for x in (logit_paddings, labels, label_paddings))
    one_by_one = not (concrete and _padding_dtype_allowed(xp, logit_paddings) and _padding_dtype_allowed(xp, label_paddings))
    if not one_by_one:
        find = backend.compiled(_masks_and_any_invalid_value, 1)
        logit_padded, label_padded, any_invalid = find(xp, logit_paddings, labels, label_paddings, num_classes)
        one_by_one = bool(any_invalid)  # then the checks one by one, for the first failure's message
    if one_by_one:
        logit_padded = _as_padding_mask(xp, "logit_paddings", logit_paddings, concrete)
        label_padded = _as_padding_mask(xp, "label_paddings", label_paddings, concrete)
        if concrete:
            _check_label_values(xp, labels, label_padded, num_classes, given_labels)
    # No (B, T, K) copy where the dtype is already right, and no op at all (under an eager
    # jax.grad, astype of the traced logits cost 0.5 ms a call even so); but JAX's weakly typed
    # logits (jnp.full(shape, 0.3)) go through astype, as before, so that their gradient stays
    # weakly typed, as JAX's own functions' does.
    same = logits.dtype == dtype and not getattr(logits, "weak_type", False)
    return CTCInputs(
        xp=xp,
        backend=backend,
        logits=logits if same else xp.astype(logits, dtype, copy=False),
        logit_padded=logit_padded,
        labels=labels,
        label_padded=label_padded,
        blank_id=blank_id,
        log_epsilon=log_epsilon,
    )


def _masks_and_any_invalid_value(xp, logit_paddings: Array, labels: Array, label_paddings: Array, num_classes: int) -> tuple[Array, Array, Array]:
    """The paddings (of allowed dtypes) as bool masks, and a () bool: whether any value is one
    that :func:`_as_padding_mask` or :func:`_check_label_values` refuses. Compiled as one call
    where the backend compiles (JAX; ``num_classes`` traced, so a new K compiles nothing new):
    an eager call, or one under an eager ``jax.grad``, then runs one program and reads one
    value, where the checks one by one dispatched about twenty ops and read four values (0.67
    ms a call on `small`, under ``jax.grad`` 2.9 ms); on CUDA, torch waits for the device once
    instead of four times. (NumPy and torch on a CPU: about 20 us more a call than one by one.)"""
    invalid = []
    masks = []
    for paddings in (logit_paddings, label_paddings):
        if paddings.dtype == xp.bool:
            masks.append(paddings)
        else:
            masks.append(paddings != 0)
            invalid.append(xp.any(_not_zero_or_one(paddings)))
    invalid.append(xp.any(_invalid_labels(labels, masks[1], num_classes)))
    if labels.shape[1] > 1:
        invalid.append(xp.any(_label_after_padding(masks[1])))
    return masks[0], masks[1], xp.any(xp.stack(invalid))


def _invalid_labels(labels: Array, label_padded: Array, num_classes: int) -> Array:
    return ~label_padded & ((labels < 0) | (labels >= num_classes))


def _label_after_padding(label_padded: Array) -> Array:
    """(B, N - 1): True where a padding is followed by a label (the label one column right)."""
    return label_padded[:, :-1] & ~label_padded[:, 1:]


def _check_label_values(xp, labels: Array, label_padded: Array, num_classes: int, given_labels: Array) -> None:
    bad = _invalid_labels(labels, label_padded, num_classes)
    if bool(xp.any(bad)):
        raise ValueError(f"labels must lie in [0, K) = [0, {num_classes}) wherever label_paddings is 0{first_offender('labels', bad, given_labels)}")
    if labels.shape[1] > 1 and bool(xp.any(label_after_padding := _label_after_padding(label_padded))):
        # the offender is the 0 that follows a 1: one column to the right of the check's True
        row, column = (int(i) for i in first_true(label_after_padding))
        raise ValueError(f"label_paddings must be right-padded: in each row, zeros (labels) and then ones (padding); got a 0 after a 1 at label_paddings[{row}, {column + 1}]")
