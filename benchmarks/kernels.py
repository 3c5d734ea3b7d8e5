"""Where a compiled JAX call spends its time, kernel by kernel, from JAX's own profiler.

    python benchmarks/kernels.py                              # char, forward+backward
    python benchmarks/kernels.py --shape long --direction fwd --top 20

The JAX backend on a random problem of the named shape, as ``ctc-multi compare`` and
``benchmarks/run.py`` prepare it (``--direction fwd``: ``jax.jit`` of ``ctc_loss``;
``fwd+bwd``, the default: of the summed loss's ``value_and_grad``), is called once, then
``--calls`` times under ``jax.profiler.trace``. Every event the trace holds is summed by name:
for each XLA kernel (a fusion, a copy, a whole ``while`` loop, ...) how many times it ran per
call, its time per call and its time per run. A scan's loop body shows up as the fusions it
became, each run once per loop step (``unroll`` copies of each), so this says what one lattice
step costs and which of its kernels cost most; a loop's own time holds its body's kernels.

The profiler adds about a microsecond to each event, so the totals run above
``benchmarks/run.py``'s times; compare kernels within one run. To read what each fusion
computes, run with ``XLA_FLAGS=--xla_dump_to=DIR``: XLA writes each compiled module's HLO there.

``--timeline US`` profiles one call instead and lists, in the order they started, its events
of at least US microseconds: when each started (ms into the call), how long it ran, and on
which thread. That shows what runs one after another and what runs at once (README,
Performance: XLA:CPU runs these kernels in turn)::

    python benchmarks/kernels.py --shape vocab5k --timeline 500
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

from ctc_multi.shapes import SHAPES, random_problem


def prepared_call(shape_name: str, direction: str, device: str = "cpu", contender=None):
    """``contender``'s call of ``direction`` on a random problem of the shape (seed 0), on
    ``device`` ("cpu" or "cuda"), as ``ctc-multi compare`` prepares it; it blocks until done.
    The contender is one of ``compare.BACKENDS`` or ``compare.ANCHORS``; by default the JAX
    backend. Raises ``compare.Unavailable`` where the device is not there."""
    from ctc_multi import compare

    contender = compare.BACKENDS["jax"] if contender is None else contender
    case = compare.Case(random_problem(SHAPES[shape_name], 0, "float32"), blank_id=0, source=f"shape {shape_name}", seed=0)
    prepared = contender.prepare(case, device)
    return prepared.forward if direction == "fwd" else prepared.forward_backward


def _profiled_events(call, calls: int):
    """[(plane name, thread name, event)] of every event of ``calls`` profiled calls of ``call``
    (no arguments, blocks until done), after one outside the trace (compilation, first-touch
    of buffers). Left out: the Python calls that waited on the kernels, the runtime's marks of
    a kernel's end, and its executor's spans, which hold the kernels (each loop body has one
    per step)."""
    import jax
    from jax.profiler import ProfileData

    call()
    with tempfile.TemporaryDirectory() as trace_dir:
        with jax.profiler.trace(trace_dir):
            for _ in range(calls):
                call()
        (trace_file,) = Path(trace_dir).rglob("*.xplane.pb")
        profile = ProfileData.from_file(str(trace_file))
        return [
            (plane.name, line.name, event)
            for plane in profile.planes
            for line in plane.lines
            if line.name != "python"
            for event in line.events
            if not event.name.startswith(("end: ", "ThunkExecutor::"))
        ]


def _event_name(plane_name: str, event) -> str:
    # A GPU's kernels (its plane, e.g. /device:GPU:0) are told from the host's.
    return event.name if plane_name.startswith("/host") else f"[{plane_name}] {event.name}"


def kernel_times(call, calls: int) -> dict[str, tuple[float, float]]:
    """{event name: (runs per call, microseconds per call)} over ``calls`` profiled calls of
    ``call`` (see :func:`_profiled_events`)."""
    totals: dict[str, list[float]] = defaultdict(lambda: [0, 0.0])
    for plane_name, _, event in _profiled_events(call, calls):
        name = _event_name(plane_name, event)
        totals[name][0] += 1
        totals[name][1] += event.duration_ns
    return {name: (runs / calls, total_ns / calls / 1e3) for name, (runs, total_ns) in totals.items()}


def timeline(call, min_us: float) -> list[tuple[float, float, int, str]]:
    """[(start ms, duration ms, thread number, event name)] of one profiled call's events of at
    least ``min_us`` microseconds, in the order they started; the start counts from the first
    event of the call, and threads are numbered in the order they first appear."""
    events = [(event.start_ns, event.duration_ns, (plane_name, thread), _event_name(plane_name, event)) for plane_name, thread, event in _profiled_events(call, 1)]
    if not events:
        return []
    first = min(start for start, *_ in events)
    threads: dict[tuple[str, str], int] = {}
    rows = []
    for start, duration, thread, name in sorted(events, key=lambda event: event[0]):
        number = threads.setdefault(thread, len(threads))
        if duration >= min_us * 1e3:
            rows.append(((start - first) / 1e6, duration / 1e6, number, name))
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="char", choices=tuple(SHAPES))
    parser.add_argument("--direction", choices=("fwd", "fwd+bwd"), default="fwd+bwd")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--calls", type=int, default=5, help="profiled calls (at least 1)")
    parser.add_argument("--top", type=int, default=30, help="how many events to print, costliest first")
    parser.add_argument("--timeline", type=float, metavar="US", help="instead: one profiled call's events of at least US microseconds, in the order they started, with their threads")
    args = parser.parse_args(argv)
    if args.calls < 1:
        parser.error(f"--calls must be at least 1, got {args.calls}")
    if args.timeline is not None and args.timeline < 0:
        parser.error(f"--timeline must be at least 0 microseconds, got {args.timeline:g}")
    from ctc_multi import compare

    try:
        call = prepared_call(args.shape, args.direction, args.device)
    except compare.Unavailable as reason:
        parser.error(f"--device {args.device}: {reason}")
    if args.timeline is not None:
        print(f"{SHAPES[args.shape]}, jax {args.direction} on {args.device}, one profiled call: events of at least {args.timeline:g} us")
        print(f"{'start ms':>9} {'ms':>8} {'thread':>6}  event")
        for start, duration, thread, name in timeline(call, args.timeline):
            print(f"{start:9.3f} {duration:8.3f} {thread:6d}  {name}")
        return 0
    times = kernel_times(call, args.calls)
    print(f"{SHAPES[args.shape]}, jax {args.direction} on {args.device}, {args.calls} profiled calls")
    print(f"{'us per call':>12} {'runs':>7} {'us per run':>11}  event")
    for name, (runs, micros) in sorted(times.items(), key=lambda item: -item[1][1])[: args.top]:
        print(f"{micros:12.1f} {runs:7g} {micros / runs:11.2f}  {name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
