"""GPU-specific: ctc_loss, its autodiff gradient and ctc_loss_and_grad on a CUDA device.

The ``xp`` fixture builds its arrays on the default device, which for torch is always the CPU;
these tests put torch tensors on CUDA and JAX arrays on the first GPU explicitly. They check
that the results stay on that device (array type in equals array type out, device included)
and match the float64 reference of ``reference.py`` at the float32 tolerance. Skipped where no
GPU is visible, so they are collected, and skipped, on every CPU machine.
"""

from __future__ import annotations

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from reference import ctc_reference

import ctc_multi
from ctc_multi.shapes import SHAPES, random_problem


def _torch_on_gpu(problem):
    """(loss, autodiff grad, ctc_loss_and_grad's loss and grad, devices of all four)."""
    if not installed("torch"):
        pytest.skip("torch is not installed in this environment")
    import torch

    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    logits, *others = (torch.as_tensor(a, device="cuda") for a in problem)
    leaf = logits.clone().requires_grad_(True)
    loss = ctc_multi.ctc_loss(leaf, *others)
    loss.sum().backward()
    both = ctc_multi.ctc_loss_and_grad(logits, *others)
    results = (loss, leaf.grad, *both)
    return [r.detach().cpu().numpy() for r in results], {str(r.device.type) for r in results}


def _jax_on_gpu(problem):
    if not installed("jax"):
        pytest.skip("jax is not installed in this environment")
    import jax
    import jax.numpy as jnp

    try:
        gpu = jax.devices("gpu")[0]
    except RuntimeError:
        pytest.skip("jax sees no GPU")
    arrays = [jax.device_put(a, gpu) for a in problem]
    loss = jax.jit(ctc_multi.ctc_loss)(*arrays)
    grad = jax.jit(jax.grad(lambda logits, *others: jnp.sum(ctc_multi.ctc_loss(logits, *others))))(*arrays)
    both = ctc_multi.ctc_loss_and_grad(*arrays)
    results = (loss, grad, *both)
    return [np.asarray(r) for r in results], {d.platform for r in results for d in r.devices()}


@pytest.mark.parametrize("run_on_gpu", [_torch_on_gpu, _jax_on_gpu], ids=["torch", "jax"])
def test_loss_and_gradients_on_the_gpu(run_on_gpu):
    problem = random_problem(SHAPES["small"], seed=5, dtype="float32")
    (loss, grad, loss_too, grad_too), devices = run_on_gpu(problem)
    assert devices <= {"cuda", "gpu"}, f"results left the GPU: {devices}"
    expected_loss, expected_grad = ctc_reference(*problem)
    for actual in (loss, loss_too):
        np.testing.assert_allclose(actual, expected_loss, **TOLERANCE["float32"])
    for actual in (grad, grad_too):
        np.testing.assert_allclose(actual, expected_grad, **TOLERANCE["gradient_float32"])
