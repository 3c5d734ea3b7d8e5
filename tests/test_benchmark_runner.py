"""benchmarks/run.py: each mode writes its own JSON by default, so no run overwrites another's."""

from __future__ import annotations

import importlib
import importlib.util
import shutil
import sys
import types
from pathlib import Path

import numpy as np
import pytest

RUNNER = Path(__file__).resolve().parent.parent / "benchmarks" / "run.py"


def load_runner():
    spec = importlib.util.spec_from_file_location("benchmark_runner", RUNNER)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_each_mode_has_its_own_default_json():
    runner = load_runner()
    paths = {
        mode: runner.default_json_path(runner.parse_args(arguments)).name
        for mode, arguments in {"shapes": [], "memory": ["--memory"], "sweep": ["--sweep", "K"]}.items()
    }
    assert paths == {"shapes": "latest.json", "memory": "memory.json", "sweep": "sweep_K.json"}
    explicit = runner.parse_args(["--memory", "--json", "elsewhere.json"])
    assert explicit.json == Path("elsewhere.json")


def test_bad_output_paths_and_a_missing_gpu_are_refused_before_the_run(tmp_path, capsys):
    """`--json DIR` and an unwritable `--plot` failed with a traceback after the whole run;
    `--device cuda` without a GPU ran, timed nothing, checked no target, exited 0 and overwrote
    latest.json."""
    runner = load_runner()
    for arguments, message in (
        (["--json", str(tmp_path)], "is a directory"),
        (["--plot", str(tmp_path / "missing" / "x.png")], "no such directory"),
    ):
        with pytest.raises(SystemExit) as stop:
            runner.parse_args(arguments)
        assert stop.value.code == 2 and message in capsys.readouterr().err
    if any(runner._sees_a_gpu(framework) for framework in ("torch", "jax")):
        pytest.skip("this machine has a GPU")
    with pytest.raises(SystemExit) as stop:
        runner.parse_args(["--device", "cuda", "--backends", "numpy"])
    assert stop.value.code == 2 and "neither torch nor jax sees a GPU" in capsys.readouterr().err


def load_beside_runner(file_name: str):
    """A script of benchmarks/ (ab.py and floor.py import run.py from their folder), with run.py
    loaded first under the name such a script uses."""
    load_runner()
    sys.modules["run"] = sys.modules["benchmark_runner"]
    spec = importlib.util.spec_from_file_location(f"benchmark_{Path(file_name).stem}", RUNNER.parent / file_name)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.skipif(shutil.which("git") is None or not (RUNNER.parent.parent / ".git").exists(), reason="needs git and a git checkout")
def test_ab_imports_a_commits_package_under_its_own_name_and_times_the_same_calls(monkeypatch):
    """benchmarks/ab.py: HEAD's package, imported beside this checkout's, is a separate module
    that computes the same losses; unknown backends are refused by name; ``torch_ops`` runs
    that version's torch adapter with its own ops."""
    import ctc_multi
    from ctc_multi.shapes import SHAPES, random_problem

    ab = load_beside_runner("ab.py")
    earlier = ab.import_at("HEAD")
    assert earlier.__name__.startswith("ctc_multi_at_") and earlier is not ctc_multi
    problem = random_problem(SHAPES["small"], 0, "float32")
    old, new = ab.prepared(earlier, problem, "numpy"), ab.prepared(ctc_multi, problem, "numpy")
    assert old.forward.__module__ != new.forward.__module__
    np.testing.assert_array_equal(old.forward(), new.forward())
    with pytest.raises(SystemExit):
        ab.parse_args(["--against", "HEAD", "--backends", "cudnn"])
    if importlib.util.find_spec("torch") is None:
        return
    # torch_ops: that version's torch adapter keeps its loop (its own flag off during the call).
    adapter = importlib.import_module(f"{earlier.__name__}.backends.torch")
    flags, views = [], adapter.numpy_views
    monkeypatch.setattr(adapter, "numpy_views", lambda arrays: flags.append(adapter.LOOP_IN_NUMPY_ON_CPU) or views(arrays))
    own_ops = ab.prepared(earlier, problem, "torch_ops")
    np.testing.assert_allclose(own_ops.to_numpy(own_ops.forward()), new.forward(), rtol=1e-5)
    assert flags and not any(flags) and adapter.LOOP_IN_NUMPY_ON_CPU
    if importlib.util.find_spec("jax") is None:
        return
    # torch_xla: that version's torch adapter with its opt-in XLA loop (on during the call only).
    flags, views = [], adapter.xla_views
    monkeypatch.setattr(adapter, "xla_views", lambda arrays: flags.append(adapter.LOOP_IN_XLA_ON_CPU) or views(arrays))
    xla = ab.prepared(earlier, problem, "torch_xla")
    np.testing.assert_allclose(xla.to_numpy(xla.forward()), new.forward(), rtol=1e-5)
    assert flags and all(flags) and not adapter.LOOP_IN_XLA_ON_CPU


def test_ab_refuses_torch_xla_against_a_version_without_the_switch(monkeypatch, capsys):
    """benchmarks/ab.py --backends torch_xla against a commit before LOOP_IN_XLA_ON_CPU: a usage
    error that names the switch, before anything is timed."""
    ab = load_beside_runner("ab.py")
    package, backends, adapter = (types.ModuleType(name) for name in ("ctc_multi_at_old", "ctc_multi_at_old.backends", "ctc_multi_at_old.backends.torch"))
    adapter.LOOP_IN_NUMPY_ON_CPU = True
    for module in (package, backends, adapter):
        monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(ab, "import_at", lambda revision: package)
    assert ab.main(["--against", "old", "--backends", "torch,torch_xla", "--shapes", "small"]) == 2
    assert "old has no LOOP_IN_XLA_ON_CPU" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="--eager times the jax backend")
def test_ab_eager_calls_jax_without_jit(monkeypatch):
    """benchmarks/ab.py --eager: the jax backend's loss and value_and_grad called as they are,
    so that the input checks run in each call (counted), with the jitted contender's numbers;
    refused for other backends by name."""
    import ctc_multi
    from ctc_multi import inputs
    from ctc_multi.shapes import SHAPES, random_problem

    ab = load_beside_runner("ab.py")
    for refused in (["--backends", "numpy", "--eager"], ["--backends", "jax", "--eager", "--reduction", "sum"]):
        with pytest.raises(SystemExit):
            ab.parse_args(["--against", "HEAD", *refused])
    assert ab.parse_args(["--against", "HEAD", "--backends", "jax", "--eager"]).eager
    problem = random_problem(SHAPES["small"], 0, "float32")
    eager, jitted = ab.prepared(ctc_multi, problem, "jax", eager=True), ab.prepared(ctc_multi, problem, "jax")
    jitted_losses, (jitted_loss, jitted_gradient) = jitted.forward(), jitted.forward_backward()
    checks, check = [], inputs.check_inputs
    monkeypatch.setattr(ctc_multi.losses, "check_inputs", lambda *a, **k: checks.append(1) or check(*a, **k))
    for _ in range(2):  # the jitted calls, compiled now, check nothing; the eager ones, each time
        np.testing.assert_array_equal(jitted.to_numpy(jitted.forward()), jitted.to_numpy(jitted_losses))
        np.testing.assert_allclose(eager.to_numpy(eager.forward()), jitted.to_numpy(jitted_losses), rtol=1e-5)
        loss, gradient = eager.forward_backward()
        np.testing.assert_allclose(float(loss), float(jitted_loss), rtol=1e-5)
        np.testing.assert_allclose(np.asarray(gradient), np.asarray(jitted_gradient), rtol=1e-4, atol=1e-6)
    assert len(checks) == 4


@pytest.mark.skipif(shutil.which("git") is None or not (RUNNER.parent.parent / ".git").exists(), reason="needs git and a git checkout")
def test_ab_reduction_times_each_versions_reduced_loss():
    """benchmarks/ab.py --reduction mean: both versions' forward+backward of the reduced loss,
    whose value is torch's mean of the float64 reference's losses; refused for NumPy by name."""
    import ctc_multi
    from ctc_multi.shapes import SHAPES, random_problem
    from reference import ctc_reference

    ab = load_beside_runner("ab.py")
    with pytest.raises(SystemExit):
        ab.parse_args(["--against", "HEAD", "--backends", "numpy", "--reduction", "mean"])
    earlier = ab.import_at("HEAD")
    problem = random_problem(SHAPES["small"], 0, "float32")
    losses, _ = ctc_reference(*problem)
    lengths = np.maximum(np.sum(problem.label_paddings == 0, axis=1), 1)
    expected = np.mean(losses / lengths)
    backends = [name for name in ("torch", "jax") if importlib.util.find_spec(name)]
    for backend in backends:
        for package in (earlier, ctc_multi):
            version = ab.prepared(package, problem, backend, "mean")
            loss, gradient = version.forward_backward()
            np.testing.assert_allclose(float(version.to_numpy(loss)), expected, rtol=1e-5)
            np.testing.assert_allclose(float(version.to_numpy(version.forward())), expected, rtol=1e-5)
            assert tuple(gradient.shape) == problem.logits.shape


@pytest.mark.parametrize("way", ["shares", "mirror"])
def test_occupancy_option_sets_every_chosen_adapters_way(way, monkeypatch):
    """run.py --occupancy: NumPy's adapter (it runs torch's loop on a CPU) and those of the chosen
    jax and torch backends compute the occupancies the named way; the others keep theirs."""
    import ctc_multi.lattice

    runner = load_runner()
    assert runner.parse_args([]).occupancy == "default"
    adapters = {name: importlib.import_module(f"ctc_multi.backends.{name}") for name in ("numpy", "jax", "torch") if importlib.util.find_spec(name)}
    for adapter in adapters.values():  # put back after the test, whatever it sets
        monkeypatch.setattr(adapter, "forward_and_occupancy", adapter.forward_and_occupancy)
    before = {name: adapter.forward_and_occupancy for name, adapter in adapters.items()}
    runner.use_occupancy(way, ["torch_ops"])
    function = getattr(ctc_multi.lattice, f"forward_and_occupancy_by_{way}")
    for name, adapter in adapters.items():
        assert adapter.forward_and_occupancy is (function if name in ("numpy", "torch") else before[name])


def test_floor_times_the_librarys_own_recursion_and_halves_only_the_loop_steps():
    """benchmarks/floor.py: its "recursion alone" is the forward of ctc_loss (the loss read from
    its final carry is ctc_loss's, to rounding), its bare scan adds up every valid frame, and its
    halved sizes keep the lattice cells."""
    pytest.importorskip("jax")
    import jax.numpy as jnp

    import ctc_multi
    from ctc_multi.lattice import loss_from_final_state
    from ctc_multi.shapes import SHAPES, random_problem

    floor = load_beside_runner("floor.py")
    arrays = random_problem(SHAPES["small"], seed=3)
    problem, lattice, recursion = floor.timed_recursion(arrays)
    final = recursion(lattice.log_emissions, lattice.frame_padded, lattice.skip_allowed)
    from_carry = loss_from_final_state(jnp, lattice, final, problem.index_dtype)
    expected = ctc_multi.ctc_loss(*(jnp.asarray(a) for a in arrays))
    np.testing.assert_allclose(np.asarray(from_carry), np.asarray(expected), rtol=1e-6)
    assert float(np.min(np.asarray(expected))) > 1.0  # real losses, not a degenerate problem

    # The bare scan visits every frame: its state plus its offset is each state's sum of the
    # emissions over the valid frames (padded ones kept out), to float32 rounding.
    state, offset = floor.bare_scan(problem.backend.scan)(lattice.log_emissions, lattice.frame_padded)
    valid = ~np.asarray(lattice.frame_padded)[:, :, None]
    summed = np.sum(np.where(valid, np.asarray(lattice.log_emissions, dtype=np.float64), 0.0), axis=0)
    assert np.any(~valid)  # some padded frames, or keeping them out is not tested
    np.testing.assert_allclose(np.asarray(state) + np.asarray(offset)[:, None], summed, rtol=1e-4)

    for shape in SHAPES.values():
        half = floor.halved_shape(shape)
        assert (half.B, half.K, half.N) == (2 * shape.B, shape.K, shape.N)
        assert half.B * half.T == shape.B * shape.T  # every named T is even: the same cells


def test_kernels_counts_each_loop_kernel_once_per_scan_step(capsys):
    """benchmarks/kernels.py: the profiled forward of `small` holds one ``while`` per call, and
    its body's kernels run once per loop step: T / unroll times each (unroll copies of them).
    On a CPU, whose unroll divides T; elsewhere the remainder is a second loop."""
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "cpu":
        pytest.skip("counts a CPU's loop steps")

    from ctc_multi.backends import jax as jax_adapter
    from ctc_multi.shapes import SHAPES

    kernels = load_beside_runner("kernels.py")
    times = kernels.kernel_times(kernels.prepared_call("small", "fwd"), calls=2)
    loops = [name for name in times if name.startswith("while")]
    assert len(loops) == 1 and times[loops[0]][0] == 1
    # A scaled step (float32 on a CPU) has no row maximum, which the adapter's unroll counts.
    unroll = jax_adapter.unroll(reverse=False, renormalised=not jax_adapter.scaled_sums(jax.numpy.float32))
    steps = SHAPES["small"].T // unroll
    in_the_loop = [name for name, (runs, _) in times.items() if runs == steps]
    assert len(in_the_loop) >= unroll  # each step's kernels, in every unrolled copy
    # The whole loop takes longer than any one kernel of its body, summed over the steps.
    assert times[loops[0]][1] > max(times[name][1] for name in in_the_loop)

    assert kernels.main(["--shape", "small", "--direction", "fwd", "--calls", "1", "--top", "3"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("small (B=8, T=100") and "jax fwd" in printed[0]
    assert len(printed) == 2 + 3 and "while" in printed[2]
    with pytest.raises(SystemExit):
        kernels.main(["--shape", "huge"])
    if not any(device.platform == "gpu" for device in jax.devices()):
        with pytest.raises(SystemExit):  # a message naming the device, not a traceback
            kernels.main(["--shape", "small", "--device", "cuda"])


def test_kernels_timeline_lists_one_call_in_order_of_start(capsys):
    """benchmarks/kernels.py --timeline: one profiled call's events, the loop among them, in the
    order they started, each with its thread; a negative threshold is refused."""
    jax = pytest.importorskip("jax")
    if jax.default_backend() != "cpu":
        pytest.skip("reads a CPU's trace")

    kernels = load_beside_runner("kernels.py")
    rows = kernels.timeline(kernels.prepared_call("small", "fwd"), min_us=0)
    starts = [start for start, *_ in rows]
    assert starts == sorted(starts) and starts[0] >= 0
    assert sum(name.startswith("while") for *_, name in rows) == 1  # one call, one loop
    assert all(duration >= 0 and thread >= 0 for _, duration, thread, _ in rows)
    assert max(duration for _, duration, _, _ in rows) > 0
    assert kernels.timeline(kernels.prepared_call("small", "fwd"), min_us=1e9) == []  # nothing lasts 1000 s

    assert kernels.main(["--shape", "small", "--direction", "fwd", "--timeline", "0"]) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("small (B=8, T=100") and "one profiled call" in printed[0]
    assert any("while" in line for line in printed[2:])
    with pytest.raises(SystemExit):
        kernels.main(["--shape", "small", "--timeline", "-1"])


def test_a_round_collects_garbage_before_the_untimed_call_and_none_inside_the_timed_one(monkeypatch):
    """benchmarks/run.py's rounds: the collection comes ahead of the untimed call that warms the
    contender's caches (after it, it cooled them: benchmarks/latency.py), and the collector is off
    during the timed call."""
    import gc

    runner = load_runner()
    monkeypatch.setattr(runner, "SETTLE_S", 0.0)
    events = []
    monkeypatch.setattr(runner.gc, "collect", lambda *args: events.append("collect"))

    def contender():
        events.append("call, collector " + ("on" if gc.isenabled() else "off"))

    timings = runner.interleaved_timings({"only": contender}, repeats=runner.MIN_REPEATS, budget_s=0.0, warm_up=False)
    assert timings["only"].repeats == runner.MIN_REPEATS
    assert events == ["collect", "call, collector on", "call, collector off"] * runner.MIN_REPEATS
    assert gc.isenabled()


def test_latency_times_both_jax_contenders_in_every_way_with_and_without_torch(capsys):
    """benchmarks/latency.py: one row per way of preparing a timed call (run.py's own round
    among them), first without torch in the process, then with it; refuses a bad argument."""
    pytest.importorskip("jax")
    pytest.importorskip("optax")
    pytest.importorskip("torch")
    latency = load_beside_runner("latency.py")
    assert latency.as_run_py_does.__code__.co_names.count("before_timed_call") == 1

    assert latency.main(["--shape", "small", "--repeats", "1"]) == 0
    rows = capsys.readouterr().out.splitlines()[2:]
    assert len(rows) == 2 * len(latency.WAYS)
    for with_torch, row in zip(["no"] * len(latency.WAYS) + ["yes"] * len(latency.WAYS), rows):
        cells = row.split()
        assert cells[0] == with_torch and len(cells) >= 4 and all(float(ms) > 0 for ms in cells[-2:])
    for arguments in (["--shape", "huge"], ["--repeats", "0"]):
        with pytest.raises(SystemExit):
            latency.main(arguments)


def test_runs_report_each_ratio_as_the_median_of_the_runs_ratios_and_keep_every_run(monkeypatch, tmp_path, capsys):
    """benchmarks/run.py --runs 3: every run is measured and kept in the JSON; the summary and the
    targets take the median of the three runs' ratios (3.0 here), neither the ratio of the median
    times (120 / 20 = 6.0) nor the first or last run's, and list each run's ratio; the argument
    is checked."""
    import json

    runner = load_runner()

    def prepare(case, device):
        losses = np.zeros(case.problem.logits.shape[0])
        gradient = np.zeros(case.problem.logits.shape)
        return runner.compare.Prepared("cpu", lambda: losses, lambda: (losses, gradient), np.asarray)

    monkeypatch.setattr(runner, "OURS", (runner.Contender("ctc_multi numpy", "numpy", False, (), prepare),))
    monkeypatch.setattr(runner, "ANCHORS", (runner.Contender("torch F.ctc_loss", "torch", True, (), prepare),))
    monkeypatch.setattr(runner, "torch_ctc_kernels", lambda function: [])
    # Per run, ms of (ours, the anchor): ratios 2.0, 3.0 and 8.0.
    per_run = iter([(10.0, 20.0), (40.0, 120.0), (20.0, 160.0)])

    def timings(functions, **options):
        ours, anchor = next(per_run)
        return {key: runner.Timing(anchor if key[0] == "torch F.ctc_loss" else ours, [0.0]) for key in functions}

    monkeypatch.setattr(runner, "interleaved_timings", timings)
    path = tmp_path / "runs.json"
    assert runner.main(["--shapes", "char", "--backends", "numpy", "--runs", "3", "--json", str(path)]) == 0

    data = json.loads(path.read_text())
    assert data["runs"] == 3
    assert sorted((row["contender"], row["run"]) for row in data["results"]) == sorted(
        (name, run) for name in ("ctc_multi numpy", "torch F.ctc_loss") for run in (1, 2, 3)
    )
    (ours,) = [row for row in data["combined"] if not row["anchor"]]
    assert ours["ratios"]["fwd+bwd"]["torch"] == pytest.approx(3.0)
    assert ours["ratios_by_run"]["fwd+bwd"]["torch"] == pytest.approx([2.0, 3.0, 8.0])
    assert ours["fwd_bwd"]["median_ms"] == pytest.approx(20.0) and ours["fwd_bwd"]["times_ms"] == [10.0, 40.0, 20.0]
    (target,) = [t for t in data["targets"] if t["backend"] == "numpy"]
    assert target["ratio"] == pytest.approx(3.0) and target["met"] and target["ratios_by_run"] == pytest.approx([2.0, 3.0, 8.0])
    printed = capsys.readouterr().out
    assert "median of the 3 runs' ratios" in printed and "3.00x (2.00, 3.00, 8.00)" in printed

    for arguments in (["--runs", "0"], ["--runs", "2", "--memory"], ["--runs", "2", "--sweep", "T"]):
        with pytest.raises(SystemExit):
            runner.parse_args(arguments)


def test_each_contender_is_timed_on_what_it_claims_and_checked_against_the_anchor(monkeypatch):
    """measure_shape with real contenders on a tiny shape: ctc_multi's NumPy backend against
    torch's F.ctc_loss (or optax where torch is missing). The runner checks each contender's
    losses and gradient against the anchor's, so a forward+backward that computed no gradient,
    or another problem's, would show here; the calls timed as "fwd" return the (B,) losses and
    those timed as "fwd+bwd" the gradient too; every contender gets both timings."""
    runner = load_runner()
    monkeypatch.setattr(runner, "SETTLE_S", 0.0)
    anchors = [a for a in runner.ANCHORS if not a.cuda_only and not a.missing()]
    if not anchors:
        pytest.skip("neither torch nor optax is installed: no anchor to check against")
    timed = {}
    real_timings = runner.interleaved_timings

    def timings(functions, **options):  # what each timed call returns: the loss alone, or with the gradient
        timed.update({key: function() for key, function in functions.items()})
        return real_timings(functions, **options)

    monkeypatch.setattr(runner, "interleaved_timings", timings)
    ours = [c for c in runner.OURS if c.key == "numpy"]
    rows = runner.measure_shape(runner.Shape("tiny", B=3, T=30, K=6, N=8), ours + anchors[-1:], device="cpu", repeats=runner.MIN_REPEATS, budget_s=0.0)
    assert [row.error for row in rows] == ["", ""]
    (mine,) = [row for row in rows if not row.anchor]
    assert mine.loss_rel_diff < 1e-5 and mine.grad_abs_diff < 1e-4, mine
    assert all(row.fwd.repeats == row.fwd_bwd.repeats == runner.MIN_REPEATS for row in rows)
    assert set(mine.ratios) == set(runner.DIRECTIONS)
    for row in rows:
        assert np.shape(timed[row.contender, "fwd"]) == (3,)
        loss, grad = timed[row.contender, "fwd+bwd"]
        assert np.shape(grad) == (3, 30, 6)


def test_timings_are_medians_of_the_timed_calls(monkeypatch):
    """interleaved_timings on a clock that each call moves on by a set amount: the median (3 ms),
    not the fastest (1) or the mean (4), and every timed call kept."""
    runner = load_runner()
    monkeypatch.setattr(runner, "SETTLE_S", 0.0)
    clock = [0.0]
    monkeypatch.setattr(runner.time, "perf_counter", lambda: clock[0])
    durations = iter([0.005, 0.001, 0.003, 0.009, 0.002])
    calls = []

    def contender():
        calls.append(None)
        if len(calls) % 2 == 0:  # each round's untimed call (before_timed_call) takes no time
            clock[0] += next(durations)

    timing = runner.interleaved_timings({"only": contender}, repeats=5, budget_s=1e9, warm_up=False)["only"]
    assert timing.median_ms == pytest.approx(3.0)
    assert timing.times_ms == pytest.approx([5.0, 1.0, 3.0, 9.0, 2.0])


def test_named_shapes_and_their_random_problems_are_the_issues():
    """The sizes (B, T, K, N) of the issue, and random problems with N/2 to N labels in 1..K-1
    and 0.8 T to T valid frames, padded after them."""
    from ctc_multi.shapes import SHAPES, random_problem

    assert {name: (s.B, s.T, s.K, s.N) for name, s in SHAPES.items()} == {
        "small": (8, 100, 32, 20), "char": (32, 500, 32, 100), "bpe": (16, 400, 1024, 80),
        "long": (4, 2000, 64, 400), "vocab5k": (8, 300, 5000, 60), "big": (64, 1000, 1024, 200),
    }
    for name in ("small", "char", "bpe"):
        shape = SHAPES[name]
        problem = random_problem(shape, seed=1)
        frames = np.sum(problem.logit_paddings == 0, axis=1)
        labels = np.sum(problem.label_paddings == 0, axis=1)
        assert np.all((0.8 * shape.T <= frames) & (frames <= shape.T)) and np.ptp(frames) > 0
        assert np.all((shape.N / 2 <= labels) & (labels <= shape.N)) and np.ptp(labels) > 0
        assert np.all(np.diff(problem.logit_paddings, axis=1) >= 0) and np.all(np.diff(problem.label_paddings, axis=1) >= 0)
        unpadded = problem.labels[problem.label_paddings == 0]
        assert unpadded.min() >= 1 and unpadded.max() <= shape.K - 1


def test_memory_on_a_gpu_compares_device_peaks_not_the_hosts_resident_set():
    runner = load_runner()
    results = [
        dict(implementation=name, compiled_total_bytes=compiled, rss_peak_increase_bytes=rss, rss_peak_bytes=rss, device_peak_bytes=device)
        for name, compiled, rss, device in (("ctc_multi", 2**20, 2**20, 2**21), ("optax", 2**21, 2**24, 2**22))
    ]
    text = runner.memory_text("long", results)
    assert "device peak: ctc_multi / optax = 0.50" in text and "compiled: ctc_multi / optax = 0.50" in text
    assert "RSS peak+: ctc_multi" not in text and "RSS peak: ctc_multi" not in text
    on_cpu = runner.memory_text("long", [dict(r, device_peak_bytes=None) for r in results])
    assert "RSS peak+: ctc_multi / optax = 0.06" in on_cpu


def test_cudnn_anchor_is_unavailable_for_labels_it_would_hand_to_torchs_own_kernel():
    """cuDNN takes label sequences shorter than 256; past that torch runs its native kernel, which
    must not be timed under cuDNN's name (`long`, N = 400)."""
    runner = load_runner()
    from ctc_multi.shapes import SHAPES, random_problem

    for name, expected in (("long", "shorter than 256; this one has"), ("small", "runs on CUDA only")):
        case = runner.compare.Case(random_problem(SHAPES[name], 0, "float32"), blank_id=0, source=name)
        with pytest.raises(runner.compare.Unavailable, match=expected):
            runner._prepare_torch_cudnn(case, "cuda" if name == "long" else "cpu")


def test_targets_heading_says_so_when_no_target_is_on_the_chosen_shapes():
    """`run.py --shapes small` printed the targets' heading and nothing under it."""
    runner = load_runner()
    text = runner.targets_text(runner.check_targets([], "cpu"))
    assert text.splitlines()[1].strip().startswith("none on these shapes"), text


def test_faults_times_numpy_alone_with_its_scratch_kept_or_fresh(capsys):
    """benchmarks/faults.py: one line per shape, its setting named; --fresh switches the reuse off
    for the run (and the switch is what the run leaves)."""
    from ctc_multi.backends import numpy as numpy_backend

    faults = load_beside_runner("faults.py")
    saved = numpy_backend.REUSE_SCRATCH
    try:
        assert faults.main(["--shapes", "small", "--calls", "1", "--fresh"]) == 0
        assert numpy_backend.REUSE_SCRATCH is False
        assert faults.main(["--shapes", "small", "--calls", "1"]) == 0
        assert numpy_backend.REUSE_SCRATCH is True
    finally:
        numpy_backend.REUSE_SCRATCH = saved
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[:3] for line in lines] == [["small", "scratch", "fresh"], ["small", "scratch", "kept"]]
    assert all(line.endswith("page faults a call") for line in lines)
