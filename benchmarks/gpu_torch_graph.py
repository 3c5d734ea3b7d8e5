"""The torch backend on CUDA replayed from a CUDA graph, against eager calls and torch's kernel.

    python benchmarks/gpu_torch_graph.py [--shapes char,long,big] [--repeats 10]

On CUDA the torch backend's loop costs a few kernel launches from Python per frame, whatever
the sizes (README, Performance). ``ctc_loss_and_grad`` reads no value from the GPU while a
stream captures, so it can be captured once in a ``torch.cuda.CUDAGraph`` and replayed with new
logits copied into the captured input. This prints, per shape, the median time of an eager
call, of a replay, and of ``torch.nn.functional.ctc_loss`` forward+backward (with
``torch.log_softmax`` in front) in the same run, and how far the replay's results are from the
eager call's. Part of benchmarks/gpu_check.sh; without CUDA it says so and exits.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import ctc_multi
from ctc_multi.shapes import SHAPES, random_problem


def median_ms(function, repeats):
    function()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        torch.cuda.synchronize()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def captured(function):
    """(graph, its outputs): ``function()`` warmed up on a side stream, then captured."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        function()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = function()
    return graph, outputs


def native_fwd_bwd(logits, logit_paddings, labels, label_paddings):
    input_lengths = (logit_paddings == 0).sum(dim=1)
    target_lengths = (label_paddings == 0).sum(dim=1)

    def run():
        leaf = logits.detach().requires_grad_(True)
        log_probs = torch.log_softmax(leaf, dim=-1).transpose(0, 1)
        torch.nn.functional.ctc_loss(log_probs, labels, input_lengths, target_lengths, reduction="sum").backward()
        return leaf.grad

    return run


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="char,long,big")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("torch sees no CUDA device: nothing to time")
        return
    print("device:", torch.cuda.get_device_name(0), "| torch", torch.__version__)
    print(f"{'shape':8s} {'eager ms':>9s} {'graph ms':>9s} {'native ms':>10s} {'eager/graph':>12s} {'native/graph':>13s}  max|graph-eager| loss, grad")
    for shape in args.shapes.split(","):
        static = [torch.as_tensor(a, device="cuda") for a in random_problem(SHAPES[shape], 0, "float32")]

        def eager():
            return ctc_multi.ctc_loss_and_grad(*static)

        try:
            graph, outputs = captured(eager)
        except Exception as error:  # the capture itself is what this measures first
            print(f"{shape:8s} capture failed: {type(error).__name__}: {error}")
            continue
        static[0].copy_(torch.as_tensor(random_problem(SHAPES[shape], 1, "float32").logits, device="cuda"))
        graph.replay()
        differences = [float((a - b).abs().max()) for a, b in zip(outputs, eager())]
        times = [median_ms(f, args.repeats) for f in (eager, graph.replay, native_fwd_bwd(*static))]
        print(
            f"{shape:8s} {times[0]:9.2f} {times[1]:9.2f} {times[2]:10.2f} {times[0] / times[1]:11.1f}x {times[2] / times[1]:12.3f}x"
            f"  {differences[0]:.1e}, {differences[1]:.1e}",
            flush=True,
        )


if __name__ == "__main__":
    main()
