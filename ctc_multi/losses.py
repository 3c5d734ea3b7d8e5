"""Public CTC loss functions: validate -> pick the namespace's scan -> run the recursion.

The math is in :mod:`ctc_multi.lattice`; the framework-specific scans are in
:mod:`ctc_multi.backends`. Nothing here depends on which framework the arrays come from.
"""

from __future__ import annotations

from typing import Any

from .inputs import CTCInputs, check_inputs
from .lattice import build_lattice, forward_probs_from_history, loss_from_final_state, run_recursion

Array = Any

DEFAULT_LOG_EPSILON = -1e5


def _lattice(inputs: CTCInputs):
    return build_lattice(
        inputs.xp,
        inputs.logits,
        inputs.logit_padded,
        inputs.labels,
        inputs.label_padded,
        blank_id=inputs.blank_id,
        log_epsilon=inputs.log_epsilon,
        index_dtype=inputs.index_dtype,
    )


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
    xp = inputs.xp
    lattice = _lattice(inputs)
    final, (history, _) = run_recursion(xp, inputs.backend.scan, lattice, keep_history=True)
    loss = loss_from_final_state(xp, lattice, final, inputs.index_dtype)
    logalpha_blank, logalpha_nonblank = forward_probs_from_history(xp, history)
    return loss, logalpha_blank, logalpha_nonblank


def ctc_loss(
    logits: Array,
    logit_paddings: Array,
    labels: Array,
    label_paddings: Array,
    *,
    blank_id: int = 0,
    log_epsilon: float = DEFAULT_LOG_EPSILON,
) -> Array:
    """(B,) CTC loss per sequence; the arguments are those of :func:`ctc_loss_with_forward_probs`.

    Example:
      >>> import numpy as np, ctc_multi
      >>> logits = np.zeros((1, 3, 2), dtype=np.float32)
      >>> loss = ctc_multi.ctc_loss(logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
      >>> round(float(loss[0]), 4)
      0.2877
    """
    inputs = check_inputs(logits, logit_paddings, labels, label_paddings, blank_id=blank_id, log_epsilon=log_epsilon)
    lattice = _lattice(inputs)
    final, _ = run_recursion(inputs.xp, inputs.backend.scan, lattice, keep_history=False)
    return loss_from_final_state(inputs.xp, lattice, final, inputs.index_dtype)
