"""The one ``xp`` fixture: every test body runs on every installed backend.

A test that takes ``xp`` builds its inputs with ``xp.asarray(numpy_array)`` and reads results
back with ``xp.to_numpy(result)``; ``xp.check_type(result)`` asserts the result really is the
backend's array type (a silent fall-back to NumPy fails it). Tolerances live in ``TOLERANCE``.
"""

from __future__ import annotations

import importlib.util
from dataclasses import dataclass
from typing import Any, Callable

import numpy as np
import pytest

# Tolerances are stated once, per dtype: (relative, absolute) for losses and alphas.
TOLERANCE = {
    "float64": dict(rtol=1e-9, atol=1e-9),
    "float32": dict(rtol=1e-5, atol=1e-5),
    # d loss / d logits, against the reference's alpha-beta gradient.
    "gradient_float64": dict(rtol=1e-8, atol=1e-8),
    "gradient_float32": dict(rtol=1e-4, atol=1e-5),
    # Values and gradients against torch.nn.functional.ctc_loss, both in float64.
    "torch_float64": dict(rtol=1e-9, atol=1e-9),
    # Autodiff against central differences with step 1e-6 (truncation ~1e-12, rounding ~1e-10).
    "finite_difference_float64": dict(rtol=1e-6, atol=1e-7),
    # A realistic float32 problem against the float64 reference: relative loss error and
    # max-abs gradient error (benchmarks/accuracy.py measures ~1e-7 and ~1e-5; guard 10-100x).
    "accuracy_float32": dict(loss_rtol=1e-5, gradient_atol=1e-3),
}


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def _enable_jax_x64():
    import jax

    jax.config.update("jax_enable_x64", True)


@dataclass
class Backend:
    """How one backend turns NumPy test data into its arrays and back."""

    name: str
    namespace: Any
    asarray: Callable[..., Any]
    to_numpy: Callable[[Any], np.ndarray]
    array_type: type

    def check_type(self, *results) -> None:
        for result in results:
            assert isinstance(result, self.array_type), f"{self.name}: got {type(result)} instead of {self.array_type}"

    def dtype(self, name: str):
        return getattr(self.namespace, name)


def _numpy_backend() -> Backend:
    return Backend("numpy", np, np.asarray, np.asarray, np.ndarray)


def _jax_backend() -> Backend:
    _enable_jax_x64()
    import jax
    import jax.numpy as jnp

    return Backend("jax", jnp, lambda a, dtype=None: jnp.asarray(a, dtype=dtype), lambda a: np.asarray(a), jax.Array)


def _torch_backend() -> Backend:
    import torch

    def asarray(a, dtype=None):
        return torch.as_tensor(np.asarray(a), dtype=dtype)

    return Backend("torch", torch, asarray, lambda a: a.detach().cpu().numpy(), torch.Tensor)


def _strict_backend() -> Backend:
    import array_api_strict as strict

    return Backend(
        "array_api_strict",
        strict,
        lambda a, dtype=None: strict.asarray(np.asarray(a), dtype=dtype),
        lambda a: np.asarray(a),
        type(strict.asarray(0.0)),
    )


def _torch_xla_backend() -> Backend:
    _enable_jax_x64()  # as for the jax backend: float64 goes to XLA too
    return _torch_backend()


# name -> (modules it needs, how to make it, switches of ctc_multi's torch adapter set for it)
BACKENDS = {
    "numpy": (("numpy",), _numpy_backend, {}),
    "jax": (("jax",), _jax_backend, {}),
    "torch": (("torch",), _torch_backend, {}),
    # torch with its own ops in every loop: on a CPU, what autograd does not record otherwise
    # runs NumPy's loop on views of the tensors (ctc_multi.backends.torch), and on CUDA these
    # ops are what runs.
    "torch_ops": (("torch",), _torch_backend, {"LOOP_IN_NUMPY_ON_CPU": False}),
    # torch with the opt-in LOOP_IN_XLA_ON_CPU: on a CPU, what would run NumPy's loop runs JAX's
    # under XLA instead, on the tensors' memory (float32, and float64 as JAX's float64 is on here,
    # as for the jax backend; tests/test_torch_xla.py checks it off).
    "torch_xla": (("torch", "jax"), _torch_xla_backend, {"LOOP_IN_XLA_ON_CPU": True}),
    "array_api_strict": (("array_api_strict",), _strict_backend, {}),
}


@pytest.fixture(params=list(BACKENDS))
def xp(request, monkeypatch) -> Backend:
    modules, make, switches = BACKENDS[request.param]
    for module in modules:
        if not installed(module):
            pytest.skip(f"{module} is not installed in this environment")
    if switches:
        import ctc_multi.backends.torch

        for name, value in switches.items():
            monkeypatch.setattr(ctc_multi.backends.torch, name, value)
    return make()


@pytest.fixture
def jax_x64():
    if not installed("jax"):
        pytest.skip("jax is not installed in this environment")
    _enable_jax_x64()
    import jax

    return jax
