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


def _torch():
    """The torch module, or a skip where torch is not installed."""
    if not installed("torch"):
        pytest.skip("torch is not installed in this environment")
    import torch

    return torch


def _torch_with_cuda():
    """The torch module, or a skip where torch or a CUDA device is missing."""
    torch = _torch()
    if not torch.cuda.is_available():
        pytest.skip("torch sees no CUDA device")
    return torch


def _torch_on_gpu(problem):
    """(loss, autodiff grad, ctc_loss_and_grad's loss and grad, devices of all four)."""
    torch = _torch_with_cuda()
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


def test_torch_loss_and_grad_replay_from_a_cuda_graph():
    """``ctc_loss_and_grad`` captured once in a CUDA graph, then replayed on another problem of
    the same shapes (logits, labels and both paddings) copied into the captured inputs, gives
    what eager calls give: the torch loop reads no value from the GPU while a stream captures
    (the input checks are skipped then, as under torch.compile), so a training step can replay
    it without the loop's per-frame launches from Python."""
    torch = _torch_with_cuda()
    first, second = (random_problem(SHAPES["small"], seed=seed, dtype="float32") for seed in (5, 6))
    assert not np.array_equal(first.labels, second.labels) and not np.array_equal(first.label_paddings, second.label_paddings)
    static = [torch.as_tensor(a, device="cuda") for a in first]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the default stream, as torch.cuda.graph asks
        ctc_multi.ctc_loss_and_grad(*static)
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = ctc_multi.ctc_loss_and_grad(*static)

    replayed = []
    for problem in (first, second):
        for captured_input, new in zip(static, problem):
            captured_input.copy_(torch.as_tensor(new, device="cuda"))
        graph.replay()
        torch.cuda.synchronize()
        eager = ctc_multi.ctc_loss_and_grad(*static)
        for from_graph, from_eager in zip(captured, eager):
            np.testing.assert_allclose(from_graph.cpu().numpy(), from_eager.cpu().numpy(), **TOLERANCE["float32"])
        replayed.append([output.cpu().numpy().copy() for output in captured])
    for first_output, second_output in zip(*replayed):
        assert not np.allclose(first_output, second_output), "the replay did not read the new inputs"


def test_torch_reads_no_values_of_cuda_tensors_while_a_stream_captures(monkeypatch):
    """The adapter's side of the test above, which runs here too: ``is_concrete`` is False for a
    CUDA tensor while a capture is under way (checked through a stand-in, since CPU builds of
    torch have no capture), and stays True for CPU tensors and outside a capture."""
    import types

    torch = _torch()
    import ctc_multi.backends.torch as adapter

    on_cuda, on_cpu = types.SimpleNamespace(is_cuda=True), torch.zeros(2)
    for capturing in (True, False):
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda capturing=capturing: capturing)
        assert adapter.is_concrete(on_cuda) is not capturing
        assert adapter.is_concrete(on_cpu) is True
