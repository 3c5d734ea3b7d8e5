"""What run.py's way of timing adds to one short call: ctc_multi's JAX forward+backward and
optax's, timed back to back and under each of the things a run.py round does before its timed
call.

    python benchmarks/latency.py [--shape small] [--device cpu|cuda] [--repeats 21]

run.py times each contender in rounds (``interleaved_timings``): ahead of each timed call, a
pause of SETTLE_S, ``gc.collect()`` and one untimed call (``run.before_timed_call``; until
commit 8e8687b the collection came after the untimed call), and the collector is off during
it; its process holds torch (with a CUDA context on a GPU) beside JAX. On an H100, small's
forward+backward took 0.95 ms in run.py at that commit and 0.36 ms back to back
(``gpu_unroll.py``). This times the median of
``--repeats`` calls of both JAX contenders ("ms") in each way, first without torch in the
process and then with torch imported (and, on ``cuda``, its CUDA context made), so the part
that adds the time shows itself.
"""

from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import kernels  # noqa: E402  (benchmarks/kernels.py: the prepared calls)
import run  # noqa: E402  (benchmarks/run.py: SETTLE_S and the round)

from ctc_multi import compare  # noqa: E402
from ctc_multi.shapes import SHAPES  # noqa: E402


def back_to_back(call):
    """nothing"""


def after_pause(call):
    time.sleep(run.SETTLE_S)


def after_untimed_call(call):
    call()


def after_pause_and_untimed_call(call):
    time.sleep(run.SETTLE_S)
    call()


def after_gc_collect(call):
    gc.collect()


def as_run_py_did(call):
    """run.py's round until commit 8e8687b: the collection after the untimed call."""
    time.sleep(run.SETTLE_S)
    call()
    gc.collect()


def as_run_py_does(call):
    run.before_timed_call(call)


WAYS = (back_to_back, after_pause, after_untimed_call, after_pause_and_untimed_call, after_gc_collect, as_run_py_did, as_run_py_does)


def median_ms(call, before, repeats: int) -> float:
    """Median of ``repeats`` timed calls, ``before(call)`` untimed ahead of each; the collector is
    off during each timed call, as in run.py."""
    times = []
    for _ in range(repeats):
        before(call)
        gc.disable()
        try:
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
        finally:
            gc.enable()
    return statistics.median(times)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shape", default="small", choices=tuple(SHAPES))
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--repeats", type=int, default=21, help="timed calls per way (at least 1)")
    args = parser.parse_args(argv)
    if args.repeats < 1:
        parser.error(f"--repeats must be at least 1, got {args.repeats}")
    try:
        calls = {contender.name: kernels.prepared_call(args.shape, "fwd+bwd", args.device, contender)
                 for contender in (compare.BACKENDS["jax"], compare.ANCHORS[0])}
    except compare.Unavailable as reason:
        parser.error(f"--device {args.device}: {reason}")
    for call in calls.values():
        call()  # compiles
    print(f"{SHAPES[args.shape]}, jax fwd+bwd on {args.device}, median of {args.repeats} calls, ms")
    print(f"{'torch in the process':22s} {'before each timed call':30s}" + "".join(f"{name:>16s}" for name in calls))
    for with_torch in (False, True):
        if with_torch:
            import torch

            if args.device == "cuda":
                torch.zeros(1, device="cuda").sum().item()  # torch's CUDA context beside JAX's
        for way in WAYS:
            times = [median_ms(call, way, args.repeats) for call in calls.values()]
            print(f"{'yes' if with_torch else 'no':22s} {way.__name__.replace('_', ' '):30s}" + "".join(f"{t:16.3f}" for t in times), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
