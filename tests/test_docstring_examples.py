"""Every public function's docstring example runs and prints what it says (NumPy only)."""

from __future__ import annotations

import doctest
import importlib

import pytest

PUBLIC_MODULES = ["ctc_multi.losses", "ctc_multi.alignment", "ctc_multi.conventions"]


@pytest.mark.parametrize("module_name", PUBLIC_MODULES)
def test_examples_run(module_name):
    module = importlib.import_module(module_name)
    result = doctest.testmod(module, optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    assert result.attempted > 0, f"{module_name} has no docstring examples"
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples in {module_name} failed"


def test_every_public_function_has_an_example():
    import ctc_multi

    import inspect

    functions = [name for name in ctc_multi.__all__ if inspect.isfunction(getattr(ctc_multi, name))]
    assert len(functions) >= 9
    missing = [name for name in functions if ">>>" not in (getattr(ctc_multi, name).__doc__ or "")]
    assert not missing, f"public functions without a docstring example: {missing}"
