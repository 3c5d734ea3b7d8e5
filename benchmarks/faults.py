"""NumPy's ``ctc_loss_and_grad`` alone in this process: time and page faults per call, with its
large scratch arrays kept between calls (``ctc_multi.backends.numpy.REUSE_SCRATCH``, the
default) or made afresh each time.

    python benchmarks/faults.py                       # char and long, kept
    python benchmarks/faults.py --fresh               # the same, REUSE_SCRATCH = False
    python benchmarks/faults.py --shapes bpe --calls 21

Each call's minor page faults come from ``resource.getrusage`` (Linux, macOS): a fault is a
page of memory that the system hands the process afresh, where glibc's malloc gave freed
memory back after an earlier call. Run one setting per process, so that neither leaves the
other its heap; ``run.py`` times every contender in one process, where the heap is shared.
"""

from __future__ import annotations

import argparse
import resource
import statistics
import time

import ctc_multi
from ctc_multi.backends import numpy as numpy_backend
from ctc_multi.shapes import SHAPES, random_problem


def timed_calls(shape_name: str, calls: int) -> tuple[float, float]:
    """Median milliseconds and minor page faults per call, after two untimed calls."""
    problem = random_problem(SHAPES[shape_name], 0, "float32")
    for _ in range(2):
        ctc_multi.ctc_loss_and_grad(*problem)
    times, faults = [], []
    for _ in range(calls):
        before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
        start = time.perf_counter()
        ctc_multi.ctc_loss_and_grad(*problem)
        times.append(time.perf_counter() - start)
        faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
    return statistics.median(times) * 1e3, statistics.median(faults)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="char,long", help="comma-separated names from ctc_multi.shapes.SHAPES")
    parser.add_argument("--calls", type=int, default=15, help="timed calls per shape (the median is printed)")
    parser.add_argument("--fresh", action="store_true", help="REUSE_SCRATCH = False: every scratch array made afresh")
    args = parser.parse_args(argv)
    numpy_backend.REUSE_SCRATCH = not args.fresh
    setting = "fresh" if args.fresh else "kept"
    for name in args.shapes.split(","):
        milliseconds, faults = timed_calls(name, max(args.calls, 1))
        print(f"{name:8s} scratch {setting:5s} {milliseconds:8.1f} ms {faults:8.0f} page faults a call", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
