"""The adapters' protocol, the Python-loop scan and the NumPy adapter's cache-blocked log-softmax.

Backend-specific by design: these are the pieces the NumPy and torch adapters build their
scans and lattices from (the ``xp`` fixture tests the losses built on them).
"""

from __future__ import annotations

import importlib
import re

import numpy as np
import pytest
from conftest import installed

import ctc_multi.backends
from ctc_multi.backends import ADAPTER_NAMES
from ctc_multi.backends import numpy as numpy_backend
from ctc_multi.lattice import log_softmax
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


@pytest.mark.parametrize("num_classes", [3, 1000])
def test_numpy_log_softmax_in_blocks_matches_the_whole_array_and_ignores_padded_frames(num_classes, monkeypatch):
    """Blocks of frames (7 here, the last one short) give what one pass over the whole array
    gives; padded frames holding NaN and inf come out uniform, as zero logits would."""
    monkeypatch.setattr(numpy_backend, "LOG_SOFTMAX_CHUNK", 7 * num_classes)
    rng = np.random.default_rng(1)
    logits = rng.normal(scale=5.0, size=(3, 400, num_classes))
    padded = np.zeros((3, 400), dtype=bool)
    padded[0, 350:] = padded[2, :10] = True
    poisoned = np.where(padded[:, :, None], np.nan, logits)
    poisoned[2, 3, 0] = np.inf

    result = numpy_backend.log_softmax_of_frames(np, poisoned, padded)
    expected = log_softmax(np, np.where(padded[:, :, None], 0.0, logits))
    np.testing.assert_array_equal(result, expected)
    np.testing.assert_allclose(result[padded], -np.log(num_classes), rtol=1e-12)
