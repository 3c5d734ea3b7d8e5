"""Scan adapters, one module per framework, imported only when an input needs it.

Each adapter module provides:

* ``NAME``: the backend's name;
* ``scan(step, init, xs, *, reverse=False)``: the :class:`ctc_multi.scan.Scan` protocol;
* ``is_concrete(x)``: whether the values of ``x`` can be read now (False inside a JAX trace);
* ``FRAMES_PER_STEP``: lattice frames per scan step (see :func:`ctc_multi.lattice.run_recursion`);
* ``NORMALISE_BEFORE_GATHER``: whether the (B, T, K) logits get their log-softmax before the
  lattice's gather, rather than the gathered (T, B, S) values after it (see
  :func:`ctc_multi.lattice.build_lattice`);
* ``gather_in_scan(num_cells)``: whether, for a lattice of ``num_cells`` = T * B * S cells, the
  scan gathers each frame's emissions as it reaches it rather than the lattice all of them
  beforehand (see :func:`ctc_multi.lattice.build_lattice`; only where the logits are gathered
  before they are normalised);
* ``INDEX_DTYPE_NAME``: the integer dtype its gathers want for indices;
* ``with_explicit_gradient(forward, forward_with_residuals, backward)``: a function of
  ``(logits, *others)`` returning ``forward(logits, *others)`` whose gradient, where the
  framework has autodiff, is ``backward(residuals, cotangent)`` (residuals from
  ``forward_with_residuals``) instead of autodiff through the scan;
* ``subtract_per_class(xp, minuend, values, classes)``: the (B, T, K) ``minuend`` minus the
  (B, T, C) values summed per class (a scatter-add where the framework has one; (B, C) class
  of each column), and ``zero_frames(xp, values, frame_zeroed)``: (B, T, X) values with the
  (B, T) flagged frames set to zero. Both may write into the arrays they are handed;
* ``log_softmax_of_frames(xp, logits, frame_zeroed)``: (B, T, K) log-softmax over the
  classes, the (B, T) flagged frames taken as zero logits (where ``NORMALISE_BEFORE_GATHER``),
  and ``log_softmax_parts_of_frames(xp, logits, frame_zeroed)``: its (B, T) peak and log-total
  alike (elsewhere, where nothing differentiates through the lattice; see
  :func:`ctc_multi.lattice.log_softmax_parts_by_where`);
* ``gather_states(xp, values, state_classes, replaced=None, replacement=None, floor=None)``:
  (B, T, K) values, (B, S) class of each lattice state -> (T, B, S) the value of each state's
  class, time-major, then with ``replacement`` (B, S) where ``replaced`` (B, S) is True and at
  least ``floor`` (:func:`ctc_multi.lattice.replace_and_floor`; those left None do nothing);
* ``numpy_views(arrays)``: NumPy views of the (validated) arrays where the adapter has NumPy
  run a function instead of its own loop (torch on a CPU, where autograd records nothing:
  ``losses._Problem.where_the_loop_runs_fastest``), else None, and ``from_numpy(x)``: one
  result of that run as the framework's array;
* ``xla_views(arrays)`` and ``from_xla(x)``: alike, JAX arrays where the adapter has XLA run the
  function, under ``jax.jit`` (torch's opt-in ``LOOP_IN_XLA_ON_CPU``; consulted first);
* ``scaled_sums(dtype)``: whether the loss's sum over paths runs in scaled probabilities
  (:class:`ctc_multi.lattice.ScaledSemiring`: no exp or log per lattice cell, more integer
  ops) rather than in log space, for logits computed in ``dtype`` (with a ``log_epsilon``
  below :data:`ctc_multi.lattice.SCALED_MIN_LOG_EPSILON`, log space runs whatever it says);
* ``forward_and_occupancy(xp, scan, lattice, *, frames_per_step, scaled)``: the forward recursion's
  final carry and the (T, B, N + 1) occupancies (:func:`ctc_multi.lattice.by_column`): :func:`ctc_multi.lattice.forward_and_occupancy_by_shares`
  where the arithmetic is the cost, :func:`ctc_multi.lattice.forward_and_occupancy_by_mirror`
  where each operation's dispatch or launch is (JAX picks by platform: the shares on a CPU);
* ``is_all_ones(x)``: whether ``x`` is known to hold only ones without waiting on a device or
  breaking a trace (then the explicit gradient is handed back unscaled, see
  ``losses._Problem.backward``);
* ``detach(x)``: ``x`` cut from any autodiff graph (explicit gradients need none);
* ``refuse_derivatives(logits, outputs, message)``: ``outputs`` (computed from ``detach``-ed
  logits) as they are, but tied to ``logits`` so that differentiating them raises ``message``
  where the framework would otherwise count their derivative as zero without a word (JAX's
  stop_gradient); where it raises by itself (torch: they do not require grad), ``outputs``;
* ``compiled(function, num_static)``: ``function`` compiled for its first ``num_static``
  (hashable) arguments where the framework compiles (``jax.jit``), else ``function`` itself;
* ``placed_like(x, logits)``: an argument ``x`` with a leading batch axis, placed as the logits'
  batch axis is where the framework types arrays by their sharding (JAX meshes with explicit
  axes, where ops refuse to mix a batch-sharded array with a replicated one), else ``x``.
"""

from __future__ import annotations

import os
import sys
from types import ModuleType

from array_api_compat import is_jax_namespace, is_torch_namespace


# The names above, which every adapter module defines (tests/test_scan.py checks each one).
ADAPTER_NAMES = (
    "NAME",
    "scan",
    "is_concrete",
    "FRAMES_PER_STEP",
    "NORMALISE_BEFORE_GATHER",
    "gather_in_scan",
    "INDEX_DTYPE_NAME",
    "with_explicit_gradient",
    "subtract_per_class",
    "zero_frames",
    "log_softmax_of_frames",
    "log_softmax_parts_of_frames",
    "gather_states",
    "numpy_views",
    "from_numpy",
    "xla_views",
    "from_xla",
    "scaled_sums",
    "forward_and_occupancy",
    "is_all_ones",
    "detach",
    "refuse_derivatives",
    "compiled",
    "placed_like",
)


# Whether this process was forked from one that had imported JAX: JAX's threads do not survive
# a fork, and a child's first XLA call hangs (a DataLoader worker under the "fork" start method),
# so torch's opt-in LOOP_IN_XLA_ON_CPU leaves the loop to NumPy there. Registered with ctc_multi's
# import, not the torch adapter's, which a worker may import only after the fork.
_forked_after_jax = False


def _after_fork_in_child():
    global _forked_after_jax
    _forked_after_jax = _forked_after_jax or "jax" in sys.modules


def forked_after_jax() -> bool:
    """Whether this process is a fork (or a fork's fork) of one that had imported JAX."""
    return _forked_after_jax


if hasattr(os, "register_at_fork"):  # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)


def backend_for(xp) -> ModuleType:
    """The adapter module serving array namespace ``xp`` (NumPy's serves every other namespace)."""
    if is_jax_namespace(xp):
        from . import jax as backend
    elif is_torch_namespace(xp):
        from . import torch as backend
    else:
        from . import numpy as backend
    return backend


def index_dtype(xp):
    """The integer dtype that ``xp``'s adapter wants for gather indices (torch: int64 only)."""
    return getattr(xp, backend_for(xp).INDEX_DTYPE_NAME)
