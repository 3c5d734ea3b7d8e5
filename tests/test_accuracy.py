"""float32 accuracy on realistic lengths, on every backend: a loose guard of benchmarks/accuracy.py.

The benchmark measures the issue's shapes (B=8, T=500 and T=400 with K=1024) against a float64
reference; these tests guard a looser bound (``TOLERANCE["accuracy_float32"]``) on smaller
problems, so that a change that loses float32 accuracy (say, a running log value without
compensation, or occupancies divided by the loss) fails here. Expected values come from the
float64 reference in ``reference.py``, computed once per problem.
"""

from __future__ import annotations

import functools

import numpy as np
import pytest
from conftest import TOLERANCE
from helpers import Problem, compiled
from reference import ctc_reference

import ctc_multi

PROBLEMS = {
    # name: (B, T, K, N, logit scale)
    "realistic": (2, 300, 32, 60, 1.0),
    # An almost certain model: softmax peaks near 1 and log-probabilities down to about -200.
    "peaky": (2, 2000, 32, 20, 30.0),
}


@functools.cache
def problem_and_reference(name: str):
    """float32 logits with every frame and label valid, and the float64 reference on those values."""
    B, T, K, N, scale = PROBLEMS[name]
    rng = np.random.default_rng(sorted(PROBLEMS).index(name))
    logits = (scale * rng.standard_normal((B, T, K))).astype(np.float32)
    problem = Problem(logits, np.zeros((B, T)), rng.integers(1, K, size=(B, N)), np.zeros((B, N)))
    return problem, ctc_reference(*problem)


@pytest.mark.parametrize("name", list(PROBLEMS))
def test_float32_accuracy_against_float64_reference(xp, name):
    problem, (expected_loss, expected_grad) = problem_and_reference(name)
    arrays = (xp.asarray(problem.logits, dtype=xp.dtype("float32")),) + tuple(xp.asarray(a) for a in problem[1:])
    loss, grad = compiled(xp, ctc_multi.ctc_loss_and_grad)(*arrays)
    xp.check_type(loss, grad)
    assert loss.dtype == xp.dtype("float32") and grad.dtype == xp.dtype("float32")
    loss, grad = xp.to_numpy(loss).astype(np.float64), xp.to_numpy(grad).astype(np.float64)
    assert np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)), "float32 loss or gradient not finite"
    bound = TOLERANCE["accuracy_float32"]
    loss_error = np.max(np.abs(loss - expected_loss) / np.abs(expected_loss))
    grad_error = np.max(np.abs(grad - expected_grad))
    assert loss_error <= bound["loss_rtol"], f"relative loss error {loss_error:.1e}"
    assert grad_error <= bound["gradient_atol"], f"gradient max-abs error {grad_error:.1e}"
