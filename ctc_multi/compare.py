"""``ctc-multi compare``: one CTC problem on every installed backend and anchor, in one table.

Each contender (a ctc_multi backend, or an anchor: ``optax.ctc_loss`` or
``torch.nn.functional.ctc_loss``) computes the (B,) loss and its (B, T, K) gradient on the same
inputs; both are compared with a float64 reference, and the loss alone (forward) and loss plus
gradient (forward+backward) are timed: the median of ``repeats`` runs after one warm-up.

Frameworks are imported only by the contenders that use them, so comparing the NumPy backend
alone imports neither JAX nor torch. rich (and matplotlib, for plots) come with the ``cli``
extra and are imported when needed.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import statistics
import time
import zipfile
from dataclasses import asdict, dataclass, field
from functools import partial
from typing import Any, Callable

import numpy as np

from .inputs import check_inputs
from .lattice import EMISSION_FLOOR, frames_without_softmax, log_softmax
from .losses import DEFAULT_LOG_EPSILON, ctc_loss, ctc_loss_and_grad
from .shapes import Problem, Shape, random_problem

REFERENCE = "ctc_multi's NumPy backend in float64 (ctc_loss_and_grad), on the same inputs cast to float64"


@dataclass(frozen=True)
class Tolerance:
    """How far a result may be from the float64 reference, for one dtype.

    loss: allowed loss difference of each sequence, relative to max(1, |its reference loss|).
    grad: allowed max-abs gradient difference; absolute, since every gradient entry of a CTC
      loss with respect to the logits lies in [-1, 1].
    """

    loss: float
    grad: float

    def losses_within(self, loss: np.ndarray, reference_loss: np.ndarray) -> bool:
        """Each sequence's loss against its own bound, so that a small loss is held to its own
        size and not to the batch's largest (False for NaN)."""
        bound = self.loss * np.maximum(1.0, np.abs(reference_loss))
        return bool(np.all(np.abs(loss.astype(np.float64) - reference_loss) <= bound))


# float32, measured against the reference (seeds 0 and 1): losses within 1e-7 relative on every
# named shape; gradients within 2e-6 (small), 3e-5 (char, bpe) and 1.1e-4 (long, T = 2000): the
# gradient's error grows with T, hence 1e-3. float64 results agree to about 1e-12.
TOLERANCES = {
    "float64": Tolerance(loss=1e-8, grad=1e-8),
    "float32": Tolerance(loss=1e-5, grad=1e-3),
}

NPZ_KEYS = ("logits", "logit_paddings", "labels", "label_paddings")


class UsageError(Exception):
    """A bad command line or input file: reported as one message, exit code 2, no traceback."""


class Unavailable(Exception):
    """The contender is installed but cannot run here (no CUDA device for it, say)."""


# ---------------------------------------------------------------------------------------------
# The problem


@dataclass(frozen=True)
class Case:
    """The arrays every contender gets, and how to describe them."""

    problem: Problem
    blank_id: int
    source: str  # "shape small", "file data.npz"
    seed: int | None = None

    @property
    def dtype(self) -> str:
        return str(self.problem.logits.dtype)

    def describe(self) -> dict:
        B, T, K = self.problem.logits.shape
        return dict(
            source=self.source, B=B, T=T, K=K, N=self.problem.labels.shape[1],
            dtype=self.dtype, blank_id=self.blank_id, seed=self.seed,
        )

    def float64(self) -> Problem:
        return Problem(*(a.astype(np.float64) if a.dtype.kind == "f" else a for a in self.problem))


def generated_case(shape: Shape, *, seed: int, dtype: str) -> Case:
    try:
        return Case(random_problem(shape, seed, dtype), blank_id=0, source=f"shape {shape}", seed=seed)
    except MemoryError:
        gib = shape.B * shape.T * shape.K * np.dtype(dtype).itemsize / 2**30
        raise UsageError(f"shape {shape}: its logits alone take {gib:.3g} GiB, more than this machine can allocate") from None


def load_case(path: str, *, dtype: str | None) -> Case:
    """The problem stored in ``path`` (.npz with the keys ``NPZ_KEYS`` and, optionally, ``blank_id``).

    Its logits are cast to ``dtype``; with ``dtype=None`` float64 logits stay float64 and any
    other float becomes float32. Raises :class:`UsageError` naming the missing key or the wrong
    shape, dtype or value.
    """
    try:
        if os.path.isdir(path):
            raise UsageError(f"{path}: is a directory, not an .npz file")
        if not os.path.isfile(path):
            raise UsageError(f"{path}: no such file")
        if not zipfile.is_zipfile(path):  # np.load would try .npy, then pickle
            raise UsageError(f"{path}: not an .npz archive (numpy.savez writes one)")
        with np.load(path, allow_pickle=False) as data:
            arrays = {key: data[key] for key in data.files}
    except (OSError, ValueError, zipfile.BadZipFile) as error:
        raise UsageError(f"{path}: cannot read it as an .npz archive: {error}") from None
    missing = [key for key in NPZ_KEYS if key not in arrays]
    if missing:
        raise UsageError(
            f"{path}: missing key {missing[0]!r}; an input file needs the arrays {', '.join(NPZ_KEYS)}"
            f" (and may hold an integer blank_id); it has: {', '.join(sorted(arrays)) or 'nothing'}"
        )
    for key in (*NPZ_KEYS, "blank_id"):
        if key in arrays and not isinstance(arrays[key], np.ndarray):  # a member that is no .npy file: np.load gives bytes
            raise UsageError(f"{path}: {key} is not a .npy array (numpy.savez writes each array as one)")
    blank_id = arrays.get("blank_id", np.asarray(0))
    if blank_id.ndim != 0 or blank_id.dtype.kind not in "iu":
        raise UsageError(f"{path}: blank_id must be an integer scalar; got dtype {blank_id.dtype}, shape {blank_id.shape}")
    problem = Problem(*(arrays[key] for key in NPZ_KEYS))
    try:  # the library's own validation names the argument, which is also the key
        check_inputs(*problem, blank_id=int(blank_id), log_epsilon=DEFAULT_LOG_EPSILON)
    except ValueError as error:
        raise UsageError(f"{path}: {error}") from None
    no_softmax = frames_without_softmax(np, problem.logits, problem.logit_paddings != 0)
    if np.any(no_softmax):
        sequence, frame = (int(i[0]) for i in np.nonzero(no_softmax))
        raise UsageError(
            f"{path}: logits hold NaN or +inf, or no finite value, on a valid frame (sequence {sequence}, frame {frame}), which has no "
            "softmax: every loss and gradient of that sequence is NaN. Mark the frame padded or fix its logits"
        )
    if dtype is None:
        dtype = "float64" if problem.logits.dtype == np.float64 else "float32"
    return Case(problem._replace(logits=problem.logits.astype(dtype)), blank_id=int(blank_id), source=f"file {path}")


# ---------------------------------------------------------------------------------------------
# The contenders


@dataclass
class Prepared:
    """A contender ready to run on one problem; ``forward``/``forward_backward`` block until done."""

    device: str
    forward: Callable[[], Any]
    # -> (loss, grad) in the framework's arrays; the loss may be summed (jax.value_and_grad), so
    # the per-sequence losses that are compared come from ``forward``.
    forward_backward: Callable[[], tuple[Any, Any]]
    to_numpy: Callable[[Any], np.ndarray]
    restore_grad: Callable[[np.ndarray], np.ndarray] = lambda grad: grad


def _namespace_prepared(xp, case: Case) -> Prepared:
    arrays = [xp.asarray(a) for a in case.problem]
    return Prepared(
        device="cpu",
        forward=lambda: ctc_loss(*arrays, blank_id=case.blank_id),
        forward_backward=lambda: ctc_loss_and_grad(*arrays, blank_id=case.blank_id),
        to_numpy=np.asarray,
    )


def _prepare_numpy(case: Case, device: str) -> Prepared:
    return _namespace_prepared(np, case)  # always on the CPU, whatever --device says


def _prepare_array_api_strict(case: Case, device: str) -> Prepared:
    import array_api_strict

    return _namespace_prepared(array_api_strict, case)


def jax_device(device: str):
    import jax

    if device == "cpu":
        return jax.devices("cpu")[0]
    try:
        return jax.devices("gpu")[0]
    except RuntimeError:
        raise Unavailable("jax sees no GPU (install a CUDA build of jax, e.g. jax[cuda12])") from None


def _jax_prepared(case: Case, device: str, loss_function) -> Prepared:
    import jax
    import jax.numpy as jnp

    if case.dtype == "float64":
        jax.config.update("jax_enable_x64", True)
    target = jax_device(device)
    arrays = [jax.device_put(a, target) for a in case.problem]
    forward = jax.jit(loss_function)
    forward_backward = jax.jit(jax.value_and_grad(lambda logits, *others: jnp.sum(loss_function(logits, *others))))

    return Prepared(
        f"{target.platform}:{target.id}",
        forward=lambda: forward(*arrays).block_until_ready(),
        forward_backward=lambda: jax.block_until_ready(forward_backward(*arrays)),
        to_numpy=np.asarray,
    )


def _prepare_jax(case: Case, device: str) -> Prepared:
    return _jax_prepared(case, device, partial(ctc_loss, blank_id=case.blank_id))


def _prepare_optax(case: Case, device: str) -> Prepared:
    import optax

    return _jax_prepared(case, device, partial(optax.ctc_loss, blank_id=case.blank_id))


def torch_device(device: str):
    import torch

    if device == "cuda" and not torch.cuda.is_available():
        raise Unavailable(f"torch {torch.__version__} sees no CUDA device")
    return torch.device(device)


def _torch_prepared(device: str, loss_function, logits: np.ndarray, others) -> Prepared:
    import torch

    target = torch_device(device)
    # Copies in torch's own memory, as a model's outputs are, not views of NumPy's: NumPy aligns
    # its arrays to 16 bytes, torch to 64, and JAX takes only the latter without a copy (the
    # torch backend's opt-in LOOP_IN_XLA_ON_CPU: 48 MB copied on each call on `vocab5k`).
    logits = torch.tensor(logits, device=target)
    others = [torch.tensor(a, device=target) for a in others]

    def synchronize():
        if target.type == "cuda":
            torch.cuda.synchronize(target)

    def forward():
        with torch.no_grad():
            loss = loss_function(logits, *others)
        synchronize()
        return loss

    def forward_backward():
        leaf = logits.detach().requires_grad_(True)
        loss = loss_function(leaf, *others)
        (grad,) = torch.autograd.grad(loss.sum(), leaf)
        synchronize()
        return loss.detach(), grad

    device_name = str(target) if target.type == "cpu" else f"cuda:{torch.cuda.current_device()}"
    return Prepared(device_name, forward, forward_backward, lambda t: t.detach().cpu().numpy())


def _prepare_torch(case: Case, device: str) -> Prepared:
    return _torch_prepared(device, partial(ctc_loss, blank_id=case.blank_id), case.problem.logits, case.problem[1:])


def _prepare_torch_native(case: Case, device: str) -> Prepared:
    """torch.nn.functional.ctc_loss after a log_softmax, with lengths in place of paddings.

    torch counts valid frames from the start, so the valid frames of each sequence are moved
    to the front first (padding may sit anywhere in an --input file); the gradient is moved
    back before it is compared. Both happen outside the timed runs.
    """
    import torch.nn.functional as F

    logits, logit_paddings, labels, label_paddings = case.problem
    order = np.argsort(logit_paddings != 0, axis=1, kind="stable")  # valid frames first, in order
    logits = np.take_along_axis(logits, order[:, :, None], axis=1)
    input_lengths = np.sum(logit_paddings == 0, axis=1).astype(np.int64)
    target_lengths = np.sum(label_paddings == 0, axis=1).astype(np.int64)
    targets = np.where(label_paddings == 0, labels, 0).astype(np.int64)

    def loss_function(logits, targets, input_lengths, target_lengths):
        log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)  # (T, B, K)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=case.blank_id, reduction="none")

    def restore_grad(grad):
        restored = np.empty_like(grad)
        np.put_along_axis(restored, order[:, :, None], grad, axis=1)
        return restored

    prepared = _torch_prepared(device, loss_function, logits, (targets, input_lengths, target_lengths))
    prepared.restore_grad = restore_grad
    return prepared


@dataclass(frozen=True)
class Contender:
    name: str
    anchor: bool  # anchors are shown for comparison and never set the exit code
    framework: str  # anchors run when this framework's backend is selected
    requires: tuple[str, ...]  # top-level modules that must be installed
    prepare: Callable[[Case, str], Prepared]

    def missing(self) -> list[str]:
        return [module for module in self.requires if importlib.util.find_spec(module) is None]


BACKENDS = {
    contender.name: contender
    for contender in (
        Contender("numpy", False, "numpy", ("numpy",), _prepare_numpy),
        Contender("jax", False, "jax", ("jax",), _prepare_jax),
        Contender("torch", False, "torch", ("torch",), _prepare_torch),
        Contender("array_api_strict", False, "array_api_strict", ("array_api_strict",), _prepare_array_api_strict),
    )
}
TORCH_ANCHOR = "torch F.ctc_loss"
ANCHORS = (
    Contender("optax.ctc_loss", True, "jax", ("jax", "optax"), _prepare_optax),
    Contender(TORCH_ANCHOR, True, "torch", ("torch",), _prepare_torch_native),
)
# array_api_strict checks array-API conformance rather than speed: run by default only when installed.
DEFAULT_BACKENDS = ("numpy", "jax", "torch")


def select(backends: list[str] | None, *, anchors: bool = True) -> list[Contender]:
    """The contenders to run: the named ctc_multi backends, then the anchors of their frameworks."""
    if backends is None:
        backends = list(DEFAULT_BACKENDS)
        if importlib.util.find_spec("array_api_strict") is not None:
            backends.append("array_api_strict")
    if not backends:
        raise UsageError(f"--backends needs at least one of {', '.join(BACKENDS)}")
    unknown = [name for name in backends if name not in BACKENDS]
    if unknown:
        raise UsageError(f"unknown backend {unknown[0]!r}; choose from {', '.join(BACKENDS)}")
    chosen = [BACKENDS[name] for name in dict.fromkeys(backends)]
    if anchors:
        chosen += [anchor for anchor in ANCHORS if anchor.framework in backends]
    return chosen


def check_device(contenders: list[Contender], device: str) -> None:
    """With ``device="cuda"``, fail early unless some installed framework of the selection sees a GPU."""
    if device == "cpu":
        return
    reasons = []
    for framework, resolve in (("torch", torch_device), ("jax", jax_device)):
        if any(c.framework == framework and not c.missing() for c in contenders):
            try:
                resolve(device)
                return
            except Unavailable as error:
                reasons.append(str(error))
    raise UsageError(
        f"--device {device}: no selected backend can use it"
        + (f" ({'; '.join(reasons)})" if reasons else " (only torch and jax run on CUDA; neither is selected and installed)")
    )


# ---------------------------------------------------------------------------------------------
# Running and measuring


@dataclass
class Row:
    """One line of the table; times in milliseconds, differences against the float64 reference."""

    backend: str
    anchor: bool
    status: str  # "ok", "outside tolerance", "error", "not installed", "unavailable"
    device: str | None = None
    dtype: str | None = None
    loss_max_abs_diff: float | None = None
    grad_max_abs_diff: float | None = None
    forward_ms: float | None = None
    forward_backward_ms: float | None = None
    speedup_over_fastest_anchor: float | None = None
    message: str = ""

    @property
    def fails(self) -> bool:
        """Whether this row makes the exit code 1 (anchors never do)."""
        return not self.anchor and self.status in ("outside tolerance", "error")


@dataclass
class Report:
    case: Case
    device: str
    repeats: int
    rows: list[Row] = field(default_factory=list)

    @property
    def tolerance(self) -> Tolerance:
        return TOLERANCES[self.case.dtype]

    @property
    def checked_nothing(self) -> bool:
        """Whether no ctc_multi backend ran (each one selected not installed, say): nothing was checked."""
        return not any(not row.anchor and row.backend != REFERENCE_CHECK and row.status in ("ok", "outside tolerance") for row in self.rows)

    @property
    def exit_code(self) -> int:
        return 1 if self.checked_nothing or any(row.fails for row in self.rows) else 0

    def to_json(self) -> dict:
        return dict(
            problem=self.case.describe(),
            device=self.device,
            repeats=self.repeats,
            reference=REFERENCE,
            tolerance=asdict(self.tolerance),
            exit_code=self.exit_code,
            rows=[dict(asdict(row), fails=row.fails) for row in self.rows],
        )


def _max_abs_diff(result: np.ndarray, reference: np.ndarray) -> float:
    if result.shape != reference.shape:
        raise ValueError(f"result has shape {result.shape}, the reference {reference.shape}")
    return float(np.max(np.abs(result.astype(np.float64) - reference), initial=0.0))


def _median_ms(function: Callable[[], Any], repeats: int, advance: Callable[[], None]) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
        advance()
    return 1e3 * statistics.median(times)


def steps_per_contender(repeats: int) -> int:
    """Progress steps of one contender: preparing, two warm-ups, then the timed repeats of both."""
    return 3 + 2 * repeats


def loss_and_gradient(prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
    """The (B,) losses and the (B, T, K) gradient of one (warm-up) call each, as NumPy arrays."""
    loss = prepared.to_numpy(prepared.forward())
    _, grad = prepared.forward_backward()
    return loss, prepared.restore_grad(prepared.to_numpy(grad))


IMPOSSIBLE_LOSS = -DEFAULT_LOG_EPSILON / 2  # the reference's loss of an impossible alignment is about -log_epsilon


def _differences(row: Row, loss: np.ndarray, grad: np.ndarray, reference, tolerance: Tolerance) -> None:
    """Fill in the row's differences from the reference; "outside tolerance" (NaN included) past
    ``tolerance``. The gradients of sequences with no alignment (the reference's loss at least
    ``IMPOSSIBLE_LOSS``) are left out: they come from paths that only the stand-in for log 0
    allows, which float32 and float64 weigh differently."""
    reference_loss, reference_grad = reference
    possible = reference_loss < IMPOSSIBLE_LOSS
    row.loss_max_abs_diff = _max_abs_diff(loss, reference_loss)
    row.grad_max_abs_diff = _max_abs_diff(grad[possible], reference_grad[possible])
    if not (tolerance.losses_within(loss, reference_loss) and row.grad_max_abs_diff <= tolerance.grad):
        row.status = "outside tolerance"


def _measure(contender: Contender, case: Case, reference, device: str, repeats: int, advance) -> Row:
    row = Row(contender.name, contender.anchor, "ok")
    prepared = contender.prepare(case, device)
    advance()
    row.device = prepared.device
    loss, grad = loss_and_gradient(prepared)
    advance()
    advance()
    row.dtype = str(grad.dtype)
    _differences(row, loss, grad, reference, TOLERANCES[case.dtype])
    row.forward_ms = _median_ms(prepared.forward, repeats, advance)
    row.forward_backward_ms = _median_ms(prepared.forward_backward, repeats, advance)
    return row


REFERENCE_CHECK = "reference check"
# What to install for a missing module: the extras pin torch to the CPU wheel's range (a bare
# `pip install torch` may pull a multi-GB CUDA build).
PIP_NAMES = {"torch": "'ctc-multi[torch]'", "jax": "'ctc-multi[jax]'", "array_api_strict": "array-api-strict"}


def _check_reference(case: Case, reference) -> Row:
    """The float64 reference against an implementation that shares no code with it: torch's
    ``F.ctc_loss`` (after a log-softmax) in float64 on the CPU. A defect common to every
    ctc_multi backend would leave their rows within tolerance; this row is not, and it sets the
    exit code. Left out, where the two differ by design:

    - sequences that cannot be aligned (torch's loss infinite), provided the reference's loss
      says so too (at least ``IMPOSSIBLE_LOSS``);
    - sequences with an emission below ``EMISSION_FLOOR`` on a valid frame (a -inf logit, a
      masked class): ctc_multi floors it, torch counts it as it is (its gradient NaN at -inf);
    - the gradients of sequences with a label equal to the blank, where torch's loss is right
      and its gradient can be wrong (where the last label is the blank: tests/test_optax_parity.py).
    """
    row = Row(REFERENCE_CHECK, anchor=False, status="ok", device="cpu", dtype="float64")
    problem = case.float64()  # padded frames zeroed, as the reference reads them: a NaN there is no defect
    valid = problem.logit_paddings == 0
    logits = np.where(valid[:, :, None], problem.logits, 0.0)
    problem = problem._replace(logits=logits)
    if logits.shape[0] == 0:  # torch refuses an empty batch
        row.message = "no sequences"
        return row
    with np.errstate(invalid="ignore", divide="ignore"):  # -inf logits
        log_probs = log_softmax(np, logits)
    floored = np.any((log_probs < EMISSION_FLOOR) & valid[:, :, None], axis=(1, 2))
    loss, grad = loss_and_gradient(_prepare_torch_native(Case(problem, case.blank_id, case.source), "cpu"))
    possible = np.isfinite(loss)
    checked = possible & ~floored
    blank_labelled = np.any((problem.labels == case.blank_id) & (problem.label_paddings == 0), axis=1)
    reference_loss, reference_grad = reference
    grad[blank_labelled] = reference_grad[blank_labelled]
    _differences(row, loss[checked], grad[checked], (reference_loss[checked], reference_grad[checked]), TOLERANCES["float64"])
    if np.any(floored):
        row.message = f"{int(np.sum(floored))} of {len(loss)} sequences left out: emissions below {EMISSION_FLOOR:g}"
    disputed = np.flatnonzero(~possible & ~floored & (reference_loss < IMPOSSIBLE_LOSS))
    if disputed.size:
        row.status = "outside tolerance"
        row.message = f"torch F.ctc_loss finds no alignment for sequence {int(disputed[0])}; the reference's loss is {reference_loss[disputed[0]]:.6g}"
    return row


def run(case: Case, contenders: list[Contender], *, device: str = "cpu", repeats: int = 5, progress=None) -> Report:
    """Run every contender on ``case`` and compare it with the float64 reference.

    Args:
      case: the problem (see :func:`generated_case`, :func:`load_case`).
      contenders: from :func:`select`.
      device: "cpu" or "cuda" (torch and JAX contenders; NumPy ones stay on the CPU).
      repeats: timed runs of each of forward and forward+backward, after one warm-up.
      progress: a ``rich.progress.Progress`` to report to, or None.

    Returns:
      A :class:`Report` with one :class:`Row` per contender, in order.
    """
    if repeats < 1:
        raise UsageError(f"--repeats must be at least 1; got {repeats}")
    # Where torch is installed and selected (its backend or its anchor), with or without --no-anchors.
    checking = importlib.util.find_spec("torch") is not None and any(contender.framework == "torch" for contender in contenders)
    task = progress.add_task("float64 reference", total=1 + len(contenders) * steps_per_contender(repeats) + checking) if progress else None

    def advance(description: str | None = None):
        if progress:
            progress.update(task, advance=1, **({"description": description} if description else {}))

    reference = ctc_loss_and_grad(*case.float64(), blank_id=case.blank_id)
    advance()
    report = Report(case, device, repeats)
    for contender in contenders:
        if progress:
            progress.update(task, description=contender.name)
        missing = contender.missing()
        if missing:
            row = Row(contender.name, contender.anchor, "not installed", message=f"pip install {' '.join(PIP_NAMES.get(module, module) for module in missing)}")
        else:
            try:
                row = _measure(contender, case, reference, device, repeats, advance)
            except Unavailable as error:
                row = Row(contender.name, contender.anchor, "unavailable", message=str(error))
            except Exception as error:  # reported in its row: one failing framework must not hide the others
                row = Row(contender.name, contender.anchor, "error", message=f"{type(error).__name__}: {error}")
        if progress:  # skip the steps a contender did not run
            progress.update(task, completed=1 + (len(report.rows) + 1) * steps_per_contender(repeats))
        report.rows.append(row)
    if checking:
        if progress:
            progress.update(task, description=REFERENCE_CHECK)
        report.rows.append(_checked_reference(case, reference))
    _add_speedups(report.rows)
    return report


def _checked_reference(case: Case, reference) -> Row:
    try:
        return _check_reference(case, reference)
    except Exception as error:  # the check could not run: say so, and fail, rather than pass unchecked
        return Row(REFERENCE_CHECK, False, "error", message=f"{type(error).__name__}: {error}")


def _add_speedups(rows: list[Row]) -> None:
    """Each row's speed-up: the fastest anchor's forward+backward time over its own (above 1:
    faster than every anchor), the way round that benchmarks/run.py and the README's
    Performance tables give their ratios."""
    anchor_times = [row.forward_backward_ms for row in rows if row.anchor and row.forward_backward_ms]
    if anchor_times:
        fastest = min(anchor_times)
        for row in rows:
            if row.forward_backward_ms:
                row.speedup_over_fastest_anchor = fastest / row.forward_backward_ms


# ---------------------------------------------------------------------------------------------
# Output


def _rich():
    try:
        import rich.console
        import rich.markup
        import rich.progress
        import rich.table
    except ImportError:
        raise UsageError("needs rich: pip install 'ctc-multi[cli]'") from None
    return rich


def progress_bar():
    """A rich progress bar on stderr, so that stdout holds the table alone."""
    rich = _rich()
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

    console = rich.console.Console(stderr=True)
    return Progress(TextColumn("{task.description:<18}"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(), console=console, transient=True)


def _number(value: float | None, format: str) -> str:
    return "—" if value is None else format.format(value)


_STATUS_STYLE = {"ok": "green", "outside tolerance": "bold red", "error": "bold red", "not installed": "dim", "unavailable": "yellow"}


def table(report: Report):
    """The report as a ``rich.table.Table``."""
    rich = _rich()
    case = report.case.describe()
    tolerance = report.tolerance
    result = rich.table.Table(
        title=(
            f"CTC loss and gradient: {case['source']}, {case['dtype']}, blank {case['blank_id']}; "
            f"median of {report.repeats} after a warm-up"
        ),
        caption=(
            f"Differences: max |x - reference|, reference = {REFERENCE}. "
            f"Tolerance ({case['dtype']}): loss {tolerance.loss:g} × max(1, |loss|), gradient {tolerance.grad:g}. "
            "Anchors (italic) are shown for comparison and do not set the exit code"
            + (
                "; the reference check (torch F.ctc_loss in float64 against the reference) does. "
                if any(row.backend == REFERENCE_CHECK for row in report.rows)
                else " (no reference check row: it runs where torch is installed and selected). "
            )
            + "speed-up: the fastest anchor's forward+backward time ÷ the row's (above 1: faster)."
        ),
        caption_justify="left",
    )
    for header in ("backend", "device", "dtype", "loss Δ", "grad Δ", "fwd ms", "fwd+bwd ms", "speed-up", "status"):
        result.add_column(header, justify="left" if header in ("backend", "device", "dtype", "status") else "right")
    for row in report.rows:
        status = row.status + (f": {row.message}" if row.message else "")
        result.add_row(
            row.backend,
            row.device or "—",
            row.dtype or "—",
            _number(row.loss_max_abs_diff, "{:.1e}"),
            _number(row.grad_max_abs_diff, "{:.1e}"),
            _number(row.forward_ms, "{:.2f}"),
            _number(row.forward_backward_ms, "{:.2f}"),
            _number(row.speedup_over_fastest_anchor, "{:.2f}"),
            f"[{'yellow' if row.anchor and row.status != 'ok' else _STATUS_STYLE[row.status]}]{rich.markup.escape(status)}[/]",
            style="italic" if row.anchor else None,
        )
    return result


def print_table(report: Report) -> None:
    """Print the table on stdout; piped into a file it gets 150 columns rather than rich's 80."""
    from rich.console import Console

    console = Console()
    if not console.is_terminal and "COLUMNS" not in os.environ:
        console = Console(width=150)
    console.print(table(report))


def write_json(report: Report, path: str) -> None:
    """The report as JSON; non-finite differences (an infinite anchor loss, say) as the strings "inf", "nan"."""

    def finite(value):
        return value if not (isinstance(value, float) and not math.isfinite(value)) else str(value)

    data = report.to_json()
    data["rows"] = [{key: finite(value) for key, value in row.items()} for row in data["rows"]]
    try:
        with open(path, "w") as file:
            json.dump(data, file, indent=2)
            file.write("\n")
    except OSError as error:
        raise UsageError(f"--json {path}: {error.strerror}") from None


def check_directory(option: str, path: str) -> None:
    """Fail before the run, not after it, when ``path`` cannot be written: a directory in its
    place, no such directory, or a file that cannot be opened for writing there (left as it was)."""
    if os.path.isdir(path):
        raise UsageError(f"{option} {path}: is a directory; give a file name in it")
    directory = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(directory):
        raise UsageError(f"{option} {path}: no such directory {directory}")
    existed = os.path.exists(path)
    try:  # the one sure test (permissions, read-only mounts, /proc): open it for appending
        with open(path, "a"):
            pass
    except OSError as error:
        raise UsageError(f"{option} {path}: cannot write it: {error.strerror}") from None
    if not existed:
        os.remove(path)


def check_plotting(path: str | None = None) -> str | None:
    """Fail before the run, not after it, when --plot cannot work: no matplotlib, or (for a
    ``path``) no such directory, a directory in its place, or a file type matplotlib does not
    write. Returns the file to write: ``path``, with ``.png`` added where it has no extension
    (as matplotlib would add it, so that what the command reports is the file written)."""
    if importlib.util.find_spec("matplotlib") is None:
        raise UsageError("--plot needs matplotlib: pip install 'ctc-multi[cli]'")
    if path is None:
        return None
    if os.path.isdir(path):
        raise UsageError(f"--plot {path}: is a directory; give a file name such as {os.path.join(path, 'plot.png')}")
    check_directory("--plot", path)
    extension = os.path.splitext(path)[1].lstrip(".").lower()
    if not extension:
        return path.rstrip(".") + ".png"  # "name." too: matplotlib would write name.png
    from matplotlib.backend_bases import FigureCanvasBase

    supported = FigureCanvasBase.get_supported_filetypes()
    if extension not in supported:
        raise UsageError(f"--plot {path}: matplotlib writes {', '.join(sorted(supported))}, not .{extension}")
    return path


def save_plot(figure, path: str, *, dpi: int) -> None:
    """Write and close a matplotlib figure; a path that cannot be written is a usage error
    (found after the run: :func:`check_plotting` catches what it can before)."""
    import matplotlib.pyplot as plt

    try:
        figure.savefig(path, dpi=dpi)
    except OSError as error:
        raise UsageError(f"--plot {path}: {error.strerror}") from None
    finally:
        plt.close(figure)


def plot(report: Report, path: str) -> None:
    """A bar chart of the forward and forward+backward times, each pair annotated with its differences."""
    check_plotting()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [row for row in report.rows if row.forward_ms is not None]
    figure, axes = plt.subplots(figsize=(8, 1.2 + 0.6 * max(len(rows), 1)), layout="constrained")
    positions = np.arange(len(rows))
    height = 0.38
    axes.barh(positions - height / 2, [row.forward_ms for row in rows], height, label="forward")
    bars = axes.barh(positions + height / 2, [row.forward_backward_ms for row in rows], height, label="forward+backward")
    for bar, row in zip(bars, rows):
        flag = "" if row.status == "ok" else f" ({row.status})"
        axes.annotate(
            f" loss Δ {row.loss_max_abs_diff:.1e}, grad Δ {row.grad_max_abs_diff:.1e}{flag}",
            (bar.get_width(), bar.get_y() + bar.get_height() / 2), va="center", fontsize=8,
        )
    axes.set_yticks(positions, [row.backend for row in rows])
    axes.invert_yaxis()
    axes.set_xscale("log")
    if rows:  # room on the right for the annotations
        times = [time for row in rows for time in (row.forward_ms, row.forward_backward_ms)]
        axes.set_xlim(min(times) / 2, max(times) * 60)
    axes.set_xlabel(f"milliseconds (median of {report.repeats}), log scale")
    case = report.case.describe()
    axes.set_title(f"{case['source']}, {case['dtype']}, {report.device}", fontsize=10)
    figure.legend(loc="outside lower center", ncols=2, fontsize=8)
    save_plot(figure, path, dpi=120)
