"""The ``ctc-multi`` command line (also ``python -m ctc_multi``): ``compare`` and ``align``.

Each command's module registers its parser and sets ``run``, the function that takes the parsed
arguments and returns the exit code; :class:`ctc_multi.compare.UsageError` becomes exit code 2.

Exit codes: 0 success; 1 a ctc_multi backend disagrees with the float64 reference beyond its
dtype's tolerance (or failed to run), or the reference disagrees with torch's F.ctc_loss in
float64; 2 a bad command line or input file.
"""

from __future__ import annotations

import argparse
import os
import sys

from . import align_command, compare
from .shapes import DEFAULT_SHAPE, SHAPES, Shape

_DIMENSIONS = (("batch", "B"), ("frames", "T"), ("classes", "K"), ("labels", "N"))


class _Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (the README's promise for exit code 2), with
    a pointer to ``--help`` instead of the usage block."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _integer_at_least(lowest: int, what: str):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {what}; got {text!r}") from None
        if value < lowest:
            raise argparse.ArgumentTypeError(f"must be {what}; got {value}")
        return value

    return parse


_positive_int = _integer_at_least(1, "a positive integer")
_non_negative_int = _integer_at_least(0, "a non-negative integer")


def _name_list(text: str) -> list[str]:
    return [name.strip() for name in text.split(",") if name.strip()]


def add_compare_parser(subparsers) -> None:
    shapes = "; ".join(f"{s.name} {s.B},{s.T},{s.K},{s.N}" for s in SHAPES.values())
    tolerances = "; ".join(f"{dtype}: each loss within {t.loss:g} x max(1, |loss|), gradient {t.grad:g}" for dtype, t in compare.TOLERANCES.items())
    parser = subparsers.add_parser(
        "compare",
        help="run one CTC problem on every installed backend and anchor; print accuracy and timings",
        description=(
            "Run the same CTC problem on every installed ctc_multi backend (numpy, jax, torch, and "
            "array_api_strict when installed) and on the anchors optax.ctc_loss and "
            "torch.nn.functional.ctc_loss, then print one table: loss and gradient max-abs difference "
            f"from a float64 reference ({compare.REFERENCE}), forward and forward+backward times "
            "(median of --repeats after one warm-up), and each row's speed-up: the fastest anchor's "
            "forward+backward time divided by the row's. With torch installed and selected, a last "
            "row checks the reference itself against torch's F.ctc_loss in float64."
        ),
        epilog=(
            f"Named shapes (B,T,K,N): {shapes}. Tolerances: {tolerances}. Exit codes: 0 when every "
            "ctc_multi backend agrees with the reference within its dtype's tolerance; 1 when one does "
            "not, or fails to run, or the reference check fails, or no ctc_multi backend ran; 2 on a bad "
            "command line or input file. "
            "Anchors are shown for comparison only and never set the exit code."
        ),
    )
    problem = parser.add_argument_group("problem (default: the named shape 'small', random, seed 0)")
    problem.add_argument("--shape", choices=list(SHAPES), help=f"a named problem size (default {DEFAULT_SHAPE})")
    for option, letter in _DIMENSIONS:
        problem.add_argument(f"--{option}", type=_positive_int, metavar=letter, help=f"override {letter} of the shape")
    problem.add_argument("--seed", type=_non_negative_int, default=0, help="random seed of the generated problem (default 0)")
    problem.add_argument(
        "--input",
        metavar="FILE.npz",
        help="compare on your own data: an .npz with logits (B,T,K), logit_paddings (B,T), labels (B,N), "
        "label_paddings (B,N) and optionally an integer blank_id (default 0)",
    )
    run = parser.add_argument_group("what runs, where")
    run.add_argument(
        "--dtype",
        choices=("float32", "float64"),
        help="dtype of the logits (default float32; with --input, float64 if the file's logits are float64)",
    )
    run.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda: torch tensors on CUDA, jax on its first GPU; numpy stays on the CPU")
    run.add_argument("--repeats", type=_positive_int, default=5, help="timed runs after one warm-up; the median is shown (default 5)")
    run.add_argument(
        "--backends",
        type=_name_list,
        metavar="LIST",
        help=f"comma-separated ctc_multi backends among {','.join(compare.BACKENDS)} (default: numpy,jax,torch, "
        "plus array_api_strict when installed). The anchors of the chosen frameworks run too: optax.ctc_loss "
        "with jax, torch.nn.functional.ctc_loss with torch",
    )
    run.add_argument("--no-anchors", action="store_true", help="leave out optax.ctc_loss and torch.nn.functional.ctc_loss")
    output = parser.add_argument_group("output")
    output.add_argument("--json", metavar="PATH", help="also write the problem description and the rows as JSON")
    output.add_argument("--plot", metavar="PATH.png", help="also draw a bar chart of the times, annotated with the accuracy (needs matplotlib)")
    parser.set_defaults(run=run_compare)


def _shape(args) -> Shape:
    base = SHAPES[args.shape or DEFAULT_SHAPE]
    sizes = {letter: getattr(args, option) or getattr(base, letter) for option, letter in _DIMENSIONS}
    overridden = any(getattr(args, option) is not None for option, _ in _DIMENSIONS)
    try:
        return Shape("custom" if overridden else base.name, **sizes)
    except ValueError as error:  # a size the options allow but a problem does not (--classes 1)
        options = ", ".join(f"--{option} {sizes[letter]}" for option, letter in _DIMENSIONS if getattr(args, option) is not None)
        raise compare.UsageError(f"{error} (from {options})") from None


def run_compare(args) -> int:
    # torch's OpenMP threads otherwise spin after each op, which on a busy machine slows torch's
    # next small op many times over (F.ctc_loss 0.5 -> 20 ms on `small`, a run on 2 shared cores);
    # OpenMP reads this when torch is imported, which no contender has done yet
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    if args.input and (args.shape or any(getattr(args, option) for option, _ in _DIMENSIONS)):
        raise compare.UsageError("--input takes its sizes from the file: leave out --shape and --batch/--frames/--classes/--labels")
    contenders = compare.select(args.backends, anchors=not args.no_anchors)
    compare.check_device(contenders, args.device)
    plot_file = compare.check_plotting(args.plot) if args.plot else None
    if args.json:
        compare.check_directory("--json", args.json)
    if args.input:
        case = compare.load_case(args.input, dtype=args.dtype)
    else:
        case = compare.generated_case(_shape(args), seed=args.seed, dtype=args.dtype or "float32")
    with compare.progress_bar() as progress:
        report = compare.run(case, contenders, device=args.device, repeats=args.repeats, progress=progress)

    compare.print_table(report)
    if args.json:
        compare.write_json(report, args.json)
        print(f"wrote {args.json}")
    if plot_file:
        compare.plot(report, plot_file)
        print(f"wrote {plot_file}")
    failing = [row.backend for row in report.rows if row.fails]
    if failing:
        print(f"ctc-multi compare: outside tolerance or failed: {', '.join(failing)}", file=sys.stderr)
    if report.checked_nothing:
        print("ctc-multi compare: no ctc_multi backend ran, so nothing was checked (see the status column)", file=sys.stderr)
    return report.exit_code


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="ctc-multi", description="CTC loss for NumPy, JAX and PyTorch from one recursion.")
    subparsers = parser.add_subparsers(title="commands", dest="command", required=True, parser_class=_Parser)
    add_compare_parser(subparsers)
    align_command.add_align_parser(subparsers)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        code = args.run(args)
        sys.stdout.flush()  # here, so that a reader that has gone away is caught below
        return code
    except BrokenPipeError:  # `ctc-multi align ... | head -2`: the reader took what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 141  # as the shell reports a command ended by SIGPIPE
    except compare.UsageError as error:
        print(f"ctc-multi {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # a long comparison stopped with Ctrl-C: no traceback
        print(f"ctc-multi {args.command}: interrupted", file=sys.stderr)
        return 130
