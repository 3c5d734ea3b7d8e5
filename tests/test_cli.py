"""``ctc-multi compare`` end to end, each run in a subprocess as a user would start it.

The runs are small (tiny sizes, one repeat) so the file takes seconds per framework installed.
Every test works in the numpy-only environment: backends that are missing must show up as
"not installed" rows, and the tests that need JAX or torch say so in their skip marks.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import zipfile

import numpy as np
import pytest
from conftest import installed

import ctc_multi
from ctc_multi import compare
from ctc_multi.shapes import Problem, Shape, random_problem

TINY = ["--batch", "2", "--frames", "20", "--classes", "5", "--labels", "4", "--repeats", "1"]
ROW_KEYS = {
    "backend", "anchor", "status", "device", "dtype", "loss_max_abs_diff", "grad_max_abs_diff",
    "forward_ms", "forward_backward_ms", "speedup_over_fastest_anchor", "message", "fails",
}


def run_cli(*args: str, cwd, script: str | None = None) -> subprocess.CompletedProcess:
    """``python -m ctc_multi ARGS``, or ``python -c SCRIPT`` (which calls ctc_multi.cli.main itself)."""
    command = [sys.executable, "-c", script] if script else [sys.executable, "-m", "ctc_multi", *args]
    env = dict(os.environ, COLUMNS="200")  # one table line per row, whatever the terminal
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=300)


def expected_rows() -> list[str]:
    """The rows a default run shows: the default backends, the anchors of their frameworks, and
    the reference check where torch is installed."""
    return [contender.name for contender in compare.select(None)] + ([compare.REFERENCE_CHECK] if installed("torch") else [])


def table_line(stdout: str, backend: str) -> str:
    lines = [line for line in stdout.splitlines() if line.startswith("│") and line.split("│")[1].strip() == backend]
    assert len(lines) == 1, f"no single table row for {backend!r} in:\n{stdout}"
    return lines[0]


def nan_at(sequence: int, frame: int, value: float = np.nan) -> np.ndarray:
    """The saved problem's logits with ``value`` at one class of a valid frame."""
    logits = random_problem(Shape("tiny", B=3, T=24, K=6, N=5), seed=3, dtype="float32").logits.copy()
    logits[sequence, frame, 2] = value
    return logits


def save_problem(path, **changes) -> None:
    problem = random_problem(Shape("tiny", B=3, T=24, K=6, N=5), seed=3, dtype="float32")._asdict()
    problem.update(changes)
    np.savez(path, **{key: value for key, value in problem.items() if value is not None})


def test_default_run_prints_every_backend_and_json_has_one_row_each(tmp_path):
    """The README's first command, `ctc-multi compare` (one repeat instead of five), with --json."""
    result = run_cli("compare", "--repeats", "1", "--json", "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "shape small (B=8, T=100, K=32, N=20)" in result.stdout
    for contender in compare.select(None):
        line = table_line(result.stdout, contender.name)
        assert ("not installed" in line) == bool(contender.missing()), line
        if not contender.missing():
            assert line.rstrip(" │").endswith("ok"), line
    if installed("torch"):
        assert table_line(result.stdout, compare.REFERENCE_CHECK).rstrip(" │").endswith("ok")

    data = json.loads((tmp_path / "out.json").read_text())
    assert set(data) == {"problem", "device", "repeats", "reference", "tolerance", "exit_code", "rows"}
    assert data["problem"] == dict(source="shape small (B=8, T=100, K=32, N=20)", B=8, T=100, K=32, N=20, dtype="float32", blank_id=0, seed=0)
    assert data["device"] == "cpu" and data["repeats"] == 1 and data["exit_code"] == 0
    assert "float64" in data["reference"]
    assert [row["backend"] for row in data["rows"]] == expected_rows()
    for row in data["rows"]:
        assert set(row) == ROW_KEYS
        if row["backend"] == compare.REFERENCE_CHECK:
            assert row["status"] == "ok" and row["dtype"] == "float64" and row["forward_ms"] is None
            assert row["loss_max_abs_diff"] < 1e-8 and row["grad_max_abs_diff"] < 1e-8
        elif row["status"] == "ok":
            assert row["dtype"] == "float32" and row["forward_ms"] > 0 and row["forward_backward_ms"] > 0
            assert row["grad_max_abs_diff"] <= data["tolerance"]["grad"]
        else:
            assert row["status"] == "not installed" and row["forward_ms"] is None


def test_custom_sizes(tmp_path):
    result = run_cli("compare", "--backends", "numpy", *TINY, "--dtype", "float64", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "shape custom (B=2, T=20, K=5, N=4), float64" in result.stdout
    assert "float64" in table_line(result.stdout, "numpy")


def test_input_file_with_padding_between_frames(tmp_path):
    """Padded frames in the middle: torch.nn.functional.ctc_loss gets its valid frames moved to the front."""
    problem = random_problem(Shape("tiny", B=3, T=24, K=6, N=5), seed=3, dtype="float64")
    logit_paddings = problem.logit_paddings.copy()
    logit_paddings[:, 2:5] = 1.0
    save_problem(tmp_path / "mine.npz", logits=problem.logits, logit_paddings=logit_paddings, blank_id=np.int64(0))
    # torch alone of the frameworks: its anchor is the one that moves the valid frames.
    result = run_cli("compare", "--input", "mine.npz", "--backends", "numpy,torch", "--repeats", "1", "--json", "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    data = json.loads((tmp_path / "out.json").read_text())
    assert data["problem"]["source"] == "file mine.npz"
    assert (data["problem"]["B"], data["problem"]["T"], data["problem"]["K"], data["problem"]["N"]) == (3, 24, 6, 5)
    assert data["problem"]["dtype"] == "float64"  # the file's dtype, since --dtype is not given
    for row in data["rows"]:
        assert row["status"] in ("ok", "not installed"), row


@pytest.mark.parametrize(
    "changes, expected",
    [
        (dict(label_paddings=None), "missing key 'label_paddings'"),
        (dict(logit_paddings=np.zeros((3, 23))), "logit_paddings must have shape (3, 24)"),
        (dict(labels=np.zeros((3, 5))), "labels must be an integer array"),
        (dict(blank_id=np.int64(6)), "blank_id must be in [0, K) = [0, 6)"),
        # NaN or +inf on a valid frame: every row was "outside tolerance" (exit 1, blaming each
        # backend), with NumPy warnings, and the reference check passed without that sequence.
        (dict(logits=nan_at(1, 5)), "logits hold NaN or +inf, or no finite value, on a valid frame (sequence 1, frame 5)"),
        (dict(logits=nan_at(2, 0, np.inf)), "logits hold NaN or +inf, or no finite value, on a valid frame (sequence 2, frame 0)"),
        # a frame of -inf logits alone has no softmax either (each loss of its sequence NaN)
        (dict(logits=nan_at(0, 7, -np.inf) + np.where(np.arange(24)[None, :, None] == 7, -np.inf, 0.0)), "(sequence 0, frame 7)"),
    ],
    ids=["missing-key", "wrong-shape", "float-labels", "blank-out-of-range", "nan-logit", "inf-logit", "all-minus-inf-frame"],
)
def test_broken_input_file_is_a_clear_error(tmp_path, changes, expected):
    save_problem(tmp_path / "bad.npz", **changes)
    result = run_cli("compare", "--input", "bad.npz", "--backends", "numpy", cwd=tmp_path)
    assert result.returncode == 2
    assert expected in result.stderr and "bad.npz" in result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""


def test_a_sequence_without_alignment_passes_where_every_possible_one_agrees(tmp_path):
    """Sequence 1 of the file has 5 labels and 3 frames: its loss is about -log_epsilon
    everywhere, its gradient comes only from the paths log 0's stand-in allows and differs
    between float32 and float64 beyond the gradient's tolerance, so it is left out of grad Δ;
    the comparison passes."""
    problem = random_problem(Shape("tiny", B=3, T=24, K=6, N=5), seed=3, dtype="float32")
    logit_paddings = problem.logit_paddings.copy()
    logit_paddings[1, 3:] = 1
    labels = problem.labels.copy()
    labels[1] = [1, 2, 3, 4, 5]
    save_problem(tmp_path / "one_impossible.npz", logit_paddings=logit_paddings, labels=labels, label_paddings=np.zeros((3, 5), np.float32))
    result = run_cli("compare", "--input", "one_impossible.npz", "--backends", "numpy,torch", "--repeats", "1", "--json", "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stdout + result.stderr
    rows = {row["backend"]: row for row in json.loads((tmp_path / "out.json").read_text())["rows"]}
    assert rows["numpy"]["status"] == "ok" and rows["numpy"]["grad_max_abs_diff"] < 1e-4


def test_an_archive_member_that_is_not_an_array(tmp_path):
    """A zip member that np.load returns as bytes (no .npy header) crashed with a traceback."""
    save_problem(tmp_path / "raw.npz")
    with zipfile.ZipFile(tmp_path / "raw.npz", "a") as archive:
        archive.writestr("blank_id", b"0")
    for command in ("compare", "align"):
        result = run_cli(command, "--input", "raw.npz", cwd=tmp_path)
        assert result.returncode == 2 and "blank_id is not a .npy array" in result.stderr, result.stderr
        assert "Traceback" not in result.stderr


def test_the_reference_check_runs_without_the_anchors(tmp_path):
    """`--no-anchors` left out torch's anchor and, with it, the reference check, while the
    README says the check runs where torch is installed and selected and sets the exit code."""
    pytest.importorskip("torch")
    result = run_cli("compare", "--backends", "torch", "--no-anchors", *TINY, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert "ok" in table_line(result.stdout, compare.REFERENCE_CHECK)
    assert not [line for line in result.stdout.splitlines() if line.startswith("│ torch F.ctc_loss")]  # no anchor row


def test_input_that_is_not_an_npz(tmp_path):
    (tmp_path / "notes.npz").write_text("not an archive")
    result = run_cli("compare", "--input", "notes.npz", cwd=tmp_path)
    assert result.returncode == 2 and "not an .npz archive" in result.stderr and "Traceback" not in result.stderr


def test_numpy_backend_alone_imports_no_framework(tmp_path):
    script = f"""
import sys
from ctc_multi.cli import main
code = main(["compare", "--backends", "numpy", *{TINY!r}])
assert code == 0, code
imported = [name for name in ("jax", "torch", "optax") if name in sys.modules]
assert not imported, imported
"""
    result = run_cli(cwd=tmp_path, script=script)
    assert result.returncode == 0, result.stderr
    table_line(result.stdout, "numpy")


def test_missing_framework_is_a_row_not_a_traceback(tmp_path):
    """torch hidden from the import system (as in the numpy-only environment): its two rows say so."""
    script = f"""
import sys
sys.modules["torch"] = None  # importlib.util.find_spec("torch") now returns None
from ctc_multi.cli import main
sys.exit(main(["compare", "--backends", "numpy,torch", *{TINY!r}]))
"""
    result = run_cli(cwd=tmp_path, script=script)
    assert result.returncode == 0, result.stderr
    assert "not installed" in table_line(result.stdout, "torch")
    assert "not installed" in table_line(result.stdout, "torch F.ctc_loss")
    # The extra, whose pin takes the CPU wheel; a bare `pip install torch` may pull a CUDA build.
    assert "pip install 'ctc-multi[torch]'" in table_line(result.stdout, "torch")


def test_nothing_checked_is_exit_code_1_and_no_torch_means_no_reference_check(tmp_path):
    """torch hidden: `--backends torch` ran no ctc_multi backend, yet exited 0, as if it had
    checked something; and the caption said the reference check (which needs torch) sets the
    exit code where there was no such row. With NumPy beside it, exit 0 and the caption says
    there is no reference check."""
    template = """
import sys
sys.modules["torch"] = None
from ctc_multi.cli import main
sys.exit(main(["compare", "--backends", BACKENDS, *TINY]))
"""
    nothing = run_cli(cwd=tmp_path, script=template.replace("BACKENDS", repr("torch")).replace("TINY", repr(TINY)))
    assert nothing.returncode == 1, nothing.stderr
    assert "nothing was checked" in nothing.stderr
    numpy_only = run_cli(cwd=tmp_path, script=template.replace("BACKENDS", repr("numpy,torch")).replace("TINY", repr(TINY)))
    assert numpy_only.returncode == 0, numpy_only.stderr
    assert "no reference check" in " ".join(numpy_only.stdout.split())


def test_exit_code_1_when_a_backend_is_outside_tolerance(tmp_path):
    script = f"""
import sys
from ctc_multi import compare
from ctc_multi.cli import main
compare.TOLERANCES["float32"] = compare.Tolerance(loss=0.0, grad=0.0)  # float32 never matches float64 exactly
sys.exit(main(["compare", "--backends", "numpy", *{TINY!r}]))
"""
    result = run_cli(cwd=tmp_path, script=script)
    assert result.returncode == 1
    assert "outside tolerance" in table_line(result.stdout, "numpy")
    assert "outside tolerance or failed: numpy" in result.stderr


def test_a_failing_backend_is_an_error_row_and_exit_code_1():
    def broken(case, device):
        raise RuntimeError("broken on purpose")

    case = compare.generated_case(Shape("tiny", B=2, T=10, K=4, N=3), seed=0, dtype="float32")
    contenders = [compare.BACKENDS["numpy"], dataclasses.replace(compare.BACKENDS["numpy"], name="broken", prepare=broken)]
    report = compare.run(case, contenders, repeats=1)
    assert [row.status for row in report.rows] == ["ok", "error"]
    assert report.rows[1].message == "RuntimeError: broken on purpose"
    assert report.exit_code == 1


def test_anchors_never_set_the_exit_code():
    case = compare.generated_case(Shape("tiny", B=2, T=10, K=4, N=3), seed=0, dtype="float32")
    rows = [compare.Row("numpy", anchor=False, status="ok"), compare.Row("optax.ctc_loss", anchor=True, status="outside tolerance")]
    report = compare.Report(case, "cpu", 1, rows=rows)
    assert report.exit_code == 0
    report.rows.append(compare.Row("jax", anchor=False, status="outside tolerance"))
    assert report.exit_code == 1
    assert compare.Report(case, "cpu", 1, rows=rows[1:]).exit_code == 1  # no ctc_multi backend ran: nothing checked


@pytest.mark.skipif(not installed("torch"), reason="the reference check runs torch's F.ctc_loss")
def test_a_defect_shared_by_every_backend_fails_the_reference_check(tmp_path):
    """Every backend (and so the reference, ctc_multi's NumPy backend) off by 0.5: the backends'
    rows agree with the reference, torch's float64 F.ctc_loss does not, and the exit code is 1."""
    script = f"""
import sys
from ctc_multi import losses
from ctc_multi.cli import main
shared = losses._Problem._loss
losses._Problem._loss = lambda self, lattice, final: shared(self, lattice, final) + 0.5
sys.exit(main(["compare", "--backends", "numpy,torch", *{TINY!r}]))
"""
    result = run_cli(cwd=tmp_path, script=script)
    assert result.returncode == 1, result.stdout + result.stderr
    assert table_line(result.stdout, "numpy").rstrip(" │").endswith("ok")
    assert "outside tolerance" in table_line(result.stdout, compare.REFERENCE_CHECK)
    assert f"outside tolerance or failed: {compare.REFERENCE_CHECK}" in result.stderr


@pytest.mark.skipif(not installed("torch"), reason="the reference check runs torch's F.ctc_loss")
def test_reference_check_leaves_out_impossible_sequences_only_where_the_reference_agrees():
    """Sequence 1 cannot be aligned (3 labels, 2 frames): torch's loss is inf, the reference's
    about -log_epsilon, and the check passes; with labels equal to the blank, too. A reference
    that found a finite loss for sequence 1 fails."""
    problem = random_problem(Shape("tiny", B=3, T=6, K=5, N=3), seed=1, dtype="float64")
    logit_paddings = problem.logit_paddings.copy()
    logit_paddings[1] = [0, 0, 1, 1, 1, 1]
    labels = np.array([[3, 2, 1], [3, 2, 3], [1, 2, 4]])
    problem = problem._replace(logit_paddings=logit_paddings, labels=labels, label_paddings=np.zeros_like(problem.label_paddings))
    case = compare.Case(problem, blank_id=0, source="test")
    reference_loss, reference_grad = ctc_multi.ctc_loss_and_grad(*problem)
    assert reference_loss[1] > compare.IMPOSSIBLE_LOSS
    row = compare._check_reference(case, (reference_loss, reference_grad))
    assert row.status == "ok" and row.loss_max_abs_diff < 1e-10, row
    blank_labelled = problem._replace(labels=np.array([[1, 2, 0], [1, 2, 3], [0, 1, 0]]))  # torch's gradient is wrong there
    row = compare._check_reference(compare.Case(blank_labelled, blank_id=0, source="test"), ctc_multi.ctc_loss_and_grad(*blank_labelled))
    assert row.status == "ok" and row.loss_max_abs_diff < 1e-10, row
    wrong = reference_loss.copy()
    wrong[1] = 7.0
    row = compare._check_reference(case, (wrong, reference_grad))
    assert row.status == "outside tolerance" and "no alignment for sequence 1" in row.message


@pytest.mark.skipif(not installed("torch"), reason="the reference check runs torch's F.ctc_loss")
def test_reference_check_leaves_out_floored_emissions_and_passes_an_empty_batch():
    """A -inf logit on a valid frame (a masked class): ctc_multi floors the emission at -1e5,
    torch counts it as it is and its gradient is NaN there, so that sequence is left out (and
    said so); the others are checked. An empty batch, which torch refuses, has nothing to check."""
    problem = random_problem(Shape("tiny", B=3, T=8, K=5, N=3), seed=4, dtype="float64")
    logits = problem.logits.copy()
    logits[1, 2, 4] = -np.inf
    problem = problem._replace(logits=logits)
    row = compare._check_reference(compare.Case(problem, blank_id=0, source="test"), ctc_multi.ctc_loss_and_grad(*problem))
    assert row.status == "ok" and row.grad_max_abs_diff < 1e-10, row
    assert row.message == "1 of 3 sequences left out: emissions below -100000"
    nothing = Problem(np.zeros((0, 8, 5)), np.zeros((0, 8)), np.zeros((0, 3), np.int32), np.zeros((0, 3)))
    empty = compare.Case(nothing, blank_id=0, source="test")
    row = compare._check_reference(empty, ctc_multi.ctc_loss_and_grad(*empty.problem))
    assert row.status == "ok" and row.message == "no sequences"


def test_each_loss_is_held_to_its_own_size():
    """Losses 1000 and 0.5: 1e-3 off on the small one is outside float32's 1e-5 × max(1, |loss|),
    whatever the large one's size."""
    tolerance = compare.TOLERANCES["float32"]
    reference = np.array([1000.0, 0.5])
    assert tolerance.losses_within(reference + [5e-3, 5e-6], reference)
    assert not tolerance.losses_within(reference + [0.0, 1e-3], reference)
    assert not tolerance.losses_within(reference + [np.nan, 0.0], reference)


def test_speedup_is_the_fastest_anchors_time_over_the_rows():
    rows = [
        compare.Row("numpy", False, "ok", forward_backward_ms=8.0),
        compare.Row("jax", False, "ok", forward_backward_ms=1.0),
        compare.Row("optax.ctc_loss", True, "ok", forward_backward_ms=4.0),
        compare.Row("torch F.ctc_loss", True, "ok", forward_backward_ms=2.0),
        compare.Row(compare.REFERENCE_CHECK, False, "ok"),
    ]
    compare._add_speedups(rows)
    assert [row.speedup_over_fastest_anchor for row in rows] == [0.25, 2.0, 0.5, 1.0, None]


def test_openmp_threads_wait_passively_unless_the_user_chose(tmp_path):
    """compare sets OMP_WAIT_POLICY=PASSIVE before any contender imports torch (spinning OpenMP
    threads distort torch's times on a busy machine), and keeps a policy the user set."""
    script = f"""
import os, sys
from ctc_multi.cli import main
assert "torch" not in sys.modules
main(["compare", "--backends", "numpy", "--no-anchors", *{TINY!r}])
print("policy", os.environ.get("OMP_WAIT_POLICY"))
"""
    environment = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    for given, expected in ((None, "PASSIVE"), ("ACTIVE", "ACTIVE")):
        env = dict(environment, COLUMNS="200", **({"OMP_WAIT_POLICY": given} if given else {}))
        result = subprocess.run([sys.executable, "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert f"policy {expected}" in result.stdout


def test_plot_writes_a_png_and_says_so(tmp_path):
    """Also a path without an extension, written with ".png" added: the command now names the
    file it wrote (it printed nothing, while `ctc-multi align --plot` did)."""
    result = run_cli("compare", "--backends", "numpy", *TINY, "--plot", "times", "--json", "out.json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[-2:] == ["wrote out.json", "wrote times.png"], result.stdout
    png = (tmp_path / "times.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert 5_000 < len(png) < 2_000_000


def test_cuda_without_a_usable_backend_is_a_clear_error(tmp_path):
    result = run_cli("compare", "--device", "cuda", "--backends", "numpy", cwd=tmp_path)
    assert result.returncode == 2
    assert "--device cuda: no selected backend can use it" in result.stderr and "Traceback" not in result.stderr


@pytest.mark.parametrize("framework", ["torch", "jax"])
def test_no_cuda_device_is_unavailable(framework):
    """In process: which message a torch or JAX row gets on a machine without a GPU."""
    if not installed(framework):
        pytest.skip(f"{framework} is not installed")
    resolve = {"torch": compare.torch_device, "jax": compare.jax_device}[framework]
    try:
        resolve("cuda")
    except compare.Unavailable as error:
        assert ("CUDA" in str(error)) or ("GPU" in str(error))
    else:
        pytest.skip(f"{framework} has a GPU on this machine")


def test_usage_errors_exit_2(tmp_path):
    assert os.path.isdir("/proc")  # Linux: a directory where nobody, root included, creates files
    for args, expected in (
        (["--backends", "numpy,tensorflow"], "unknown backend 'tensorflow'"),
        (["--repeats", "0"], "must be a positive integer"),
        (["--input", "x.npz", "--shape", "char"], "--input takes its sizes from the file"),
        (["--classes", "1", "--backends", "numpy", "--no-anchors"], "K must be an integer >= 2; got 1 (from --classes 1)"),
        (["--seed", "-1", "--backends", "numpy", "--no-anchors"], "argument --seed: must be a non-negative integer"),
        (["--plot", "times.txt", "--backends", "numpy", "--no-anchors"], "not .txt"),
        (["--json", "missing/out.json", "--backends", "numpy", "--no-anchors"], "--json missing/out.json: no such directory"),
        # Found only after the whole run, which an exit code 2 then hid:
        (["--json", ".", "--backends", "numpy", "--no-anchors"], "--json .: is a directory"),
        (["--json", "/proc/ctc_multi_out.json", "--backends", "numpy", "--no-anchors"], "--json /proc/ctc_multi_out.json: cannot write it"),
        (["--repeats", "abc"], "argument --repeats: must be a positive integer; got 'abc'"),  # was "invalid _positive_int value"
        (["--batch", "100000", "--frames", "100000", "--classes", "1000", "--backends", "numpy"], "more than this machine can allocate"),
    ):
        result = run_cli("compare", *args, cwd=tmp_path)
        assert result.returncode == 2 and expected in result.stderr, (args, result.stderr)
        assert "Traceback" not in result.stderr
        assert len(result.stderr.strip().splitlines()) == 1, result.stderr  # one line, no usage block
        assert "fwd+bwd" not in result.stdout, "refused before the run, not after it"


def test_help_names_the_reference_and_the_exit_codes(tmp_path):
    result = run_cli("compare", "--help", cwd=tmp_path)
    assert result.returncode == 0
    text = " ".join(result.stdout.split())
    assert "float64 reference" in text and "NumPy backend in float64" in text
    assert "Anchors are shown for comparison only and never set the exit code" in text
    # as the README states them (the help left out the run where no backend ran, and called the
    # loss tolerance relative where it is relative to max(1, |loss|))
    assert "or no ctc_multi backend ran" in text and "float32: each loss within 1e-05 x max(1, |loss|)" in text
    for name in ("small 8,100,32,20", "char 32,500,32,100", "big 64,1000,1024,200"):
        assert name in text


def test_a_reader_that_goes_away_is_no_traceback(tmp_path):
    """`ctc-multi align ... | head -2`: the reader closed the pipe before the command's output was
    written, and a BrokenPipeError traceback followed. Now no traceback and the shell's status
    for SIGPIPE, 141."""
    save_problem(tmp_path / "one.npz")
    command = [sys.executable, "-m", "ctc_multi", "align", "--input", "one.npz"]
    child = subprocess.Popen(command, cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    child.stdout.close()  # before the child writes: its buffered output meets a closed pipe
    stderr = child.stderr.read().decode()
    assert child.wait(timeout=300) == 141, stderr
    assert stderr == "", stderr
