"""benchmarks/run.py: each mode writes its own JSON by default, so no run overwrites another's."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
