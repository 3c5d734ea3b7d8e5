"""Using ctc_multi with NumPy arrays imports neither torch nor JAX.

The idea of array-api-compat's tests/test_no_dependencies.py: a fresh interpreter imports the
library, runs both public functions on NumPy inputs, then looks at ``sys.modules``. A fresh
process is needed because this test session has imported every backend already.
"""

from __future__ import annotations

import textwrap

import pytest
from helpers import run_in_fresh_python

FRAMEWORKS = ["torch", "jax", "jaxlib", "optax", "array_api_strict"]

SCRIPT = textwrap.dedent(
    """
    import sys
    import numpy as np
    import ctc_multi

    logits = np.zeros((1, 3, 2))
    arguments = (logits, np.zeros((1, 3)), np.array([[1]]), np.zeros((1, 1)))
    loss = ctc_multi.ctc_loss(*arguments)
    loss2, blank, nonblank = ctc_multi.ctc_loss_with_forward_probs(*arguments)
    assert all(type(r) is np.ndarray for r in (loss, loss2, blank, nonblank))
    # Six of the eight paths over three uniform frames read "1".
    assert abs(float(loss[0]) - np.log(8 / 6)) < 1e-12 and abs(float(loss2[0]) - np.log(8 / 6)) < 1e-12
    print(" ".join(sorted(name for name in sys.modules if "." not in name)))
    """
)


@pytest.fixture(scope="module")
def modules_after_numpy_use() -> set[str]:
    result = run_in_fresh_python(SCRIPT)
    assert result.returncode == 0, result.stderr
    return set(result.stdout.split())


def test_numpy_use_works_and_imports_ctc_multi(modules_after_numpy_use):
    assert {"ctc_multi", "numpy", "array_api_compat"} <= modules_after_numpy_use


@pytest.mark.parametrize("framework", FRAMEWORKS)
def test_numpy_use_does_not_import(modules_after_numpy_use, framework):
    assert framework not in modules_after_numpy_use
