"""Accuracy in float32: every ctc_multi backend and the anchors against one float64 reference.

For each case (B=8, every frame and label valid) it prints, per contender, the largest relative
loss error over the batch and the largest absolute error of d sum(loss) / d logits, both
against a float64 alpha-beta computation written here from Graves et al. (2006), and then how
many times smaller ctc_multi's errors are than each anchor's, measured in the same run.

    python benchmarks/accuracy.py            # the issue's cases, on the CPU (a minute or two)
    python benchmarks/accuracy.py --quick    # smaller shapes, seconds

Contenders: ``ctc_multi.ctc_loss_and_grad`` on every installed namespace (numpy,
array_api_strict, torch, torch with its own ops in the loop as on CUDA, jax under jit), the
autodiff path of ``ctc_multi.ctc_loss`` (jax.grad through its custom_vjp, torch autograd),
``optax.ctc_loss`` under ``jax.grad`` and ``torch.nn.functional.ctc_loss`` after a
log_softmax; each where installed. Nothing here gates anything: it prints numbers.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import math
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np

os.environ.setdefault("JAX_PLATFORMS", "cpu")  # the numbers are CPU numbers

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Case:
    name: str
    T: int
    K: int
    N: int
    scale: float = 1.0  # logits ~ scale * N(0, 1); 30 makes a peaky, almost certain softmax
    B: int = 8


CASES = (
    Case("T500 K32 N100", 500, 32, 100),
    Case("T400 K1024 N80", 400, 1024, 80),
    Case("peaky x30 T2000 K32 N100", 2000, 32, 100, scale=30.0),
)
QUICK_CASES = (
    Case("T100 K32 N20", 100, 32, 20),
    Case("T80 K256 N16", 80, 256, 16),
    Case("peaky x30 T400 K32 N20", 400, 32, 20, scale=30.0),
)


def make_problem(case: Case, seed: int = 0):
    """float32 logits (B, T, K) and labels (B, N) in [1, K): blank is 0."""
    rng = np.random.default_rng(seed)
    logits = (case.scale * rng.standard_normal((case.B, case.T, case.K))).astype(np.float32)
    labels = rng.integers(1, case.K, size=(case.B, case.N))
    return logits, labels


# ---------------------------------------------------------------------------------------------
# The float64 reference: Graves et al. (2006), eqs. 5-16, vectorised over the batch and the states
# (log 0 = -inf, no renormalisation; independent of ctc_multi's code).
# ---------------------------------------------------------------------------------------------


def reference(logits: np.ndarray, labels: np.ndarray, blank: int = 0):
    """float64 (B,) loss and (B, T, K) gradient d loss / d logits; all frames and labels valid."""
    log_probs = logits.astype(np.float64)
    log_probs = log_probs - log_probs.max(axis=2, keepdims=True)
    log_probs = log_probs - np.log(np.exp(log_probs).sum(axis=2, keepdims=True))
    batch, frames, num_classes = log_probs.shape
    states = 2 * labels.shape[1] + 1
    extended = np.full((batch, states), blank)
    extended[:, 1::2] = labels
    emit = np.take_along_axis(log_probs, extended[:, None, :], axis=2)  # (B, T, S)
    skip = np.zeros((batch, states), dtype=bool)  # s - 2 -> s allowed
    skip[:, 3::2] = labels[:, 1:] != labels[:, :-1]
    never = np.full((batch, 2), -np.inf)

    with np.errstate(divide="ignore"):
        alpha = np.full((batch, frames, states), -np.inf)
        alpha[:, 0, :2] = emit[:, 0, :2]
        for t in range(1, frames):
            prev = alpha[:, t - 1]
            one = np.concatenate([never[:, :1], prev[:, :-1]], axis=1)
            two = np.where(skip, np.concatenate([never, prev[:, :-2]], axis=1), -np.inf)
            alpha[:, t] = np.logaddexp(np.logaddexp(prev, one), two) + emit[:, t]
        beta = np.full((batch, frames, states), -np.inf)
        beta[:, -1, -2:] = emit[:, -1, -2:]
        skip_back = np.concatenate([skip[:, 2:], np.zeros((batch, 2), dtype=bool)], axis=1)  # s -> s + 2
        for t in range(frames - 2, -1, -1):
            nxt = beta[:, t + 1]
            one = np.concatenate([nxt[:, 1:], never[:, :1]], axis=1)
            two = np.where(skip_back, np.concatenate([nxt[:, 2:], never], axis=1), -np.inf)
            beta[:, t] = np.logaddexp(np.logaddexp(nxt, one), two) + emit[:, t]
    log_likelihood = np.logaddexp(alpha[:, -1, -1], alpha[:, -1, -2])
    occupancy_states = np.exp(alpha + beta - emit - log_likelihood[:, None, None])  # (B, T, S)
    one_hot = (extended[:, :, None] == np.arange(num_classes)).astype(np.float64)  # (B, S, K)
    return -log_likelihood, np.exp(log_probs) - occupancy_states @ one_hot


def check_reference() -> float:
    """The vectorised reference against tests/reference.py (a plain loop) on a small problem."""
    sys.path.insert(0, str(ROOT / "tests"))
    from reference import ctc_reference

    logits, labels = make_problem(Case("check", 17, 6, 5, B=3), seed=1)
    labels[0, 2] = labels[0, 1]  # a repeat
    loss, grad = reference(logits, labels)
    expected_loss, expected_grad = ctc_reference(logits, np.zeros(logits.shape[:2]), labels, np.zeros(labels.shape))
    return max(np.max(np.abs(loss - expected_loss)), np.max(np.abs(grad - expected_grad)))


# ---------------------------------------------------------------------------------------------
# Contenders: each takes float32 (logits, labels) as NumPy and returns NumPy (loss, gradient).
# ---------------------------------------------------------------------------------------------


def installed(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def ctc_multi_explicit(namespace: str) -> Callable:
    import ctc_multi

    if namespace == "numpy":
        return lambda logits, labels: ctc_multi.ctc_loss_and_grad(logits, *_paddings(np, logits, labels))
    if namespace == "array_api_strict":
        import array_api_strict as xp

        def run(logits, labels):
            arrays = xp.asarray(logits), *(xp.asarray(a) for a in _paddings(np, logits, labels))
            return tuple(np.asarray(r) for r in ctc_multi.ctc_loss_and_grad(*arrays))

        return run
    if namespace in ("torch", "torch_ops"):
        import torch

        from ctc_multi.backends import torch as torch_backend

        sys.path.insert(0, str(ROOT / "benchmarks"))
        from run import torch_own_ops

        def run(logits, labels):
            arrays = (torch.as_tensor(a) for a in (logits, *_paddings(np, logits, labels)))
            # torch_ops: torch's own ops in the loop (what runs on CUDA), not NumPy's (the CPU default)
            with torch_own_ops(torch_backend) if namespace == "torch_ops" else contextlib.nullcontext():
                return tuple(r.numpy() for r in ctc_multi.ctc_loss_and_grad(*arrays))

        return run
    import jax

    compiled = jax.jit(ctc_multi.ctc_loss_and_grad)
    return lambda logits, labels: tuple(np.asarray(r) for r in compiled(logits, *_paddings(np, logits, labels)))


def ctc_multi_autodiff(framework: str) -> Callable:
    import ctc_multi

    if framework == "torch":
        import torch

        def run(logits, labels):
            leaf = torch.tensor(logits, requires_grad=True)
            loss = ctc_multi.ctc_loss(leaf, *(torch.as_tensor(a) for a in _paddings(np, logits, labels)))
            loss.sum().backward()
            return loss.detach().numpy(), leaf.grad.numpy()

        return run
    return _jax_vjp(ctc_multi.ctc_loss)


def optax_contender() -> Callable:
    import optax

    return _jax_vjp(optax.ctc_loss)


def torch_contender() -> Callable:
    import torch

    def run(logits, labels):
        leaf = torch.tensor(logits, requires_grad=True)
        log_probs = torch.log_softmax(leaf, dim=2).transpose(0, 1)
        batch, frames, _ = logits.shape
        loss = torch.nn.functional.ctc_loss(
            log_probs,
            torch.as_tensor(labels),
            torch.full((batch,), frames, dtype=torch.long),
            torch.full((batch,), labels.shape[1], dtype=torch.long),
            reduction="none",
        )
        loss.sum().backward()
        return loss.detach().numpy(), leaf.grad.numpy()

    return run


def _paddings(xp, logits, labels):
    """(logit_paddings, labels, label_paddings): every frame and label valid."""
    return xp.zeros(logits.shape[:2], dtype=np.float32), labels, xp.zeros(labels.shape, dtype=np.float32)


def _jax_vjp(loss_function) -> Callable:
    import jax
    import jax.numpy as jnp

    @jax.jit
    def loss_and_grad(logits, logit_paddings, labels, label_paddings):
        loss, pullback = jax.vjp(lambda x: loss_function(x, logit_paddings, labels, label_paddings), logits)
        return loss, pullback(jnp.ones_like(loss))[0]

    return lambda logits, labels: tuple(np.asarray(r) for r in loss_and_grad(logits, *_paddings(np, logits, labels)))


def contenders() -> dict[str, Callable]:
    found = {"ctc_multi numpy": ctc_multi_explicit("numpy")}
    if installed("array_api_strict"):
        found["ctc_multi array_api_strict"] = ctc_multi_explicit("array_api_strict")
    if installed("torch"):
        found["ctc_multi torch"] = ctc_multi_explicit("torch")
        found["ctc_multi torch (own ops)"] = ctc_multi_explicit("torch_ops")
        found["ctc_multi torch autograd"] = ctc_multi_autodiff("torch")
    if installed("jax"):
        found["ctc_multi jax (jit)"] = ctc_multi_explicit("jax")
        found["ctc_multi jax.grad (custom_vjp)"] = ctc_multi_autodiff("jax")
    if installed("optax"):
        found["optax (jax.grad)"] = optax_contender()
    if installed("torch"):
        found["torch.nn.functional"] = torch_contender()
    return found


ANCHORS = ("optax (jax.grad)", "torch.nn.functional")


def measure(case: Case, runs: dict[str, Callable]) -> dict[str, tuple[float, float, bool]]:
    logits, labels = make_problem(case)
    expected_loss, expected_grad = reference(logits, labels)
    errors = {}
    for name, run in runs.items():
        loss, grad = run(logits, labels)
        loss, grad = np.asarray(loss, dtype=np.float64), np.asarray(grad, dtype=np.float64)
        finite = bool(np.all(np.isfinite(loss)) and np.all(np.isfinite(grad)))
        loss_error = float(np.max(np.abs(loss - expected_loss) / np.abs(expected_loss)))
        grad_error = float(np.max(np.abs(grad - expected_grad)))
        errors[name] = (loss_error, grad_error, finite)
    return errors


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="smaller shapes, for a smoke run")
    args = parser.parse_args(argv)

    print(f"reference check against tests/reference.py: max abs difference {check_reference():.1e}")
    runs = contenders()
    for case in QUICK_CASES if args.quick else CASES:
        start = time.perf_counter()
        errors = measure(case, runs)
        print(f"\n{case.name}  (B={case.B}, float32, CPU; {time.perf_counter() - start:.0f} s)")
        print(f"  {'contender':34s} {'loss rel err':>12s} {'grad max-abs':>12s}  finite")
        for name, (loss_error, grad_error, finite) in errors.items():
            print(f"  {name:34s} {loss_error:12.1e} {grad_error:12.1e}  {'yes' if finite else 'NO'}")
        ours = {name: value for name, value in errors.items() if name.startswith("ctc_multi")}
        worst_loss, worst_grad = (_worst(value[i] for value in ours.values()) for i in (0, 1))
        for anchor in ANCHORS:
            if anchor in errors:
                loss_ratio, grad_ratio = (_ratio(errors[anchor][i], worst) for i, worst in ((0, worst_loss), (1, worst_grad)))
                print(f"  {anchor} / worst ctc_multi: loss error x{loss_ratio:.3g}, gradient error x{grad_ratio:.3g}")
    return 0


def _worst(errors) -> float:
    """The largest error, NaN if any is NaN (``max`` would keep or drop a NaN by its position)."""
    errors = list(errors)
    return math.nan if any(math.isnan(error) for error in errors) else max(errors)


def _ratio(anchor_error: float, worst: float) -> float:
    """The anchor's error over ctc_multi's worst: below 1 where ctc_multi is less accurate, NaN
    where either error is NaN, inf where ctc_multi's is exactly 0."""
    if math.isnan(anchor_error) or math.isnan(worst):
        return math.nan
    return anchor_error / worst if worst else math.inf


if __name__ == "__main__":
    raise SystemExit(main())
