"""``ctc-multi align`` (ctc_multi/align_command.py), through its own argparse registration.

The spans expected come from the construction of the input: logits that make one designed
path far more likely than any other.
"""

from __future__ import annotations

import argparse
import struct

import numpy as np
import pytest

from ctc_multi.align_command import add_align_parser, run_align
from ctc_multi.compare import UsageError

BLANK = 1
# Frames 0-11 of sequence 1; frames 12-13 are padding. Label "3 2 2 0": 2 2 needs a blank between.
DESIGNED_PATH = [1, 3, 3, 1, 2, 2, 1, 2, 1, 1, 0, 0]
EXPECTED_SPANS = [(3, 1, 3), (2, 4, 6), (2, 7, 8), (0, 10, 12)]


def parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="ctc-multi")
    add_align_parser(parser.add_subparsers(dest="command", required=True))
    return parser.parse_args(argv)


@pytest.fixture
def input_file(tmp_path):
    rng = np.random.default_rng(0)
    logits = rng.normal(scale=0.5, size=(2, 14, 5))
    logits[1, np.arange(len(DESIGNED_PATH)), DESIGNED_PATH] += 8.0
    logit_paddings = np.zeros((2, 14))
    logit_paddings[1, len(DESIGNED_PATH) :] = 1.0
    labels = np.array([[4, 0, 0, 0], [3, 2, 2, 0]])
    label_paddings = np.array([[0, 1, 1, 1], [0, 0, 0, 0]], dtype=float)
    path = tmp_path / "batch.npz"
    np.savez(path, logits=logits, logit_paddings=logit_paddings, labels=labels, label_paddings=label_paddings, blank_id=np.int64(BLANK))
    return path


def png_size(data: bytes) -> tuple[int, int]:
    assert data[:8] == b"\x89PNG\r\n\x1a\n", "not a PNG signature"
    assert data[12:16] == b"IHDR", "a PNG starts with its IHDR chunk"
    return struct.unpack(">II", data[16:24])


def test_align_prints_spans_and_draws_a_png(input_file, tmp_path, capsys):
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    picture = tmp_path / "align.png"
    args = parse(["align", "--input", str(input_file), "--index", "1", "--plot", str(picture)])
    assert args.run is run_align
    assert run_align(args) == 0

    printed = capsys.readouterr().out
    rows = [line.split() for line in printed.splitlines()]
    spans = [tuple(int(v) for v in row[:3]) for row in rows if len(row) == 4 and row[0].isdigit()]
    assert spans == EXPECTED_SPANS
    assert "12 valid frames of 14" in printed

    data = picture.read_bytes()
    width, height = png_size(data)
    assert 300 <= width <= 4000 and 200 <= height <= 3000, (width, height)
    assert 10_000 < len(data) < 5_000_000


def test_align_reports_sequences_that_cannot_be_aligned(tmp_path, capsys):
    path = tmp_path / "short.npz"
    np.savez(path, logits=np.zeros((1, 2, 3)), logit_paddings=np.zeros((1, 2)), labels=np.array([[2, 2]]), label_paddings=np.zeros((1, 2)))
    assert run_align(parse(["align", "--input", str(path)])) == 0
    printed = capsys.readouterr().out
    assert "no path can align" in printed and "2 labels," in printed


def test_align_counts_one_label_in_the_singular(tmp_path, capsys):
    path = tmp_path / "one.npz"
    np.savez(path, logits=np.zeros((1, 3, 3)), logit_paddings=np.zeros((1, 3)), labels=np.array([[2]]), label_paddings=np.zeros((1, 1)))
    assert run_align(parse(["align", "--input", str(path)])) == 0
    assert ": 3 valid frames of 3, 1 label, blank 0" in capsys.readouterr().out  # was "1 labels"


def test_the_heatmap_puts_ticks_on_whole_frames(tmp_path, monkeypatch):
    """matplotlib's default ticks for 20 frames fell at 2.5, 7.5, ..., between frames."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    import ctc_multi.align_command as align_command

    path = tmp_path / "twenty.npz"
    np.savez(path, logits=np.zeros((1, 20, 3)), logit_paddings=np.zeros((1, 20)), labels=np.array([[2, 1]]), label_paddings=np.zeros((1, 2)))
    ticks = []
    monkeypatch.setattr(align_command, "save_plot", lambda figure, path, dpi: ticks.extend(figure.axes[0].get_xticks()))
    assert run_align(parse(["align", "--input", str(path), "--plot", str(tmp_path / "ticks.png")])) == 0
    assert ticks and all(float(tick).is_integer() for tick in ticks), ticks


def test_align_rejects_an_index_outside_the_batch(input_file):
    with pytest.raises(UsageError, match="--index"):
        run_align(parse(["align", "--input", str(input_file), "--index", "2"]))


@pytest.mark.parametrize("where, message", [("missing/dir/align.png", "no such directory"), ("align.txt", "not .txt")])
def test_align_rejects_a_plot_path_it_cannot_write_before_running(input_file, tmp_path, capsys, where, message):
    """A --plot that cannot be written is a usage error (exit 2, one line), found before any
    output, not a traceback after the spans."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    with pytest.raises(UsageError, match=message):
        run_align(parse(["align", "--input", str(input_file), "--plot", str(tmp_path / where)]))
    assert capsys.readouterr().out == ""


def test_align_writes_and_names_a_png_for_a_plot_path_without_extension(input_file, tmp_path, capsys):
    """matplotlib adds ".png" to such a path; the command said it wrote the path as given."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    assert run_align(parse(["align", "--input", str(input_file), "--plot", str(tmp_path / "picture")])) == 0
    assert f"wrote {tmp_path / 'picture.png'}" in capsys.readouterr().out
    png_size((tmp_path / "picture.png").read_bytes())
    assert not (tmp_path / "picture").exists()
    assert run_align(parse(["align", "--input", str(input_file), "--plot", str(tmp_path / "dotted.")])) == 0
    assert f"wrote {tmp_path / 'dotted.png'}" in capsys.readouterr().out
    png_size((tmp_path / "dotted.png").read_bytes())


def test_align_refuses_directories_for_its_files(input_file, tmp_path, capsys):
    """A directory as --plot was written beside it with ".png" added, and reported as itself;
    a directory as --input was "no such file"."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    with pytest.raises(UsageError, match="--plot .*: is a directory"):
        run_align(parse(["align", "--input", str(input_file), "--plot", str(tmp_path)]))
    with pytest.raises(UsageError, match=": is a directory, not an .npz file"):
        run_align(parse(["align", "--input", str(tmp_path)]))
    assert capsys.readouterr().out == ""


def test_align_plots_nan_and_inf_in_padded_frames_without_a_warning(tmp_path, capsys):
    """Padded frames may hold NaN or inf (README); the plot's log-softmax took them and warned."""
    pytest.importorskip("matplotlib", reason="--plot needs matplotlib (the cli extra)")
    logits = np.zeros((1, 5, 3))
    logits[0, 3, :] = np.nan
    logits[0, 4, :] = np.inf  # inf - inf: NumPy's invalid-value warning
    path = tmp_path / "nan.npz"
    np.savez(path, logits=logits, logit_paddings=np.array([[0, 0, 0, 1, 1]]), labels=np.array([[1]]), label_paddings=np.zeros((1, 1)))
    with np.errstate(all="raise"):
        assert run_align(parse(["align", "--input", str(path), "--plot", str(tmp_path / "nan.png")])) == 0
    assert "best path log-probability" in capsys.readouterr().out


def test_align_reports_a_sequence_whose_every_path_has_probability_zero(tmp_path, capsys):
    """A -inf logit on every path: no alignment, said as for too few frames (it printed an
    empty span list with log-probability 0)."""
    path = tmp_path / "masked.npz"
    logits = np.array([[[0.0, -np.inf], [0.0, -np.inf]]])
    np.savez(path, logits=logits, logit_paddings=np.zeros((1, 2)), labels=np.array([[1]]), label_paddings=np.zeros((1, 1)))
    assert run_align(parse(["align", "--input", str(path)])) == 0
    printed = capsys.readouterr().out
    assert "no path can align" in printed and "probability 0" in printed
