"""Benchmarks: every ctc_multi backend against optax.ctc_loss and torch.nn.functional.ctc_loss.

Everything is measured in one process and one run, so the ratios are meaningful even on a noisy
machine; absolute times are not (never gate anything on them). Ratios are anchor time / our
time: above 1 means ctc_multi is faster. On a shared machine three things keep the ratios
honest: the contenders are timed in interleaved rounds (a burst of load hits all of them),
each timed call follows an untimed one of the same contender with the garbage collector off
(another contender's garbage is not collected inside it), and OpenMP threads sleep rather than
spin between parallel regions (``--omp-wait-policy``). Even so a shared machine moves a ratio
by a fifth or more from one run to the next; ``--runs N`` makes N whole runs and reports, for
each ratio and target, the median of the runs' ratios beside each run's.

    python benchmarks/run.py                     # named shapes on the CPU: table, JSON
    python benchmarks/run.py --runs 3            # three whole runs; each ratio the median of the three
    python benchmarks/run.py --device cuda       # all shapes, big included, on the first GPU
    python benchmarks/run.py --sweep T --plot t.png   # time vs T (also N, K)
    python benchmarks/run.py --memory            # peak memory of jax fwd+bwd on `long`, vs optax

The contenders (how each backend and anchor is called, on which device, with which
synchronisation) are those of ``ctc-multi compare`` (:mod:`ctc_multi.compare`), so the command
line tool and this benchmark time exactly the same calls. Shapes come from
:mod:`ctc_multi.shapes`. Frameworks are imported only when a contender needs them.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.metadata
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ctc_multi import compare
from ctc_multi.shapes import SHAPES, Shape, random_problem

HERE = Path(__file__).resolve().parent
DEFAULT_JSON = HERE / "results" / "latest.json"
CPU_SHAPES = ("small", "char", "bpe", "long", "vocab5k")  # big is sized for a GPU
GPU_SHAPES = CPU_SHAPES + ("big",)
MIN_REPEATS = 5
DIRECTIONS = ("fwd", "fwd+bwd")
# A pause before each timed call, so that the previous contender's worker threads (torch's OpenMP
# threads spin for a while after each parallel region) are idle again and do not steal its cores.
SETTLE_S = 0.01

# The targets, as (backend, direction, anchor, shapes, ratio at least); ratios are anchor / ours.
TARGETS = {
    "cpu": (
        ("jax", "fwd+bwd", "optax", ("char", "bpe", "long", "vocab5k"), 3.0),
        ("jax", "fwd", "optax", ("char", "bpe", "long", "vocab5k"), 3.0),
        ("torch", "fwd+bwd", "torch", ("char", "bpe", "long"), 2.0),
        ("torch_xla", "fwd+bwd", "torch", ("char", "bpe", "long"), 2.0),  # the opt-in: the default is the line above
        ("numpy", "fwd+bwd", "torch", ("char", "bpe", "long"), 1.0),
    ),
    "cuda": (("jax", "fwd+bwd", "optax", GPU_SHAPES, 4.0),),
}


# ---------------------------------------------------------------------------------------------
# Contenders: ctc_multi's backends and the anchors, as ctc-multi compare prepares them


CUDNN_LONGEST_LABELS = 256


def _prepare_torch_cudnn(case: compare.Case, device: str) -> compare.Prepared:
    """torch.nn.functional.ctc_loss in the only form that may take cuDNN's kernel.

    cuDNN wants targets concatenated, int32, on the CPU, every sequence full length (T frames)
    and every label sequence shorter than 256, so this variant ignores the frame padding: its
    problem has every sequence at T frames where the others' have 0.8T to T, about 1.1 times
    their work, which makes the ratios to cuDNN a little kinder to ctc_multi than a like-for-like
    one would be. Where a label sequence is too long for cuDNN the row is "unavailable" rather
    than torch's native kernel under cuDNN's name; whether cuDNN really ran is read from the
    profiler.
    """
    logits, _, labels, label_paddings = case.problem
    lengths = np.sum(label_paddings == 0, axis=1)
    if np.max(lengths, initial=0) >= CUDNN_LONGEST_LABELS:  # torch would run its native kernel under cuDNN's name
        raise compare.Unavailable(f"cuDNN takes label sequences shorter than {CUDNN_LONGEST_LABELS}; this one has {int(np.max(lengths))}")
    if device != "cuda":
        raise compare.Unavailable("cuDNN runs on CUDA only")
    import torch
    import torch.nn.functional as F

    targets = torch.as_tensor(np.concatenate([row[:n] for row, n in zip(labels, lengths)]).astype(np.int32))
    input_lengths = (logits.shape[1],) * logits.shape[0]
    target_lengths = tuple(int(n) for n in lengths)

    def loss_function(logits):
        log_probs = F.log_softmax(logits, dim=-1).transpose(0, 1)
        return F.ctc_loss(log_probs, targets, input_lengths, target_lengths, blank=case.blank_id, reduction="none")

    return compare._torch_prepared(device, loss_function, logits, ())


@dataclass(frozen=True)
class Contender:
    name: str  # as printed
    key: str  # as in --backends and the ratio columns
    anchor: bool
    requires: tuple[str, ...]
    prepare: Callable[[compare.Case, str], compare.Prepared]
    cuda_only: bool = False

    def missing(self) -> list[str]:
        import importlib.util

        return [module for module in self.requires if importlib.util.find_spec(module) is None]


def _from_compare(contender: compare.Contender, name: str, key: str) -> Contender:
    return Contender(name, key, contender.anchor, contender.requires, contender.prepare)


@contextlib.contextmanager
def torch_switch(torch_backend, name: str, value: bool):
    """Inside, the switch ``name`` of ctc_multi's torch adapter module ``torch_backend`` (or an
    earlier version's: ``ab.py``) is ``value``."""
    saved = getattr(torch_backend, name)
    setattr(torch_backend, name, value)
    try:
        yield
    finally:
        setattr(torch_backend, name, saved)


def torch_own_ops(torch_backend):
    """The torch adapter keeping torch's own ops in its loop: ``LOOP_IN_NUMPY_ON_CPU`` off, which
    on a CPU otherwise hands the loss and its gradient to NumPy's loop (what runs on CUDA,
    measured on a CPU: ``run.py``'s ``torch_ops``, ``accuracy.py``'s "torch (own ops)")."""
    return torch_switch(torch_backend, "LOOP_IN_NUMPY_ON_CPU", False)


def with_torch_switch(prepared: compare.Prepared, torch_backend, name: str, value: bool) -> compare.Prepared:
    """``prepared`` (a contender of the torch backend) with each call under :func:`torch_switch`."""

    def switched(function):
        def run():
            with torch_switch(torch_backend, name, value):
                return function()

        return run

    return replace(prepared, forward=switched(prepared.forward), forward_backward=switched(prepared.forward_backward))


def with_torch_ops(prepared: compare.Prepared, torch_backend) -> compare.Prepared:
    """``prepared`` (a contender of the torch backend) with each call under :func:`torch_own_ops`."""
    return with_torch_switch(prepared, torch_backend, "LOOP_IN_NUMPY_ON_CPU", False)


def _prepare_torch_ops(case: compare.Case, device: str) -> compare.Prepared:
    """ctc_multi's torch backend with torch's own ops in its loop (:func:`with_torch_ops`)."""
    from ctc_multi.backends import torch as torch_backend

    return with_torch_ops(compare.BACKENDS["torch"].prepare(case, device), torch_backend)


def _prepare_torch_xla(case: compare.Case, device: str) -> compare.Prepared:
    """ctc_multi's torch backend with the opt-in ``LOOP_IN_XLA_ON_CPU``: on a CPU its loop runs
    under XLA (JAX) instead of NumPy's; on CUDA the switch changes nothing, so it is not run."""
    if device != "cpu":
        raise compare.Unavailable("LOOP_IN_XLA_ON_CPU changes the CPU's loop only")
    from ctc_multi.backends import torch as torch_backend

    return with_torch_switch(compare.BACKENDS["torch"].prepare(case, device), torch_backend, "LOOP_IN_XLA_ON_CPU", True)


_COMPARE_ANCHORS = {anchor.name: anchor for anchor in compare.ANCHORS}
OURS = tuple(_from_compare(compare.BACKENDS[key], f"ctc_multi {key}", key) for key in ("numpy", "jax", "torch")) + (
    Contender("ctc_multi torch ops", "torch_ops", False, ("torch",), _prepare_torch_ops),
    Contender("ctc_multi torch xla", "torch_xla", False, ("torch", "jax"), _prepare_torch_xla),
)
ANCHORS = (
    _from_compare(_COMPARE_ANCHORS["optax.ctc_loss"], "optax.ctc_loss", "optax"),
    _from_compare(_COMPARE_ANCHORS["torch F.ctc_loss"], "torch F.ctc_loss", "torch"),
    Contender("torch F.ctc_loss cuDNN", "cudnn", True, ("torch",), _prepare_torch_cudnn, cuda_only=True),
)


def torch_ctc_kernels(function: Callable[[], Any]) -> list[str]:
    """The CTC operators torch's profiler sees while ``function`` runs (aten::_cudnn_ctc_loss or aten::_ctc_loss)."""
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU]) as profiler:
        function()
    return sorted({event.key for event in profiler.key_averages() if "ctc" in event.key and event.key.startswith("aten::_")})


# ---------------------------------------------------------------------------------------------
# Timing


@dataclass
class Timing:
    median_ms: float
    times_ms: list[float]

    @property
    def repeats(self) -> int:
        return len(self.times_ms)


def before_timed_call(function: Callable[[], Any]) -> None:
    """What a round does ahead of each timed call: a pause of SETTLE_S, the garbage of the calls
    so far collected, then one untimed call, which brings back this contender's caches and
    allocator state. (Until commit 8e8687b the collection came after the untimed call, where it
    cools the caches that call warmed; ``benchmarks/latency.py`` times each part of this.)"""
    time.sleep(SETTLE_S)
    gc.collect()
    function()


def interleaved_timings(functions: dict[Any, Callable[[], Any]], *, repeats: int, budget_s: float, warm_up: bool = True) -> dict[Any, Timing]:
    """Median of ``repeats`` calls of each function, timed in rounds of one call each, after a warm-up.

    Interleaving makes a burst of load from elsewhere on the machine hit every contender alike,
    so the ratios stay meaningful on a shared machine; SETTLE_S keeps one contender's threads
    from slowing down the next. Once ``budget_s`` has passed, the rounds
    stop at MIN_REPEATS. ``warm_up=False``: the caller has run each function once already.
    """
    for function in functions.values() if warm_up else ():
        function()
    times: dict[Any, list[float]] = {key: [] for key in functions}
    started = time.perf_counter()
    for done in range(repeats):
        if done >= MIN_REPEATS and time.perf_counter() - started > budget_s:
            break
        for key, function in functions.items():
            before_timed_call(function)
            gc.disable()  # as timeit does: no collection inside a timed call
            try:
                start = time.perf_counter()
                function()
                times[key].append(1e3 * (time.perf_counter() - start))
            finally:
                gc.enable()
    return {key: Timing(statistics.median(t), [round(x, 4) for x in t]) for key, t in times.items()}


@dataclass
class Row:
    shape: str
    contender: str
    key: str
    anchor: bool
    device: str | None = None
    fwd: Timing | None = None
    fwd_bwd: Timing | None = None
    loss_rel_diff: float | None = None  # max |loss - anchor loss| / max(1, |anchor loss|)
    grad_abs_diff: float | None = None  # max |gradient - anchor's gradient|, each entry in [-1, 1]
    kernels: list[str] = field(default_factory=list)
    ratios: dict[str, dict[str, float]] = field(default_factory=dict)  # direction -> anchor -> anchor/ours
    error: str = ""
    run: int = 1  # which of --runs measured it; 0 in the rows that combine every run (combine_runs)
    ratios_by_run: dict[str, dict[str, list[float]]] = field(default_factory=dict)  # direction -> anchor -> each run's ratio

    def timing(self, direction: str) -> Timing | None:
        return self.fwd if direction == "fwd" else self.fwd_bwd


def measure_shape(shape: Shape, contenders, *, device: str, repeats: int, budget_s: float, seed: int = 0, run: int = 1) -> list[Row]:
    case = compare.Case(random_problem(shape, seed, "float32"), blank_id=0, source=f"shape {shape}", seed=seed)
    rows, results, functions = [], {}, {}
    for contender in contenders:
        row = Row(shape.name, contender.name, contender.key, contender.anchor, run=run)
        rows.append(row)
        missing = contender.missing()
        if missing:
            row.error = f"not installed: {', '.join(missing)}"
            continue
        try:
            prepared = contender.prepare(case, device)
            row.device = prepared.device
            results[contender.name] = compare.loss_and_gradient(prepared)
            if contender.key in ("torch", "cudnn") and contender.anchor:
                row.kernels = torch_ctc_kernels(prepared.forward)
            functions[row.contender, "fwd"] = prepared.forward
            functions[row.contender, "fwd+bwd"] = prepared.forward_backward
        except compare.Unavailable as error:
            row.error = f"unavailable: {error}"
        except Exception as error:  # one failing framework must not hide the others' numbers
            row.error = f"{type(error).__name__}: {error}"
    timings = interleaved_timings(functions, repeats=repeats, budget_s=budget_s, warm_up=False)
    for row in rows:
        row.fwd, row.fwd_bwd = timings.get((row.contender, "fwd")), timings.get((row.contender, "fwd+bwd"))
        print(f"  {shape.name:8s} {row.contender:24s} {_ms(row.fwd):>10s} {_ms(row.fwd_bwd):>10s} {row.error}", file=sys.stderr, flush=True)
    _add_agreement(rows, results)
    _add_ratios(rows)
    return rows


def _add_agreement(rows: list[Row], results: dict[str, tuple[np.ndarray, np.ndarray]]) -> None:
    """Each contender's losses and gradient against optax's (torch's when optax did not run), so
    that a timed call which computes something else shows: a sanity check, not a test."""
    reference = next((results[name] for name in ("optax.ctc_loss", "torch F.ctc_loss") if name in results), None)
    for row in rows:
        if reference is not None and row.contender in results and row.key != "cudnn":  # cuDNN's problem is full-length
            (loss, grad), (reference_loss, reference_grad) = results[row.contender], reference
            difference = np.max(np.abs(loss.astype(np.float64) - reference_loss))
            row.loss_rel_diff = float(difference / max(1.0, float(np.max(np.abs(reference_loss)))))
            row.grad_abs_diff = float(np.max(np.abs(grad.astype(np.float64) - reference_grad), initial=0.0))


def _add_ratios(rows: list[Row]) -> None:
    anchors = {row.key: row for row in rows if row.anchor}
    for row in rows:
        for direction in DIRECTIONS:
            ours = row.timing(direction)
            for key, anchor in anchors.items():
                theirs = anchor.timing(direction)
                if ours and theirs and not row.anchor:
                    row.ratios.setdefault(direction, {})[key] = theirs.median_ms / ours.median_ms


def combine_runs(rows: list[Row]) -> list[Row]:
    """The rows of several runs (``--runs``) as one row per shape and contender: each ratio the
    median of the runs' ratios (not the ratio of median times: each run's ratio compares calls
    timed side by side, which times from different runs do not), with every run's ratio kept in
    ``ratios_by_run``; each time the median of the runs' medians, with those medians as its
    ``times_ms``; the largest loss difference, and the first error, of any run."""
    combined: dict[tuple[str, str], list[Row]] = {}
    for row in rows:
        combined.setdefault((row.shape, row.contender), []).append(row)

    def timing(runs: list[Row], direction: str) -> Timing | None:
        medians = [t.median_ms for t in (r.timing(direction) for r in runs) if t is not None]
        return Timing(statistics.median(medians), medians) if medians else None

    result = []
    for runs in combined.values():
        first = runs[0]
        row = Row(first.shape, first.contender, first.key, first.anchor, device=first.device, kernels=first.kernels, run=0)
        row.fwd, row.fwd_bwd = timing(runs, "fwd"), timing(runs, "fwd+bwd")
        for name in ("loss_rel_diff", "grad_abs_diff"):
            differences = [getattr(r, name) for r in runs if getattr(r, name) is not None]
            setattr(row, name, max(differences) if differences else None)
        row.error = next((r.error for r in runs if r.error), "")
        for direction in DIRECTIONS:
            for anchor in dict.fromkeys(a for r in runs for a in r.ratios.get(direction, {})):
                each = [r.ratios[direction][anchor] for r in runs if anchor in r.ratios.get(direction, {})]
                row.ratios_by_run.setdefault(direction, {})[anchor] = each
                row.ratios.setdefault(direction, {})[anchor] = statistics.median(each)
        result.append(row)
    return result


# ---------------------------------------------------------------------------------------------
# Machine


def _version(distribution: str) -> str | None:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return None


def _git(*args: str) -> str | None:
    try:
        return subprocess.run(["git", *args], cwd=HERE, capture_output=True, text=True, timeout=10).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


def machine(device: str) -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as file:
            cpu = next((line.split(":", 1)[1].strip() for line in file if line.startswith("model name")), cpu)
    except OSError:
        pass
    info: dict[str, Any] = dict(
        cpu=cpu,
        cores=os.cpu_count(),
        cores_usable=len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        load_average=os.getloadavg() if hasattr(os, "getloadavg") else None,
        python=platform.python_version(),
        platform=platform.platform(),
        versions={name: _version(name) for name in ("ctc-multi", "numpy", "jax", "jaxlib", "torch", "optax")},
        git_commit=_git("rev-parse", "--short", "HEAD"),
        git_dirty=bool(_git("status", "--porcelain", "--untracked-files=no")),
        device=device,
        omp_wait_policy=os.environ.get("OMP_WAIT_POLICY", "(OpenMP default)"),
    )
    if _version("torch"):
        import torch

        info["torch_threads"] = torch.get_num_threads()
        if device == "cuda" and torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name(0)
            info["cudnn"] = torch.backends.cudnn.version()
    if _version("jax") and device == "cuda":
        try:
            info["jax_device"] = compare.jax_device("cuda").device_kind
        except compare.Unavailable as error:
            info["jax_device"] = str(error)
    return info


def describe_machine(info: dict) -> str:
    versions = ", ".join(f"{name} {version}" for name, version in info["versions"].items() if version)
    lines = [
        f"machine: {info['cpu']}, {info['cores']} cores ({info['cores_usable']} usable), load average "
        + (" ".join(f"{x:.2f}" for x in info["load_average"]) if info["load_average"] else "?"),
        f"python {info['python']} on {info['platform']}; {versions}",
        f"ctc_multi at git {info['git_commit']}{' + uncommitted changes' if info['git_dirty'] else ''}; device {info['device']}"
        + (f"; torch threads {info['torch_threads']}" if "torch_threads" in info else "")
        + f"; OMP_WAIT_POLICY {info['omp_wait_policy']}",
    ]
    if "gpu" in info or "jax_device" in info:
        lines.append(f"gpu: {info.get('gpu') or info.get('jax_device')} (cuDNN {info.get('cudnn')})")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Output


def _ms(timing: Timing | None) -> str:
    return "—" if timing is None else f"{timing.median_ms:.2f}"


def _ratio(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.2f}x" if value >= 0.1 else f"{value:.3f}x"


def shape_table(shape: Shape, rows: list[Row], anchors: list[str]) -> str:
    header = f"{'contender':24s} {'fwd ms':>10s} {'n':>3s} {'fwd+bwd ms':>11s} {'n':>3s}"
    header += "".join(f" {d + ' ' + a:>14s}" for d in DIRECTIONS for a in anchors) + f" {'loss Δrel':>9s} {'grad Δ':>8s}"
    lines = [f"{shape}", header]
    for row in rows:
        line = f"{row.contender:24s} {_ms(row.fwd):>10s} {row.fwd.repeats if row.fwd else '':>3} {_ms(row.fwd_bwd):>11s} {row.fwd_bwd.repeats if row.fwd_bwd else '':>3}"
        line += "".join(f" {_ratio(row.ratios.get(d, {}).get(a)) if not row.anchor else 'anchor':>14s}" for d in DIRECTIONS for a in anchors)
        line += f" {row.loss_rel_diff:9.1e}" if row.loss_rel_diff is not None else f" {'':9s}"
        line += f" {row.grad_abs_diff:8.1e}" if row.grad_abs_diff is not None else f" {'':8s}"
        notes = [note for note in (row.error, ", ".join(row.kernels)) if note]
        lines.append(line + ("  " + "; ".join(notes) if notes else ""))
    return "\n".join(lines)


RATIOS_TITLE = "ratios anchor time / ctc_multi time (> 1: ctc_multi faster)"


def summary_table(rows: list[Row], shapes: list[str], anchors: list[str], title: str = RATIOS_TITLE) -> str:
    lines = [title, f"{'backend':8s} {'direction':8s} {'vs':6s}" + "".join(f" {s:>8s}" for s in shapes)]
    for key in dict.fromkeys(row.key for row in rows if not row.anchor):
        for direction in DIRECTIONS:
            for anchor in anchors:
                cells = []
                for shape in shapes:
                    row = next((r for r in rows if r.shape == shape and r.key == key and not r.anchor), None)
                    cells.append(_ratio(row.ratios.get(direction, {}).get(anchor)) if row else "—")
                lines.append(f"{key:8s} {direction:8s} {anchor:6s}" + "".join(f" {c:>8s}" for c in cells))
    return "\n".join(lines)


def check_targets(rows: list[Row], device: str) -> list[dict]:
    results = []
    for key, direction, anchor, shapes, at_least in TARGETS[device]:
        for shape in shapes:
            row = next((r for r in rows if r.shape == shape and r.key == key and not r.anchor), None)
            ratio = row.ratios.get(direction, {}).get(anchor) if row else None
            if ratio is not None:
                result = dict(backend=key, direction=direction, anchor=anchor, shape=shape, target=at_least, ratio=ratio, met=ratio >= at_least)
                if row.ratios_by_run:
                    result["ratios_by_run"] = row.ratios_by_run[direction][anchor]
                results.append(result)
    return results


def targets_text(results: list[dict], runs: int = 1) -> str:
    where = "in this run" if runs == 1 else f"the median of {runs} runs' ratios, each run's in brackets"
    lines = [f"targets (issue 4; ratio anchor / ours, {where}):"]
    if not results:  # `--shapes small`: the targets are set on other shapes
        lines.append("  none on these shapes and backends (see TARGETS in benchmarks/run.py)")
    for r in results:
        each = f" ({', '.join(f'{x:.2f}' for x in r['ratios_by_run'])})" if len(r.get("ratios_by_run", ())) > 1 else ""
        lines.append(
            f"  {'MET    ' if r['met'] else 'NOT MET'} {r['backend']:6s} {r['direction']:8s} vs {r['anchor']:6s} on {r['shape']:8s}"
            f" {r['ratio']:6.2f}x{each} (target >= {r['target']:g}x)"
        )
    return "\n".join(lines)


def default_json_path(args) -> Path:
    """latest.json for the shapes table; memory.json and sweep_<D>.json beside it for the other modes."""
    if args.memory:
        return DEFAULT_JSON.with_name("memory.json")
    if args.sweep:
        return DEFAULT_JSON.with_name(f"sweep_{args.sweep}.json")
    return DEFAULT_JSON


def write_json(path: Path, data: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)

    path.write_text(json.dumps(data, indent=1) + "\n")


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(figure, path: str) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=120)
    print(f"plot written to {path}")


def plot_shapes(rows: list[Row], path: str) -> None:
    """Forward+backward time vs T, one line per contender, each point labelled with its shape."""
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(8, 5), layout="constrained")
    for name in dict.fromkeys(row.contender for row in rows):
        points = sorted((SHAPES[r.shape].T, r.fwd_bwd.median_ms, r.shape) for r in rows if r.contender == name and r.fwd_bwd)
        if points:
            style = "--" if any(r.anchor for r in rows if r.contender == name) else "-"
            axes.plot([p[0] for p in points], [p[1] for p in points], style, marker="o", label=name)
    ticks = sorted({(SHAPES[r.shape].T, r.shape) for r in rows})
    axes.set_xscale("log")
    axes.set_xticks([T for T, _ in ticks], [f"{T}\n{shape}" for T, shape in ticks], minor=False)
    axes.minorticks_off()
    axes.set(yscale="log", xlabel="T (frames) and shape; the shapes differ in B, K, N too", ylabel="forward+backward ms (median)")
    axes.legend(fontsize=8)
    _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Scaling sweeps: cost is linear in T*N; K enters only through the log-softmax


SWEEPS = {
    "T": [Shape(f"T{t}", B=8, T=t, K=64, N=40) for t in (128, 256, 512, 1024, 2048)],
    "N": [Shape(f"N{n}", B=8, T=1000, K=64, N=n) for n in (25, 50, 100, 200, 400)],
    "K": [Shape(f"K{k}", B=8, T=400, K=k, N=80) for k in (32, 128, 512, 2048, 8192)],
}


def _prepare_log_softmax(case: compare.Case, device: str) -> compare.Prepared:
    """jax.nn.log_softmax alone, forward+backward: the only part of the loss whose cost depends on K."""
    import jax
    import jax.numpy as jnp

    logits = jax.device_put(case.problem.logits, compare.jax_device(device))
    weights = jax.device_put(np.random.default_rng(0).standard_normal(logits.shape).astype(logits.dtype), logits.device)
    forward = jax.jit(lambda x: jnp.sum(jax.nn.log_softmax(x) * weights))
    forward_backward = jax.jit(jax.value_and_grad(lambda x: jnp.sum(jax.nn.log_softmax(x) * weights)))
    return compare.Prepared(
        str(logits.device),
        forward=lambda: forward(logits).block_until_ready(),
        forward_backward=lambda: jax.block_until_ready(forward_backward(logits)),
        to_numpy=np.asarray,
    )


SWEEP_CONTENDERS = (OURS[1], OURS[0], ANCHORS[0])
LOG_SOFTMAX = Contender("jax log_softmax alone", "log_softmax", True, ("jax",), _prepare_log_softmax)


def run_sweep(dimension: str, args) -> dict:
    contenders = [c for c in SWEEP_CONTENDERS if c.key in args.backends or c.anchor]
    if dimension == "K":
        contenders.append(LOG_SOFTMAX)
    results = {}
    for shape in SWEEPS[dimension]:
        case = compare.Case(random_problem(shape, 0, "float32"), blank_id=0, source=str(shape))
        functions = {c.name: c.prepare(case, args.device).forward_backward for c in contenders if not c.missing()}
        for name, timing in interleaved_timings(functions, repeats=args.repeats, budget_s=args.budget).items():
            results.setdefault(name, []).append(dict(shape=asdict(shape), ms=timing.median_ms, repeats=timing.repeats))
            print(f"  {shape.name:6s} {name:24s} {timing.median_ms:10.2f} ms", file=sys.stderr, flush=True)
    return results


def sweep_text(dimension: str, results: dict) -> str:
    values = [getattr(s, dimension) for s in SWEEPS[dimension]]
    fixed = ", ".join(f"{d}={getattr(SWEEPS[dimension][0], d)}" for d in "BTKN" if d != dimension)
    lines = [f"sweep over {dimension} ({fixed}); forward+backward ms, median", f"{'contender':24s}" + "".join(f"{dimension + '=' + str(v):>10s}" for v in values) + "  log-log slope"]
    for name, points in results.items():
        ms = [p["ms"] for p in points]
        slope = np.polyfit(np.log(values[: len(ms)]), np.log(ms), 1)[0] if len(ms) > 1 else float("nan")
        lines.append(f"{name:24s}" + "".join(f"{m:10.2f}" for m in ms) + f"  {slope:5.2f}")
    if dimension in "TN":
        lines.append(f"slope 1 = linear in {dimension}, so in T*N with the other fixed; per B*T*N lattice cells (ns/cell):")
        for name, points in results.items():
            cells = [p["shape"]["B"] * p["shape"]["T"] * p["shape"]["N"] for p in points]
            lines.append(f"{name:24s}" + "".join(f"{1e6 * p['ms'] / c:10.2f}" for p, c in zip(points, cells)))
    else:
        base = {name: points[0]["ms"] for name, points in results.items()}
        lines.append(f"growth over {dimension}={values[0]} (ms added), against the log-softmax's own growth:")
        for name, points in results.items():
            lines.append(f"{name:24s}" + "".join(f"{p['ms'] - base[name]:+10.2f}" for p in points))
    return "\n".join(lines)


def plot_sweep(dimension: str, results: dict, path: str) -> None:
    plt = _pyplot()
    figure, axes = plt.subplots(figsize=(7, 4.5), layout="constrained")
    for name, points in results.items():
        axes.plot([p["shape"][dimension] for p in points], [p["ms"] for p in points], marker="o", label=name)
    axes.set(xscale="log", yscale="log", xlabel=dimension, ylabel="forward+backward ms (median)", title=f"CTC cost vs {dimension}")
    axes.legend(fontsize=8)
    _save(figure, path)


# ---------------------------------------------------------------------------------------------
# Memory: jax forward+backward on `long`, each implementation in a fresh process


def _rss_kib(field_name: str) -> int | None:
    try:
        with open("/proc/self/status") as file:
            return next(int(line.split()[1]) for line in file if line.startswith(field_name + ":"))
    except (OSError, StopIteration):
        return None


def memory_child(name: str, shape: Shape, device: str) -> dict:
    """Runs in its own process: compiled memory analysis and measured peak of one jitted fwd+bwd."""
    import resource

    import jax
    import jax.numpy as jnp
    import optax

    import ctc_multi

    loss_function = {"ctc_multi": ctc_multi.ctc_loss, "optax": optax.ctc_loss}[name]
    target = compare.jax_device(device)
    arrays = [jax.device_put(a, target) for a in random_problem(shape, 0, "float32")]
    step = jax.jit(jax.value_and_grad(lambda logits, *others: jnp.sum(loss_function(logits, *others))))
    compiled = step.lower(*arrays).compile()
    analysis = compiled.memory_analysis()
    result: dict[str, Any] = dict(implementation=name, shape=asdict(shape), device=str(target))
    if analysis is not None:
        for key in ("temp", "argument", "output", "alias", "generated_code"):
            result[f"{key}_bytes"] = int(getattr(analysis, f"{key}_size_in_bytes", 0))
        result["compiled_total_bytes"] = result["temp_bytes"] + result["argument_bytes"] + result["output_bytes"] - result["alias_bytes"]
    # The peak is taken from right after compiling, so that it includes the first run: later runs
    # reuse memory the allocator already holds, and their rise would say nothing.
    rss_before = _rss_kib("VmRSS")
    try:  # "5" resets the peak resident set size (VmHWM) to the current one (Linux >= 4.0)
        with open("/proc/self/clear_refs", "w") as file:
            file.write("5")
        result["peak_reset"] = True
    except OSError:
        result["peak_reset"] = False
    for _ in range(3):
        jax.block_until_ready(compiled(*arrays))
    peak = _rss_kib("VmHWM")
    result["rss_before_run_bytes"] = 1024 * rss_before if rss_before else None
    result["rss_peak_bytes"] = 1024 * peak if peak else None
    result["rss_peak_increase_bytes"] = 1024 * (peak - rss_before) if peak and rss_before and result["peak_reset"] else None
    result["ru_maxrss_bytes"] = 1024 * resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # whole life, compile included
    if target.platform == "gpu":
        stats = target.memory_stats() or {}
        result["device_peak_bytes"] = stats.get("peak_bytes_in_use")
    return result


def run_memory(shape_name: str, device: str) -> list[dict]:
    results = []
    for name in ("ctc_multi", "optax"):
        command = [sys.executable, __file__, "--memory-child", name, "--shapes", shape_name, "--device", device]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            results.append(dict(implementation=name, error=done.stderr.strip()[-2000:]))
        else:
            results.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return results


def memory_text(shape_name: str, results: list[dict]) -> str:
    def mib(value):
        return "—" if value is None else f"{value / 2**20:9.1f}"

    columns = (
        ("temp", "temp_bytes"), ("args", "argument_bytes"), ("output", "output_bytes"), ("compiled", "compiled_total_bytes"),
        ("RSS peak+", "rss_peak_increase_bytes"), ("RSS peak", "rss_peak_bytes"), ("device peak", "device_peak_bytes"),
    )
    lines = [
        f"memory: jax.jit(jax.value_and_grad(sum loss)) on {SHAPES[shape_name]}, each in a fresh process; MiB",
        "  compiled = temp + args + output - aliased (XLA's memory_analysis); RSS peak+ = rise of the peak resident set"
        " during three runs over the resident set after compiling (first run included)",
        f"{'implementation':16s}" + "".join(f" {title:>11s}" for title, _ in columns),
    ]
    for r in results:
        if "error" in r:
            lines.append(f"{r['implementation']:16s} failed: {r['error'].splitlines()[-1] if r['error'] else '?'}")
        else:
            lines.append(f"{r['implementation']:16s}" + "".join(f" {mib(r.get(key)):>11s}" for _, key in columns))
    ok = {r["implementation"]: r for r in results if "error" not in r}
    on_device = any(r.get("device_peak_bytes") for r in ok.values())
    if on_device:  # the arrays live in the GPU's memory: the host's resident set says nothing of them
        lines.append("  RSS: the host's memory, not compared; on a GPU the device peak is the comparison")
    if len(ok) == 2:
        for title, key in columns[3:]:
            if on_device and key.startswith("rss_"):
                continue
            ours, theirs = ok["ctc_multi"].get(key), ok["optax"].get(key)
            if ours and theirs:
                lines.append(f"  {title}: ctc_multi / optax = {ours / theirs:.2f}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# Command line


def _names(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def use_occupancy(way: str, backends) -> None:
    """Have the adapters of ``backends`` (and NumPy's, which runs torch's loop on a CPU) compute
    the gradient's occupancies ``way`` ("shares" or "mirror"), whatever their own choice."""
    from ctc_multi import lattice

    function = getattr(lattice, f"forward_and_occupancy_by_{way}")
    chosen = {"jax", "torch"} & {key.removesuffix("_ops").removesuffix("_xla") for key in backends}
    if "torch_xla" in backends:  # its loop is the JAX adapter's
        chosen.add("jax")
    for name in {"numpy"} | {name for name in chosen if importlib.util.find_spec(name)}:  # not installed: not run
        importlib.import_module(f"ctc_multi.backends.{name}").forward_and_occupancy = function


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", type=_names, help=f"named shapes among {','.join(SHAPES)} (default cpu: {','.join(CPU_SHAPES)}; cuda: all)")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="jax and torch run there; numpy always on the CPU")
    parser.add_argument("--repeats", type=int, default=7, help=f"timed calls after a warm-up; the median is reported (at least {MIN_REPEATS})")
    parser.add_argument("--budget", type=float, default=60.0, help=f"seconds of timed rounds per shape after which they stop at {MIN_REPEATS}")
    parser.add_argument(
        "--runs",
        type=int,
        default=1,
        help="whole runs over every shape, one after the other in this process; with more than one, the summary and the"
        " targets take each ratio as the median of the runs' ratios, and the plot each time as the median of the runs'"
        " times (the README's table: --runs 3)",
    )
    parser.add_argument("--backends", type=_names, help="ctc_multi backends (default numpy,jax,torch,torch_ops,torch_xla: torch_ops is the torch backend with torch's own ops in its loop, which on a CPU otherwise runs NumPy's, torch_xla the torch backend with the opt-in LOOP_IN_XLA_ON_CPU; on --device cuda the default is jax,torch)")
    parser.add_argument("--torch-threads", type=int, help="torch.set_num_threads (default: torch's own choice)")
    parser.add_argument(
        "--omp-wait-policy",
        choices=("passive", "default"),
        default="passive",
        help="passive (default, unless OMP_WAIT_POLICY is set): OpenMP threads sleep instead of spinning between "
        "parallel regions; on a busy machine spinning threads make torch's times swing by 5-10x, most of all for "
        "ctc_multi's torch backend (many small ops). default: leave OpenMP's own policy",
    )
    parser.add_argument(
        "--json",
        type=Path,
        default=None,
        help=f"where to write the results (default {DEFAULT_JSON.relative_to(HERE.parent)}; with --memory memory.json,"
        " with --sweep D sweep_D.json, beside it, so no mode overwrites another's results)",
    )
    parser.add_argument(
        "--occupancy",
        choices=("default", "shares", "mirror"),
        default="default",
        help="how the backends get the occupancies behind the gradient: each adapter's own (default: the shares for "
        "numpy and for jax on a CPU, the mirror image for torch's own ops and for jax elsewhere), or the one named for all (ctc_multi.lattice."
        "forward_and_occupancy_by_shares / _by_mirror)",
    )
    parser.add_argument("--plot", metavar="PATH.png", help="draw time vs T (or vs the swept dimension)")
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--sweep", choices=tuple(SWEEPS), help="time vs one dimension for jax, numpy and optax, with the fitted slope")
    mode.add_argument("--memory", action="store_true", help="peak memory of jax fwd+bwd on `long` (or --shapes), ctc_multi vs optax, in separate processes")
    mode.add_argument("--memory-child", choices=("ctc_multi", "optax"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    args.repeats = max(args.repeats, MIN_REPEATS)
    if args.runs < 1:
        parser.error(f"--runs must be at least 1; got {args.runs}")
    if args.runs > 1 and (args.memory or args.sweep):
        parser.error("--runs applies to the shapes table, not to --memory or --sweep")
    if args.backends is None:  # numpy is CPU-only: on a GPU machine it would only time the host
        args.backends = ["jax", "torch"] if args.device == "cuda" else ["numpy", "jax", "torch", "torch_ops", "torch_xla"]
    unknown = set(args.backends) - {c.key for c in OURS}
    if unknown:
        parser.error(f"unknown backend(s) {', '.join(sorted(unknown))}; choose from {', '.join(c.key for c in OURS)}")
    unknown = set(args.shapes or ()) - set(SHAPES)
    if unknown:
        parser.error(f"unknown shape(s) {', '.join(sorted(unknown))}; choose from {', '.join(SHAPES)}")
    try:  # before the run, not after it: it ran, then a bad path lost its results in a traceback
        if args.json:
            compare.check_directory("--json", args.json)
        if args.plot:
            args.plot = compare.check_plotting(args.plot)
    except compare.UsageError as error:
        parser.error(str(error))
    if args.device == "cuda" and not args.memory_child and not any(_sees_a_gpu(framework) for framework in ("torch", "jax")):
        # otherwise every contender is "unavailable", no target is checked, and latest.json is overwritten with that
        parser.error("--device cuda: neither torch nor jax sees a GPU here")
    return args


def _sees_a_gpu(framework: str) -> bool:
    if importlib.util.find_spec(framework) is None:
        return False
    try:
        (compare.torch_device if framework == "torch" else compare.jax_device)("cuda")
        return True
    except compare.Unavailable:
        return False


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.memory_child:
        print(json.dumps(memory_child(args.memory_child, SHAPES[(args.shapes or ["long"])[0]], args.device)))
        return 0
    if args.omp_wait_policy == "passive":  # read when torch initialises OpenMP: before any contender imports it
        os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.torch_threads:
        import torch

        torch.set_num_threads(args.torch_threads)
    info = machine(args.device)
    print(describe_machine(info), flush=True)
    if args.occupancy != "default":
        use_occupancy(args.occupancy, args.backends)
        print(f"occupancies of every backend: {args.occupancy}", flush=True)
    data: dict[str, Any] = dict(machine=info, arguments={k: str(v) for k, v in vars(args).items()})
    if args.memory:
        shape_name = (args.shapes or ["long"])[0]
        data["memory"] = run_memory(shape_name, args.device)
        print(memory_text(shape_name, data["memory"]))
    elif args.sweep:
        results = run_sweep(args.sweep, args)
        data["sweep"] = dict(dimension=args.sweep, results=results)
        print(sweep_text(args.sweep, results))
    else:
        shapes = args.shapes or list(GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
        contenders = [c for c in OURS if c.key in args.backends] + [c for c in ANCHORS if args.device == "cuda" or not c.cuda_only]
        anchors = [c.key for c in contenders if c.anchor]
        print(
            f"float32; median of {args.repeats} timed calls after one warm-up, in interleaved rounds (one call of every"
            f" contender per round; a shape past {args.budget:g} s stops at {MIN_REPEATS} rounds: column n); jax under jax.jit, fwd+bwd = value_and_grad of the summed loss; torch fwd+bwd ="
            " autograd; numpy fwd+bwd = ctc_loss_and_grad; torch F.ctc_loss gets torch.log_softmax in front",
            flush=True,
        )
        started = time.perf_counter()
        measured: list[Row] = []
        for run in range(1, args.runs + 1):
            if args.runs > 1:
                print(f"\n=== run {run} of {args.runs} ===", flush=True)
            rows = []
            for name in shapes:
                shape_rows = measure_shape(SHAPES[name], contenders, device=args.device, repeats=args.repeats, budget_s=args.budget, run=run)
                rows += shape_rows
                print("\n" + shape_table(SHAPES[name], shape_rows, anchors), flush=True)
            print("\n" + summary_table(rows, shapes, anchors, title=f"run {run} of {args.runs}: {RATIOS_TITLE}" if args.runs > 1 else RATIOS_TITLE))
            measured += rows
        rows = combine_runs(measured) if args.runs > 1 else measured
        targets = check_targets(rows, args.device)
        if args.runs > 1:
            print("\n" + summary_table(rows, shapes, anchors, title=f"median of the {args.runs} runs' {RATIOS_TITLE}"))
        print("\n" + targets_text(targets, args.runs))
        print(f"\ntotal {time.perf_counter() - started:.0f} s; load average at the end " + " ".join(f"{x:.2f}" for x in os.getloadavg()))
        data.update(runs=args.runs, results=[asdict(row) for row in measured], targets=targets)
        if args.runs > 1:
            data["combined"] = [asdict(row) for row in rows]
    path = args.json or default_json_path(args)
    write_json(path, data)
    print(f"results written to {path}")
    if args.plot and args.sweep:
        plot_sweep(args.sweep, data["sweep"]["results"], args.plot)
    elif args.plot and not args.memory:
        plot_shapes(rows, args.plot)
    return 0


if __name__ == "__main__":
    sys.exit(main())
