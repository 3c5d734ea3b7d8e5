"""torch on a CPU handing its loop to NumPy or to XLA: views of the tensors' memory, and back.

The torch adapter (:mod:`ctc_multi.backends.torch`) consults these where its switches
``LOOP_IN_NUMPY_ON_CPU`` and ``LOOP_IN_XLA_ON_CPU`` are on; ``losses._Problem`` then runs the
same functions on the views with NumPy's adapter or JAX's, and makes tensors of the results.
"""

from __future__ import annotations

import torch
from torch.autograd import forward_ad

from . import forked_after_jax


def loop_may_leave_torch(arrays) -> bool:
    """Whether another framework may run a function of ``arrays``: CPU tensors that autograd
    does not record (a tensor that requires grad, grad mode on: ``ctc_loss_with_forward_probs``
    and ``ctc_posteriors`` differentiated through the loop), no dual tensor of forward-mode AD
    (``torch.autograd.forward_ad``: torch's ops carry the tangent, another framework's would
    drop it), and not under torch.compile."""
    if torch.compiler.is_compiling():
        return False
    if not all(isinstance(x, torch.Tensor) and x.device.type == "cpu" for x in arrays):
        return False
    if torch.is_grad_enabled() and any(x.requires_grad for x in arrays):
        return False
    return all(forward_ad.unpack_dual(x).tangent is None for x in arrays)


def numpy_views(arrays):
    """NumPy views of CPU tensors (no copy) where the loop may leave torch
    (:func:`loop_may_leave_torch`), or None where it stays torch's, as for tensors NumPy
    cannot view (functorch transforms, conjugate bits)."""
    if not loop_may_leave_torch(arrays):
        return None
    try:
        return tuple(x.detach().numpy() for x in arrays)
    except (RuntimeError, TypeError):
        return None


def from_numpy(x):
    """A tensor over the memory of a NumPy array that the NumPy loop made (and nothing else holds)."""
    return torch.from_numpy(x)


def xla_views(arrays):
    """JAX arrays over the tensors' memory (DLPack; JAX copies what it would not take as it is:
    memory not aligned to 64 bytes; int64 labels become int32, :func:`as_int32`) where the loop
    may leave torch (:func:`loop_may_leave_torch`), for float32 logits, and float64 ones where
    JAX keeps float64 (``jax_enable_x64``, which JAX leaves off: it would compute them in
    float32); else None, and NumPy's loop or torch's runs: also in a process forked after JAX's
    import, and for tensors with a negative or conjugate bit, which DLPack would carry without
    it (the loss of -x for x)."""
    if arrays[0].dtype not in (torch.float32, torch.float64) or not loop_may_leave_torch(arrays):
        return None
    if forked_after_jax() or any(x.is_neg() or x.is_conj() for x in arrays):
        return None
    try:
        import jax
    except ImportError as error:
        raise ImportError(
            "ctc_multi.backends.torch.LOOP_IN_XLA_ON_CPU = True runs the loop with JAX, which is not installed: "
            "pip install jax, or set it back to False"
        ) from error
    if arrays[0].dtype == torch.float64 and jax.dtypes.canonicalize_dtype(jax.numpy.float64) != jax.numpy.float64:
        return None
    try:
        return tuple(jax.dlpack.from_dlpack(as_int32(x.detach())) for x in arrays)
    except (RuntimeError, TypeError, BufferError):
        return None  # tensors DLPack cannot carry (functorch transforms, steps of 0)


def as_int32(x):
    """int64 as int32 (the JAX adapter's index dtype), beyond int32 clamped: padded labels may
    hold any value, and JAX without ``jax_enable_x64`` would wrap them (2**32 + 2 read as 2,
    a class, where the value beyond the classes is ignored in forward probabilities)."""
    if x.dtype != torch.int64:
        return x
    return x.clamp(-(2**31), 2**31 - 1).to(torch.int32)


def from_xla(x):
    """A tensor over the memory of a JAX array that XLA made for this call (and nothing else holds)."""
    return torch.from_dlpack(x)
