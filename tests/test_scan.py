"""The adapters' protocol, the Python-loop scan and the NumPy adapter's cache-blocked log-softmax
and gather.

Backend-specific by design: these are the pieces the NumPy and torch adapters build their
scans and lattices from (the ``xp`` fixture tests the losses built on them).
"""

from __future__ import annotations

import importlib
import re

import array_api_compat.numpy
import numpy as np
import pytest
from conftest import installed

import ctc_multi.backends
from ctc_multi.backends import ADAPTER_NAMES
from ctc_multi.backends import numpy as numpy_backend
from ctc_multi.lattice import carry_over_padded, gather_states_by_take, log_softmax
from ctc_multi.scan import python_loop_scan


def test_the_adapter_protocol_lists_what_its_docstring_lists():
    documented = re.findall(r"^\* ``(\w+)", ctc_multi.backends.__doc__, flags=re.MULTILINE)
    also = re.findall(r"and ``(\w+)\(", ctc_multi.backends.__doc__)
    assert sorted(documented + also) == sorted(ADAPTER_NAMES)


@pytest.mark.parametrize("framework", ["numpy", "jax", "torch"])
def test_every_adapter_defines_the_whole_protocol(framework):
    if not installed(framework):
        pytest.skip(f"{framework} is not installed")
    adapter = importlib.import_module(f"ctc_multi.backends.{framework}")
    missing = [name for name in ADAPTER_NAMES if not hasattr(adapter, name)]
    assert not missing, f"ctc_multi.backends.{framework} lacks {missing}"
    assert adapter.NAME == framework


def _running_sums(carry, x):
    """A step with a nested output holding a None leaf, as the lattice steps have."""
    carry = carry + x
    return carry, (None, (carry, 2 * x))


def _expected(xs: np.ndarray, reverse: bool):
    order = range(len(xs) - 1, -1, -1) if reverse else range(len(xs))
    carry, sums = np.zeros(xs.shape[1:]), np.zeros_like(xs)
    for index in order:
        carry = carry + xs[index]
        sums[index] = carry  # outputs come back in the order of xs, whatever the direction
    return carry, sums


@pytest.mark.parametrize("reverse", [False, True])
@pytest.mark.parametrize("with_buffer", [False, True])
def test_python_loop_scan_gives_the_outputs_of_a_plain_loop(reverse, with_buffer):
    xs = np.random.default_rng(0).normal(size=(7, 3, 2))
    buffer = numpy_backend._output_buffer if with_buffer else None
    carry, (nothing, (sums, doubled)) = python_loop_scan(
        _running_sums, np.zeros((3, 2)), xs, reverse=reverse, stack=np.stack, output_buffer=buffer
    )
    expected_carry, expected_sums = _expected(xs, reverse)
    assert nothing is None
    np.testing.assert_array_equal(carry, expected_carry)
    np.testing.assert_array_equal(sums, expected_sums)
    np.testing.assert_array_equal(doubled, 2 * xs)


@pytest.mark.parametrize("reverse", [False, True])
def test_python_loop_scan_hands_each_step_the_same_slices_whatever_the_structure_of_xs(reverse):
    """A flat tuple (sliced without the tree map), a nested one and one with a None leaf."""
    rng = np.random.default_rng(2)
    a, b, c = (rng.normal(size=(5, 2)) for _ in range(3))

    def seen_by_step(xs):
        return python_loop_scan(lambda carry, x: (carry, x), 0, xs, reverse=reverse, stack=np.stack)[1]

    flat, nested, with_none = seen_by_step((a, b, c)), seen_by_step((a, (b, c))), seen_by_step((a, None, b))
    for got, want in zip(flat + nested[:1] + nested[1] + with_none[::2], (a, b, c, a, b, c, a, b)):
        np.testing.assert_array_equal(got, want)
    assert with_none[1] is None


@pytest.mark.parametrize("num_classes", [3, 1000])
def test_numpy_log_softmax_in_blocks_matches_the_whole_array_and_ignores_padded_frames(num_classes, monkeypatch):
    """Blocks of frames (7 here, the last one short; some with padded frames, most without)
    give what one pass over the whole array gives, bit for bit, an unpadded frame of -inf
    logits included; padded frames holding NaN and inf come out uniform, as zero logits would."""
    monkeypatch.setattr(numpy_backend, "LOG_SOFTMAX_CHUNK", 7 * num_classes)
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=5.0, size=(3, 400, num_classes))
    logits[1, 5, :] = -np.inf
    padded = np.zeros((3, 400), dtype=bool)
    padded[0, 350:] = padded[2, :10] = True
    poisoned = np.where(padded[:, :, None], np.nan, logits)
    poisoned[2, 3, 0] = np.inf

    with np.errstate(divide="ignore", invalid="ignore"):  # the -inf frame
        result = numpy_backend.log_softmax_of_frames(np, poisoned, padded)
        expected = log_softmax(np, np.where(padded[:, :, None], 0.0, logits))
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_allclose(result[padded], -np.log(num_classes), rtol=1e-12)


@pytest.mark.parametrize("block", [5 * 9, 1 << 16])
def test_numpy_gather_in_blocks_matches_the_generic_gather_with_its_stand_ins_and_floor(block, monkeypatch):
    """Blocks of frames (5 here, the last one short; or all frames at once) give what the
    array-API gather followed by a select and a clip gives: the stand-ins in the replaced
    states (of the sequences that have any), the floor below, NaN left as NaN."""
    monkeypatch.setattr(numpy_backend, "GATHER_BLOCK", block)
    rng = np.random.default_rng(2)
    values = rng.normal(scale=30.0, size=(3, 23, 6)).astype(np.float32)
    values[1, 4, 2] = np.nan
    classes = rng.integers(0, 6, size=(3, 9))
    classes[1, 0] = 2
    replaced = np.zeros((3, 9), dtype=bool)
    replaced[0, 5:] = replaced[2, 1] = True
    replacement = rng.normal(scale=50.0, size=(3, 9)).astype(np.float32)

    xp = array_api_compat.numpy  # the namespace the library runs NumPy arrays with
    result = numpy_backend.gather_states(xp, values, classes, replaced, replacement, -20.0)
    expected = gather_states_by_take(xp, values, classes, replaced, replacement, -20.0)
    np.testing.assert_array_equal(result, expected)
    assert result.shape == (23, 3, 9) and result.dtype == np.float32
    assert np.isnan(result[4, 1, 0]) and result[~np.isnan(result)].min() >= -20.0
    np.testing.assert_array_equal(result[:, 0, 5:], np.maximum(replacement[0, 5:], -20.0)[None].repeat(23, 0))
    np.testing.assert_array_equal(numpy_backend.gather_states(xp, values, classes), gather_states_by_take(xp, values, classes))


def test_carry_over_padded_skips_numpys_select_only_where_it_would_change_nothing(xp):
    """NumPy hands back ``new`` itself when no flag is set (the shortcut); every namespace
    keeps the carried states on flagged rows and the new ones elsewhere."""
    carried, new = np.zeros((3, 4)), np.arange(12.0).reshape(3, 4)
    for flags in ([False, False, False], [False, True, False]):
        result = carry_over_padded(xp.namespace, xp.asarray(np.array(flags)), xp.asarray(carried), xp.asarray(new))
        xp.check_type(result)
        np.testing.assert_array_equal(xp.to_numpy(result), np.where(np.array(flags)[:, None], carried, new))
    unpadded = np.array([False, False, False])
    assert carry_over_padded(np, unpadded, carried, new) is new


@pytest.fixture
def torch_backend():
    if not installed("torch"):
        pytest.skip("torch is not installed")
    return importlib.import_module("ctc_multi.backends.torch")


@pytest.fixture
def numpy_scans(monkeypatch) -> list:
    """One entry per scan that NumPy's adapter runs from here on."""
    scans = []
    monkeypatch.setattr(numpy_backend, "scan", lambda *args, **kwargs: scans.append(1) or python_loop_scan(*args, **kwargs, stack=np.stack))
    return scans


def _torch_paddings_and_labels():
    import torch

    return torch.zeros(2, 6), torch.tensor([[1, 2], [3, 0]]), torch.tensor([[0, 0], [0, 1]])


def test_torch_on_a_cpu_hands_numpy_views_of_the_same_memory(torch_backend):
    import torch

    tensors = (torch.randn(2, 5, 3, requires_grad=True), torch.zeros(2, 5, dtype=torch.bool))
    assert torch_backend.numpy_views(tensors) is None  # autograd would record what runs on them
    with torch.no_grad():
        views = torch_backend.numpy_views(tensors)
    assert all(isinstance(view, np.ndarray) for view in views)
    assert all(np.shares_memory(view, tensor.detach().numpy()) for view, tensor in zip(views, tensors))
    assert torch_backend.numpy_views((torch.zeros(2, 5, device="meta"),)) is None  # not a CPU tensor


@pytest.mark.parametrize("loop_in_numpy", [True, False])
def test_torch_loss_and_gradient_run_numpys_loop_only_where_the_adapter_says(torch_backend, loop_in_numpy, numpy_scans, monkeypatch):
    """With the flag (the default), torch's ctc_loss and ctc_loss_and_grad run NumPy's scan and
    give torch tensors, leaving the logits untouched; without it, no NumPy scan runs at all."""
    import torch

    import ctc_multi

    monkeypatch.setattr(torch_backend, "LOOP_IN_NUMPY_ON_CPU", loop_in_numpy)
    logits = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=True)
    original = logits.detach().clone()
    inputs = _torch_paddings_and_labels()

    loss = ctc_multi.ctc_loss(logits, *inputs)
    loss.sum().backward()
    same_loss, gradient = ctc_multi.ctc_loss_and_grad(logits, *inputs)

    assert bool(numpy_scans) == loop_in_numpy
    for result in (loss, logits.grad, same_loss, gradient):
        assert isinstance(result, torch.Tensor) and result.dtype == torch.float64
    assert loss.requires_grad and not gradient.requires_grad
    torch.testing.assert_close(same_loss, loss.detach(), rtol=0, atol=0)
    torch.testing.assert_close(gradient, logits.grad, rtol=0, atol=0)
    torch.testing.assert_close(logits.detach(), original, rtol=0, atol=0)


@pytest.mark.parametrize("requires_grad", [False, True])
def test_torch_forward_probs_alignment_and_posteriors_run_numpys_loop_only_where_autograd_records_nothing(
    torch_backend, requires_grad, numpy_scans
):
    """Without grad these hand their loop to NumPy on a CPU; a tensor that requires grad keeps
    torch's own loop, which autograd records (forced_align never differentiates, so it always
    hands over), and the numbers are the same either way."""
    import torch

    import ctc_multi

    logits = torch.randn(2, 6, 4, dtype=torch.float64, requires_grad=requires_grad)
    inputs = _torch_paddings_and_labels()

    loss, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(logits, *inputs)
    posteriors = ctc_multi.ctc_posteriors(logits, *inputs)
    assert bool(numpy_scans) != requires_grad
    assert all(result.requires_grad == requires_grad for result in (loss, blank, nonblank, posteriors))
    if requires_grad:
        loss.sum().backward()  # autograd ran through torch's loop
        assert logits.grad is not None
    numpy_scans.clear()
    tokens, scores = ctc_multi.forced_align(logits, *inputs)
    assert numpy_scans and isinstance(tokens, torch.Tensor) and tokens.dtype == torch.int32

    expected = ctc_multi.ctc_loss_with_forward_probs(*(np.asarray(x.detach()) for x in (logits,) + inputs))
    for result, wanted in zip((loss, blank, nonblank), expected):
        np.testing.assert_allclose(result.detach().numpy(), wanted, rtol=1e-12, atol=1e-12)
