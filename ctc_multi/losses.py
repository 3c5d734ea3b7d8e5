"""Public CTC loss functions: validate -> pick the namespace's scan -> run the recursion.

The math is in :mod:`ctc_multi.lattice`; the framework-specific scans and gradient wiring are
in :mod:`ctc_multi.backends`. Nothing here depends on which framework the arrays come from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from functools import lru_cache, partial
from types import ModuleType
from typing import Any, Callable

from .backends import index_dtype
from .inputs import CTCInputs, check_inputs
from .lattice import (
    SCALED_MIN_LOG_EPSILON,
    build_lattice,
    forward_probs_from_history,
    logits_gradient,
    loss_from_final_state,
    run_recursion,
    sum_semiring,
)
from .scan import tree_map

Array = Any

DEFAULT_LOG_EPSILON = -1e5
REDUCTIONS = ("none", "sum", "mean")


@dataclass(frozen=True)
class _Problem:
    """The static part of one validated call, and the plain functions built on it.

    Hashable (no arrays inside), so JAX can compile per setting; every function takes the arrays
    ``(logits, logit_padded, labels, label_padded)`` explicitly, so ``jax.custom_vjp`` and
    ``torch.autograd.Function`` can wrap them.
    """

    xp: ModuleType
    backend: ModuleType
    blank_id: int
    log_epsilon: float
    zero_infinity: bool = False

    @classmethod
    def of(cls, inputs: CTCInputs, zero_infinity: bool = False) -> "_Problem":
        return cls(inputs.xp, inputs.backend, inputs.blank_id, inputs.log_epsilon, _as_flag("zero_infinity", zero_infinity))

    @property
    def index_dtype(self):
        return index_dtype(self.xp)

    def on_numpy(self) -> "_Problem":
        """The same problem, run by NumPy's adapter (see :meth:`where_the_loop_runs_fastest`)."""
        import array_api_compat.numpy

        from .backends import numpy as numpy_backend

        return replace(self, xp=array_api_compat.numpy, backend=numpy_backend)

    def on_jax(self) -> "_Problem":
        """The same problem, run by JAX's adapter (see :meth:`where_the_loop_runs_fastest`)."""
        import jax.numpy

        from .backends import jax as jax_backend

        return replace(self, xp=jax.numpy, backend=jax_backend)

    def where_the_loop_runs_fastest(self, function: Callable, *arrays):
        """``function(self, *arrays)``; or, where the backend hands its loop to XLA (torch on a
        CPU with the opt-in ``LOOP_IN_XLA_ON_CPU``: its ``xla_views``) or to NumPy (torch on a CPU
        where autograd records nothing: its ``numpy_views``), ``function`` of the JAX problem
        (under ``jax.jit``, once per shape) or of the NumPy problem on views of the arrays, its
        results handed back as the backend's arrays."""
        views = self.backend.xla_views(arrays)
        if views is not None:
            on_jax = self.on_jax()
            results = on_jax.backend.compiled(function, num_static=1)(on_jax, *views)
            return tree_map(self.backend.from_xla, results)
        views = self.backend.numpy_views(arrays)
        if views is None:
            return function(self, *arrays)
        import numpy as np

        # The caller's arrays are not NumPy's: no NumPy warning (a NaN logit's "invalid value")
        # nor a NumPy error state of theirs applies; the framework's own ops report none. (This
        # covers the underflow that NumPy's own ``compiled`` ignores for NumPy arrays.)
        with np.errstate(all="ignore"):
            results = function(self.on_numpy(), *views)
        return tree_map(self.backend.from_numpy, results)

    def lattice(self, logits, logit_padded, labels, label_padded, *, differentiable=True):
        """The lattice; ``differentiable=False`` where no autodiff runs through it (a faster
        masking of padded frames under XLA, see :func:`~ctc_multi.lattice.build_lattice`)."""
        return build_lattice(
            self.xp,
            logits,
            logit_padded,
            labels,
            label_padded,
            blank_id=self.blank_id,
            log_epsilon=self.log_epsilon,
            index_dtype=self.index_dtype,
            gather_states=self.backend.gather_states,
            normalise_before_gather=self.backend.NORMALISE_BEFORE_GATHER,
            log_softmax_of_frames=self.backend.log_softmax_of_frames,
            log_softmax_parts_of_frames=self.backend.log_softmax_parts_of_frames,
            differentiable=differentiable,
            gather_in_scan=self.backend.gather_in_scan(logits.shape[0] * logits.shape[1] * (2 * labels.shape[1] + 1)),
        )

    def scaled(self, lattice) -> bool:
        """Whether the sums over paths run in scaled probabilities: where the backend's
        ``scaled_sums`` says so, and ``log_epsilon`` is at least ``SCALED_MIN_LOG_EPSILON``."""
        return self.backend.scaled_sums(lattice.logits.dtype) and self.log_epsilon >= SCALED_MIN_LOG_EPSILON

    def sum_semiring(self, lattice):
        """The loss's semiring: log space, or scaled probabilities (:meth:`scaled`)."""
        return sum_semiring(self.scaled(lattice))

    def recursion(self, lattice, **options):
        """:func:`~ctc_multi.lattice.run_recursion` with this backend's scan and frames per step."""
        return run_recursion(self.xp, self.backend.scan, lattice, frames_per_step=self.backend.FRAMES_PER_STEP, **options)

    def occupancy(self, lattice):
        """(final carry, (T, B, N + 1) occupancy by column) by this backend's ``forward_and_occupancy``, scan and frames per step."""
        return self.backend.forward_and_occupancy(self.xp, self.backend.scan, lattice, frames_per_step=self.backend.FRAMES_PER_STEP, scaled=self.scaled(lattice))

    def _loss(self, lattice, final):
        xp = self.xp
        loss = loss_from_final_state(xp, lattice, final, self.index_dtype)
        if self.zero_infinity:
            loss = xp.where(lattice.feasible, loss, xp.zeros_like(loss))
        return loss

    def forward(self, *arrays):
        """(B,) loss; autodiff never runs through it (``with_explicit_gradient``)."""
        lattice = self.lattice(*arrays, differentiable=False)
        final, _ = self.recursion(lattice, semiring=self.sum_semiring(lattice))
        return self._loss(lattice, final)

    def forward_with_residuals(self, *arrays, scale=None):
        """(B,) loss and, as the one residual the backward pass needs, the (B, T, K) gradient of
        each sequence's loss, from the occupancies of the backend's ``forward_and_occupancy``:
        NumPy, and JAX on a CPU, record each state's shares in the forward scan that gives the
        loss and turn them into occupancies with one reverse scan of multiplies and adds; torch's
        own ops (CUDA; on a CPU torch runs NumPy's loop), and JAX elsewhere, scan the lattice and
        its mirror image at once (``forward_and_occupancy_by_shares`` and
        ``forward_and_occupancy_by_mirror`` in :mod:`ctc_multi.lattice`). ``scale`` (B,), if
        given, multiplies each sequence's gradient as it is made."""
        xp = self.xp
        lattice = self.lattice(*arrays, differentiable=False)
        final, occupancy = self.occupancy(lattice)
        backend = self.backend
        infeasible = ~lattice.feasible if self.zero_infinity else None
        gradient = logits_gradient(xp, lattice, occupancy, backend.subtract_per_class, backend.zero_frames, infeasible, scale)
        return self._loss(lattice, final), (gradient,)

    def reduced_forward(self, *arrays, reduction: str):
        """The "sum" or "mean" of the losses, a () array."""
        return self._reduced(self.forward(*arrays), self._weights(arrays, reduction))

    def reduced_forward_with_residuals(self, *arrays, reduction: str):
        """:meth:`reduced_forward` and the gradient of that reduced loss: a mean's weights are
        taken into the gradient as it is made (:func:`~ctc_multi.lattice.logits_gradient`), so that the backward
        pass of a reduced loss (its cotangent a () one, 1 for ``.backward()``) needs no pass of
        its own over (B, T, K) and no fresh array."""
        weights = self._weights(arrays, reduction)
        scale = None if weights is None else weights / weights.shape[0]
        loss, residuals = self.forward_with_residuals(*arrays, scale=scale)
        return self._reduced(loss, weights), residuals

    def _weights(self, arrays, reduction: str):
        """A mean's (B,) weights (:func:`_mean_weights`) of the call's arrays; None for a sum."""
        return _mean_weights(self.xp, arrays[0], arrays[3]) if reduction == "mean" else None

    def _reduced(self, loss, weights):
        xp = self.xp
        if weights is None:  # "sum"
            return xp.reshape(xp.sum(loss, keepdims=True), ())  # keepdims: NumPy would give a scalar
        if weights.shape[0] == 0:  # a mean of no losses is NaN, as xp.mean gives it (not 0 / 0: NumPy warns)
            return xp.reshape(xp.sum(loss, keepdims=True) * math.nan, ())
        return xp.reshape(xp.sum(loss * xp.astype(weights, loss.dtype), keepdims=True) / weights.shape[0], ())

    def backward(self, residuals, loss_cotangent):
        """(B, T, K) cotangent of the logits (eq. 16 of Graves et al., from ``forward_with_residuals``,
        or from ``reduced_forward_with_residuals`` with a () cotangent)."""
        (gradient,) = residuals
        if self.backend.is_all_ones(loss_cotangent):  # d sum(loss): no pass over (B, T, K) to scale by one
            return gradient
        return gradient * self.xp.reshape(self.xp.astype(loss_cotangent, gradient.dtype), (-1, 1, 1))


def _arrays(inputs: CTCInputs):
    return inputs.logits, inputs.logit_padded, inputs.labels, inputs.label_padded


def _loss(problem: _Problem, reduction: str, *arrays):
    """The loss, reduced inside the function whose gradient is explicit (:meth:`_Problem.reduced_forward`),
    so that a reduced loss's gradient comes already weighted."""
    forward, forward_with_residuals = _forward_functions(reduction)
    differentiable = problem.backend.with_explicit_gradient(
        partial(problem.where_the_loop_runs_fastest, forward),
        partial(problem.where_the_loop_runs_fastest, forward_with_residuals),
        problem.backward,
    )
    return differentiable(*arrays)


@lru_cache(maxsize=None)
def _forward_functions(reduction: str):
    """The loss and the loss with its gradient, reduced as asked; the same function objects on
    every call, as the XLA hand-off compiles once per function (:meth:`_Problem.where_the_loop_runs_fastest`)."""
    if reduction == "none":
        return _Problem.forward, _Problem.forward_with_residuals
    return partial(_Problem.reduced_forward, reduction=reduction), partial(_Problem.reduced_forward_with_residuals, reduction=reduction)


LOSS_AND_GRAD_NOT_DIFFERENTIABLE = (
    "ctc_multi.ctc_loss_and_grad's loss and gradient cannot be differentiated: differentiate "
    "ctc_multi.ctc_loss instead (jax.grad, jax.value_and_grad; its second derivatives too)"
)


def _loss_and_grad(problem: _Problem, logits, *others):
    arrays = (problem.backend.detach(logits),) + others
    loss, (gradient,) = problem.where_the_loop_runs_fastest(_Problem.forward_with_residuals, *arrays)
    return problem.backend.refuse_derivatives(logits, (loss, gradient), LOSS_AND_GRAD_NOT_DIFFERENTIABLE)


def _loss_with_forward_probs(problem: _Problem, *arrays):
    return problem.where_the_loop_runs_fastest(_loss_and_forward_probs_here, *arrays)


def _loss_and_forward_probs_here(problem: _Problem, *arrays):
    lattice = problem.lattice(*arrays)
    final, (history, _) = problem.recursion(lattice, keep_history=True)
    return (problem._loss(lattice, final),) + forward_probs_from_history(problem.xp, history)


def _as_flag(name: str, value) -> bool:
    """A Python bool, or a 0-d bool array with a value (NumPy's, JAX's, torch's); anything else
    (a string "False", a number) is refused, not read as truthy, and a traced one (under
    jax.jit) is refused as such: the flag decides the program, so it must be static."""
    import numpy as np

    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if getattr(value, "shape", None) == () and "bool" in str(getattr(value, "dtype", "")):
        try:
            return bool(value)
        except Exception as error:  # a tracer: no value yet
            raise ValueError(f"{name} must be a static True or False (under jax.jit: a static argument); got {value!r}") from error
    raise ValueError(f"{name} must be True or False; got {value!r}")


def _check_reduction(reduction) -> str:
    if reduction not in REDUCTIONS:
        raise ValueError(f"reduction must be one of {REDUCTIONS}; got {reduction!r}")
    return reduction


def _mean_weights(xp, logits, label_padded):
    """(B,) weight of each sequence's loss in torch's "mean": one over its label length, at least
    1 (the weighted losses are then averaged over the batch)."""
    # in the loss's dtype (check_inputs casts half precisions); no column read, so N = 0 works too
    lengths = label_padded.shape[1] - xp.sum(xp.astype(label_padded, logits.dtype), axis=1)
    ones = xp.ones_like(lengths)
    return ones / xp.maximum(lengths, ones)


def ctc_loss_with_forward_probs(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    *,
    blank_id: int = 0,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
) -> tuple[Array, Array, Array]:
    """CTC loss and CTC forward probabilities (Graves et al., 2006), like optax's function of this name.

    Args:
      logits: (B, T, K)-array of unnormalised class scores; the log-softmax is applied inside.
        Its namespace (NumPy, JAX, torch, or any array-API namespace) and device decide where
        the computation runs and what comes back.
      logit_paddings: (B, T)-array, 1 (or True) where a frame is padding. Padded frames may sit
        anywhere; the recursion skips them, carrying its state over. Values stored in padded
        frames (NaN, inf) never reach the results.
      labels: (B, N)-array of integer class ids in [0, K), right-padded.
      label_paddings: (B, N)-array, 1 (or True) where a label is padding; each row is zeros
        followed by ones.
      blank_id: class id of the blank, in [0, K).
      log_epsilon: finite stand-in for log(0).

    Returns:
      ``(loss, logalpha_blank, logalpha_nonblank)``: ``loss`` (B,) the negative
      log-likelihood of each label sequence; ``logalpha_blank`` (T, B, N + 1), log
      probability at frame t of being in the blank after n labels (on the last frame, optax's
      convention: of having emitted exactly n labels); ``logalpha_nonblank`` (T, B, N), log
      probability of emitting label n at frame t. float32 for float32/float16/bfloat16 logits,
      float64 for float64 logits.

    Raises:
      ValueError: naming the argument, on a bad shape, rank, dtype, ``blank_id`` or
        ``log_epsilon``; and, when the values are concrete (not under ``jax.jit``), on labels
        outside [0, K), paddings other than 0/1, or label paddings that are not right-padded.

    Example:
      >>> import numpy as np, ctc_multi
      >>> logits = np.zeros((1, 3, 2), dtype=np.float32)
      >>> loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(
      ...     logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
      >>> round(float(loss[0]), 4), blank.shape, nonblank.shape   # 6 of 8 paths read "1"
      (0.2877, (3, 1, 2), (3, 1, 1))
    """
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon)
    run = inputs.backend.compiled(_loss_with_forward_probs, num_static=1)
    return run(_Problem.of(inputs), *_arrays(inputs))


def ctc_loss(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    *,
    blank_id: int = 0,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
    reduction: str = "none",
    zero_infinity: bool = False,
) -> Array:
    """CTC loss; the arguments are those of :func:`ctc_loss_with_forward_probs`, plus:

    Args:
      reduction: "none" (default, optax's behaviour): the (B,) losses; "sum": their sum;
        "mean": torch's convention, each loss divided by its label length (at least 1), then
        averaged over the batch.
      zero_infinity: torch's option: when True, sequences that cannot be aligned (too few
        valid frames for their labels and the blanks between repeated labels) get loss 0
        and gradient 0 instead of a loss near ``-log_epsilon``. Not a sequence that ``-inf``
        logits block (every path through a class of probability 0): its emissions count as
        -1e5, so its loss is finite, about 1e5 per blocked frame; :func:`forced_align` finds
        such sequences (token -1 on every frame).

    Gradients: under ``jax.grad``/``jax.vjp`` and torch autograd, the gradient comes from the
    explicit backward (beta) recursion, not from differentiating through the scan.

    Example:
      >>> import numpy as np, ctc_multi
      >>> logits = np.zeros((1, 3, 2), dtype=np.float32)
      >>> loss = ctc_multi.ctc_loss(logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
      >>> round(float(loss[0]), 4)
      0.2877
    """
    _check_reduction(reduction)
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon)
    run = inputs.backend.compiled(_loss, num_static=2)
    return run(_Problem.of(inputs, zero_infinity), reduction, *_arrays(inputs))


def ctc_loss_and_grad(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    *,
    blank_id: int = 0,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
    zero_infinity: bool = False,
) -> tuple[Array, Array]:
    """(B,) CTC loss and its (B, T, K) gradient d sum(loss) / d logits, on every backend.

    The gradient comes from the explicit alpha-beta recursion, so NumPy and any other
    array-API namespace without autodiff get it too. Padded frames get exactly zero; each
    valid frame's gradient sums to zero over the classes. Arguments as in :func:`ctc_loss`.
    Neither result can be differentiated (JAX raises a ``TypeError``, torch's results do not
    require grad): differentiate :func:`ctc_loss` for that.

    Example:
      >>> import numpy as np, ctc_multi
      >>> logits = np.zeros((1, 3, 2))
      >>> loss, grad = ctc_multi.ctc_loss_and_grad(logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
      >>> grad.shape, bool(abs(grad.sum()) < 1e-12)
      ((1, 3, 2), True)
    """
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon)
    run = inputs.backend.compiled(_loss_and_grad, num_static=1)
    return run(_Problem.of(inputs, zero_infinity), *_arrays(inputs))
