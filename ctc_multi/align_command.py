"""``ctc-multi align``: the forced alignment of one sequence of an .npz file, as text and a picture.

Prints the label spans of the most likely CTC path (:func:`ctc_multi.forced_align` and
:func:`ctc_multi.merge_tokens`) and, with ``--plot``, draws the frames x classes
log-probability heatmap (the blank and the classes in the labels only) with that path on it
and the spans marked. matplotlib comes with the ``cli`` extra and is imported only to plot.
"""

from __future__ import annotations

import os

import numpy as np

from .alignment import TokenSpan, forced_align, merge_tokens
from .compare import UsageError, check_plotting, load_case, save_plot
from .lattice import log_softmax


def add_align_parser(subparsers) -> None:
    """Register the ``align`` command on an ``argparse`` subparsers object."""
    parser = subparsers.add_parser(
        "align",
        help="force-align one sequence of an .npz file: print its label spans, optionally plot them",
        description=(
            "Find the single most likely CTC path (Viterbi) of one sequence and print, for each label, "
            "the frames it spans (start inclusive, end exclusive) and its mean log-probability there."
        ),
        epilog="Exit codes: 0 success (also when no path can align the labels, which is reported); 2 a bad command line or input file.",
    )
    parser.add_argument(
        "--input",
        metavar="FILE.npz",
        required=True,
        help="an .npz with logits (B,T,K), logit_paddings (B,T), labels (B,N), label_paddings (B,N) "
        "and optionally an integer blank_id (default 0)",
    )
    parser.add_argument("--index", type=int, default=0, metavar="b", help="which sequence of the batch, 0-based (default 0)")
    parser.add_argument(
        "--plot",
        metavar="PATH.png",
        help="also draw the log-probability heatmap (the blank and the label classes) with the path and spans (needs matplotlib)",
    )
    parser.set_defaults(run=run_align)


def run_align(args) -> int:
    """Run ``ctc-multi align`` on parsed arguments; returns the exit code."""
    plot_file = check_plotting(args.plot) if args.plot else None
    case = load_case(args.input, dtype=None)
    batch = case.problem.logits.shape[0]
    if not 0 <= args.index < batch:
        raise UsageError(f"--index must be in [0, {batch}) for {args.input}; got {args.index}")
    problem = [array[args.index : args.index + 1] for array in case.problem]
    tokens, scores = forced_align(*problem, blank_id=case.blank_id)
    spans = merge_tokens(tokens, scores, blank_id=case.blank_id)[0]
    tokens, scores = tokens[0], scores[0]

    valid = problem[1][0] == 0
    labels = [int(label) for label, padded in zip(problem[2][0], problem[3][0]) if padded == 0]
    print(f"{args.input}, sequence {args.index}: {int(valid.sum())} valid frames of {valid.size}, {len(labels)} label{'' if len(labels) == 1 else 's'}, blank {case.blank_id}")
    if np.any(scores == -np.inf) or (labels and not valid.any()):
        print("no path can align these labels: too few valid frames for them and the blanks between repeats, or a class of probability 0 (a -inf logit) on every path")
    else:
        print(f"best path log-probability {float(scores.sum()):.6g}")
        print(f"{'label':>7} {'start':>7} {'end':>7} {'mean log-prob':>14}")
        for span in spans:
            print(f"{span.label:>7} {span.start:>7} {span.end:>7} {span.score:>14.6g}")
    if plot_file:
        plot_alignment(problem[0][0], valid, labels, tokens, spans, blank_id=case.blank_id, path=plot_file, title=f"{os.path.basename(args.input)}, sequence {args.index}")
        print(f"wrote {plot_file}")
    return 0


def plot_alignment(logits, valid, labels: list[int], tokens, spans: list[TokenSpan], *, blank_id: int, path: str, title: str) -> None:
    """Draw the (classes x frames) log-probabilities, the path through them and the spans to a PNG.

    Args:
      logits: (T, K) NumPy array of one sequence; valid: (T,) bool; tokens: (T,) the path.
    """
    try:
        import matplotlib
    except ImportError:
        raise UsageError("--plot needs matplotlib: pip install 'ctc-multi[cli]'") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    classes = [blank_id] + list(dict.fromkeys(label for label in labels if label != blank_id))
    row_of = {cls: row for row, cls in enumerate(classes)}
    logits = np.where(valid[:, None], np.asarray(logits, dtype=np.float64), 0.0)  # padded frames may hold NaN or inf
    log_probs = log_softmax(np, logits)[:, classes].T  # (rows, T)
    log_probs[:, ~valid] = np.nan  # padded frames stay blank
    frames = log_probs.shape[1]
    shown = log_probs[np.isfinite(log_probs)]
    low = max(float(shown.min()), -20.0) if shown.size else -1.0

    figure, axes = plt.subplots(figsize=(min(3.0 + 0.25 * frames, 24.0), 2.2 + 0.45 * len(classes)), layout="constrained")
    image = axes.imshow(log_probs, aspect="auto", origin="lower", cmap="viridis", vmin=low, vmax=0.0, interpolation="nearest")
    figure.colorbar(image, ax=axes, label="log-probability", pad=0.01)

    on_path = np.flatnonzero(tokens >= 0)
    if on_path.size:
        rows = [row_of[int(token)] for token in tokens[on_path]]
        axes.plot(on_path, rows, color="red", marker="o", markersize=4, linewidth=1.5, label="Viterbi path")
    for number, span in enumerate(spans):
        row = row_of[span.label]
        axes.add_patch(plt.Rectangle((span.start - 0.5, row - 0.5), span.end - span.start, 1.0, fill=False, edgecolor="white", linewidth=2))
        axes.axvspan(span.start - 0.5, span.end - 0.5, ymin=0.97, ymax=1.0, color=f"C{number % 10}")
        axes.annotate(
            f"{span.label}", ((span.start + span.end - 1) / 2, len(classes) - 0.5), xytext=(0, 4), textcoords="offset points",
            ha="center", va="bottom", fontsize=9, annotation_clip=False,
        )
    axes.set_yticks(range(len(classes)), [f"blank ({blank_id})"] + [f"class {cls}" for cls in classes[1:]])
    axes.set_xlabel("frame")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))  # frames are whole
    axes.set_xlim(-0.5, frames - 0.5)
    axes.set_title(f"{title}: labels {' '.join(map(str, labels)) or '(none)'}", fontsize=10, pad=18)
    if on_path.size:
        axes.legend(loc="lower right", fontsize=8)
    save_plot(figure, path, dpi=110)
