"""``torch.nn.functional.ctc_loss`` as a second independent anchor: values and gradients in float64.

Nothing here calls ctc_multi. Tests that use it skip when torch is not installed.
"""

from __future__ import annotations

import numpy as np
import pytest
from helpers import Problem


def require_torch():
    """The torch module, or a skip: torch is the reference these tests compare with."""
    return pytest.importorskip("torch", reason="torch.nn.functional.ctc_loss is the reference here")


def lengths_of(problem: Problem) -> tuple[np.ndarray, np.ndarray]:
    """(input_lengths, target_lengths) of a right-padded problem, the form torch takes."""
    frames = problem.logit_paddings.shape[1]
    input_lengths = frames - problem.logit_paddings.sum(axis=1).astype(np.int64)
    target_lengths = problem.labels.shape[1] - problem.label_paddings.sum(axis=1).astype(np.int64)
    valid = np.arange(frames)[None, :] < input_lengths[:, None]
    assert np.array_equal(valid, problem.logit_paddings == 0), "torch needs right-padded frames"
    return input_lengths, target_lengths


def torch_ctc(problem: Problem, *, blank_id: int = 0, reduction: str = "none", zero_infinity: bool = False):
    """torch's loss and its gradient d sum(loss) / d logits, through torch's log_softmax.

    Returns (loss, gradient) as float64 NumPy arrays; loss is (B,) or a 0-d array.
    """
    torch = require_torch()
    input_lengths, target_lengths = lengths_of(problem)
    num_classes = problem.logits.shape[2]
    # Padded label positions may hold anything for ctc_multi; give torch valid class ids there.
    targets = np.where(problem.label_paddings == 0, problem.labels, blank_id) % num_classes
    logits = torch.tensor(problem.logits, dtype=torch.float64, requires_grad=True)
    log_probs = torch.log_softmax(logits, dim=2).transpose(0, 1)
    loss = torch.nn.functional.ctc_loss(
        log_probs,
        torch.as_tensor(targets),
        torch.as_tensor(input_lengths),
        torch.as_tensor(target_lengths),
        blank=blank_id,
        reduction=reduction,
        zero_infinity=zero_infinity,
    )
    loss.sum().backward()
    return loss.detach().numpy(), logits.grad.numpy()
