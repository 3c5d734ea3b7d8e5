"""torch on a CPU with the opt-in ``LOOP_IN_XLA_ON_CPU``: the loop runs under XLA, or not at all.

The ``xp`` fixture's ``torch_xla`` runs every backend test with the switch on (and JAX's float64
on, as for the jax backend). These tests check what that cannot: that XLA really ran (the same
numbers would come from NumPy's loop), what runs with JAX's defaults (float64 off), that the
switch off never imports JAX, a clear error without JAX, the hand-back of the gradient, and
what a review found: a forked child that hung, a negative bit that DLPack dropped, and padded
labels beyond int32 that JAX wrapped.
"""

from __future__ import annotations

import textwrap

import numpy as np
import pytest
from conftest import TOLERANCE, installed
from helpers import random_problem, run_in_fresh_python
from reference import ctc_reference

pytestmark = pytest.mark.skipif(not (installed("torch") and installed("jax")), reason="torch and jax are needed for the XLA hand-off")

# Counts the JAX adapter's scans (each runs once, when XLA traces a function) and checks the
# results against NumPy's loop, with JAX's defaults: float64 off.
DEFAULTS = textwrap.dedent(
    """
    import sys, warnings
    import numpy as np, torch, ctc_multi
    import ctc_multi.backends.torch as torch_backend
    from ctc_multi.shapes import SHAPES, random_problem

    warnings.simplefilter("error")  # no warning from JAX's DLPack (narrowing the int64 labels)
    problem = random_problem(SHAPES["small"], seed=3)

    def results(dtype):
        logits, *others = (torch.from_numpy(x) for x in problem)
        logits = logits.to(dtype).requires_grad_()
        loss = ctc_multi.ctc_loss(logits, *others)
        loss.sum().backward()
        return [loss.detach(), logits.grad, *ctc_multi.ctc_loss_with_forward_probs(logits.detach(), *others)]

    expected = {dtype: results(dtype) for dtype in (torch.float32, torch.float64)}
    assert "jax" not in sys.modules, "the switch off imported JAX"
    torch_backend.LOOP_IN_XLA_ON_CPU = True
    import ctc_multi.backends.jax as jax_backend
    scans, scan = [], jax_backend.scan
    jax_backend.scan = lambda *args, **kwargs: scans.append(1) or scan(*args, **kwargs)
    for dtype, xla in ((torch.float32, True), (torch.float64, False)):
        before = len(scans)
        got = results(dtype)
        assert (len(scans) > before) == xla, (dtype, len(scans) - before)
        for g, e in zip(got, expected[dtype]):
            assert type(g) is torch.Tensor and g.dtype == e.dtype and g.shape == e.shape
            if xla:
                np.testing.assert_allclose(g.numpy(), e.numpy(), rtol=1e-5, atol=2e-3)
            else:
                assert torch.equal(g, e)
    logits, *others = (torch.from_numpy(x) for x in problem)
    for call in range(2):  # the same shape again: compiled already, no new trace
        before = len(scans)
        results(torch.float32)
        ctc_multi.ctc_loss(logits.requires_grad_(), *others, reduction="mean").backward()
        assert call == 0 or len(scans) == before, len(scans) - before

    # A padded label beyond int32 (any value may pad): JAX's own narrowing would wrap 2**32 + 2 to
    # class 2, which the forward probabilities at padded positions read, where NumPy's loop does not.
    args = (torch.from_numpy(problem.logits[:1, :6, :3].copy()), torch.zeros(1, 6), torch.tensor([[1, 2**32 + 2]]), torch.tensor([[0.0, 1.0]]))
    torch_backend.LOOP_IN_XLA_ON_CPU = False
    off = ctc_multi.ctc_loss_with_forward_probs(*args)
    torch_backend.LOOP_IN_XLA_ON_CPU = True
    before = len(scans)
    on = ctc_multi.ctc_loss_with_forward_probs(*args)
    assert len(scans) > before
    for a, b in zip(on, off):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=2e-3)
    print("ok")
    """
)


def test_xla_runs_float32_and_leaves_float64_to_numpy_with_jaxs_defaults():
    result = run_in_fresh_python(DEFAULTS)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "ok"


FORK = textwrap.dedent(
    """
    import os, signal, time, warnings
    warnings.simplefilter("ignore")  # JAX warns at the fork itself
    import torch, ctc_multi
    import ctc_multi.backends.torch as torch_backend

    torch_backend.LOOP_IN_XLA_ON_CPU = True
    arguments = (torch.randn(2, 6, 4), torch.zeros(2, 6), torch.tensor([[1, 2], [3, 1]]), torch.zeros(2, 2))
    parent = ctc_multi.ctc_loss(*arguments)  # JAX's threads run from here
    child = os.fork()
    if child == 0:  # JAX's threads are gone here; an XLA call would wait for them forever
        views = torch_backend.xla_views(arguments)
        loss = ctc_multi.ctc_loss(*arguments)
        os._exit(0 if views is None and torch.allclose(loss, parent, rtol=1e-5) else 3)
    for _ in range(3000):  # a hang is stopped after 300 s, the child killed (a run takes a second)
        done, status = os.waitpid(child, os.WNOHANG)
        if done:
            print("child", os.waitstatus_to_exitcode(status))
            break
        time.sleep(0.1)
    else:
        os.kill(child, signal.SIGKILL)
        print("child hung")
    """
)


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="fork is POSIX's")
def test_a_process_forked_after_jax_runs_numpys_loop():
    """A DataLoader worker forked from a process that ran XLA (the "fork" start method) hung in
    its first call (a review's run). It now runs NumPy's loop. The timeout only stops a hang."""
    result = run_in_fresh_python(FORK, timeout=900)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "child 0"


def test_the_switch_without_jax_says_what_to_do():
    script = textwrap.dedent(
        """
        import sys

        class NoJax:  # as if JAX were not installed (sys.modules["jax"] = None trips array-api-compat)
            def find_spec(self, name, path=None, target=None):
                if name.split(".")[0] in ("jax", "jaxlib"):
                    raise ModuleNotFoundError(f"No module named {name!r}")

        sys.meta_path.insert(0, NoJax())
        import numpy as np, torch, ctc_multi
        import ctc_multi.backends.torch as torch_backend
        torch_backend.LOOP_IN_XLA_ON_CPU = True
        try:
            ctc_multi.ctc_loss(torch.zeros(1, 3, 2), torch.zeros(1, 3), torch.tensor([[1]]), torch.zeros(1, 1))
        except ImportError as error:
            print(error)
        """
    )
    result = run_in_fresh_python(script)
    assert result.returncode == 0, result.stderr
    assert "LOOP_IN_XLA_ON_CPU = True" in result.stdout and "pip install jax" in result.stdout


@pytest.fixture
def xla_on(monkeypatch):
    import ctc_multi.backends.torch as torch_backend

    monkeypatch.setattr(torch_backend, "LOOP_IN_XLA_ON_CPU", True)


def test_changed_hand_back_raises_and_results_are_the_callers(xla_on):
    """The saved gradient that ``loss.sum()``'s first backward hands back comes from XLA's memory
    through DLPack: changed in place, a second backward raises, as with NumPy's loop. Results
    are the caller's own: changing one changes neither the inputs nor a later call's results."""
    import torch

    import ctc_multi

    problem = random_problem(np.random.default_rng(5), 3, 7, 4, 3)
    _, expected = ctc_reference(*problem)
    held = problem.logits.astype(np.float32)
    logits = torch.from_numpy(held.copy()).requires_grad_()
    others = [torch.as_tensor(array) for array in problem[1:]]
    loss = ctc_multi.ctc_loss(logits, *others).sum()
    (first,) = torch.autograd.grad(loss, logits, retain_graph=True)
    np.testing.assert_allclose(first.numpy(), expected, **TOLERANCE["gradient_float32"])
    first.mul_(3.0)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        torch.autograd.grad(loss, logits)

    loss, gradient = ctc_multi.ctc_loss_and_grad(logits.detach(), *others)
    loss.add_(1.0), gradient.add_(1.0)
    again, gradient_again = ctc_multi.ctc_loss_and_grad(logits.detach(), *others)
    np.testing.assert_allclose(gradient_again.numpy(), expected, **TOLERANCE["gradient_float32"])
    np.testing.assert_allclose(again.numpy() + 1.0, loss.numpy(), rtol=1e-6)
    assert np.array_equal(logits.detach().numpy(), held)


def test_a_negative_bit_is_not_dropped(xla_on):
    """DLPack carries a tensor's memory without its negative bit: a view of -(-x) gave the loss
    of -x (a review's run). Such tensors run NumPy's loop, or torch's, which honour it."""
    import torch

    import ctc_multi

    if not hasattr(torch, "_neg_view"):
        pytest.skip("this torch makes no negative-bit views")
    problem = random_problem(np.random.default_rng(7), 2, 6, 4, 2)
    expected, _ = ctc_reference(*problem)
    logits = torch._neg_view(-torch.from_numpy(problem.logits.astype(np.float32)))
    assert logits.is_neg()
    others = [torch.as_tensor(array) for array in problem[1:]]
    np.testing.assert_allclose(ctc_multi.ctc_loss(logits, *others).numpy(), expected, **TOLERANCE["float32"])


def test_inputs_dlpack_cannot_carry_in_place_fall_back(xla_on):
    """Views at an offset, transposed logits and narrow labels all reach XLA (or
    NumPy's loop where DLPack refuses); the numbers are the reference's either way."""
    import torch

    import ctc_multi

    problem = random_problem(np.random.default_rng(6), 3, 6, 5, 2)
    expected, _ = ctc_reference(*problem)
    wide = torch.from_numpy(np.concatenate([problem.logits, problem.logits], axis=0).astype(np.float32))
    transposed = torch.from_numpy(np.ascontiguousarray(np.swapaxes(problem.logits, 0, 1)).astype(np.float32)).transpose(0, 1)
    for logits in (wide[3:], transposed):
        others = (torch.as_tensor(problem.logit_paddings), torch.as_tensor(problem.labels).to(torch.int16), torch.as_tensor(problem.label_paddings))
        np.testing.assert_allclose(ctc_multi.ctc_loss(logits, *others).numpy(), expected, **TOLERANCE["float32"])
