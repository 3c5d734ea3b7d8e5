#!/usr/bin/env bash
# One prepared run for a lent GPU machine (H100/H200, jax + torch + optax preinstalled, no network).
#
#   OUT=/some/folder bash benchmarks/gpu_check.sh            # on the GPU machine
#   OUT=/tmp/out bash benchmarks/gpu_check.sh --dry-run      # anywhere: CPU, small shape, quick
#
# Each step writes its own files (environment.txt, tests_cuda.txt, bench_cuda.txt + .json, .png,
# tests_all.txt, torch_graph_cuda.txt, occupancy_cuda.txt + .json, unroll_cuda.txt,
# memory_cuda.txt + .json, latency_cuda.txt, kernels_cuda.txt, vendor.txt) into a scratch folder
# ($WORK); $OUT gets three files, since the device tool brings back at most 8: summary.txt,
# bench_cuda.txt and gpu_check.tgz (all of them), packed on exit whatever happened.
# Steps run in order of value, each under its own timeout taken from one overall budget
# (BUDGET_S, default 560 s; a lent machine has 15 minutes in all, its start included), so a slow
# or hung step costs only its share and whatever finished still comes back:
#   1. environment (nvidia-smi, versions, devices)
#   2. the GPU-specific tests (tests/test_cuda.py: torch CUDA and jax GPU against the reference)
#   3. the benchmark on every named shape, big included, anchors (optax, torch native, cuDNN) in the same run
#   4. the torch backend replayed from a CUDA graph against eager calls (benchmarks/gpu_torch_graph.py)
#   5. peak memory of jax fwd+bwd on `long`, ctc_multi vs optax, each in a fresh process
#   6. the whole test suite (JAX tests run on the GPU there: jax puts new arrays on it by default)
#   7. what run.py's round adds to small's jax fwd+bwd, ours and optax's (benchmarks/latency.py)
#   8. the kernels of jax fwd+bwd on bpe (benchmarks/kernels.py)
#   9. jax fwd+bwd against optax for several loop unrolls (benchmarks/gpu_unroll.py)
#  10. jax fwd+bwd with the occupancies of the shares instead of its GPU default, the mirror image
#      (last, since two runs have measured it: the unroll sweep, skipped in both, goes first)
# On the H100 (2026-11-27, benchmarks/gpu_runs/2026-11-27-h100/, before step 6 existed) steps 2
# to 5 took 19, 168, 15 and 27 s, the whole suite 150 s, the kernels 4 s and the shares 81 s; the
# unroll sweep was left out of BUDGET_S=480 (about 30 s of the 15 minutes went on the start).
# On the next H100 (benchmarks/gpu_runs/2026-11-27-h100-db48c31/) steps 2 to 8 took 14, 159, 15,
# 20, 36, 155 and 5 s; the shares' step was cut at the 65 s left of BUDGET_S=480 after char and
# long, and the unroll sweep was skipped (about 30 s went on the start).
# On an H200 (benchmarks/gpu_runs/2026-11-28-h200-724deaa/, the suite then the 6th step) steps 2
# to 5 took 21, 178, 17 and 26 s; the latency step was cut at 40 s and the suite, 1349 tests by
# then, at 200 s (96 %; alone it took 272 s with -n 12), so the suite now goes before the latency
# step with a longer limit, and the default budget is 560 s (about 35 s went on the start).
#
# ctc_multi runs from this checkout (PYTHONPATH), nothing is installed. Pure-Python test
# dependencies missing on the machine (array-api-compat is required, array-api-strict is for the
# tests; the lent H100 had pytest, xdist and hypothesis, not those two) can be brought along: here, run
#   pip install --no-deps --target benchmarks/results/vendor array-api-compat hypothesis array-api-strict \
#     sortedcontainers attrs pytest iniconfig pluggy packaging pytest-xdist execnet
# (hypothesis has a compiled part: add the one for the machine's Python, 3.12 on the lent
# machines, from `pip download --python-version 3.12 --only-binary=:all: hypothesis==<same>`)
# and pass benchmarks/results/vendor in the device run's `carry`; only what the machine lacks is
# taken from it (vendor.txt in the tgz says which).
set -u
: "${OUT:?set OUT to the folder whose files come back}"
cd "$(dirname "$0")/.."
mkdir -p "$OUT"
WORK=$(mktemp -d)  # the steps' files, packed into $OUT on exit
pack() {
  cp "$WORK/summary.txt" "$WORK/bench_cuda.txt" "$OUT/" 2>/dev/null
  tar czf "$OUT/gpu_check.tgz" -C "$WORK" .
}
trap pack EXIT

DRY_RUN=0
[ "${1:-}" = "--dry-run" ] && DRY_RUN=1
BUDGET_S=${BUDGET_S:-560}
VENDOR=${VENDOR:-benchmarks/results/vendor}
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
export XLA_PYTHON_CLIENT_PREALLOCATE=false  # jax takes GPU memory as it needs it: the peaks mean something
PYTHON=${PYTHON:-$(command -v python || command -v python3)}  # the lent machines have python3 only
# Only the distributions the machine lacks are taken from $VENDOR (PYTHONPATH would put every one
# of them ahead of the machine's own): each is linked, with its dist-info, into $WORK/vendor.
if [ -d "$VENDOR" ]; then
  "$PYTHON" - "$VENDOR" "$WORK/vendor" <<'EOF' >"$WORK/vendor.txt" 2>&1
import csv, importlib.metadata, os, sys
from pathlib import Path
vendor, linked = Path(sys.argv[1]).resolve(), Path(sys.argv[2])
linked.mkdir()
for info in sorted(vendor.glob("*.dist-info")):
    name = info.name.split("-")[0]
    try:
        print(f"{name}: the machine's {importlib.metadata.version(name)}")
        continue
    except importlib.metadata.PackageNotFoundError:
        pass
    with open(info / "RECORD", newline="") as record:
        tops = {Path(row[0]).parts[0] for row in csv.reader(record) if row and not row[0].startswith("..")}
    for top in tops:
        if (vendor / top).exists() and not (linked / top).exists():
            os.symlink(vendor / top, linked / top)
    print(f"{name}: vendored ({', '.join(sorted(tops))})")
EOF
  export PYTHONPATH="$PYTHONPATH:$WORK/vendor"
fi

if [ "$DRY_RUN" = 1 ]; then
  DEVICE=cpu; SHAPES=small; REPEATS=5; MEMORY_SHAPE=small; UNROLL_SHAPES=small; KERNELS_SHAPE=small; SUITE="tests/test_sharding.py tests/test_cuda.py"
else
  DEVICE=cuda; SHAPES=small,char,bpe,long,vocab5k,big; REPEATS=10; MEMORY_SHAPE=long; UNROLL_SHAPES=char,long,big; KERNELS_SHAPE=bpe; SUITE=tests
fi

STARTED=$SECONDS
summary() { echo "$*" | tee -a "$WORK/summary.txt"; }
# step NAME CAP_SECONDS OUTPUT_FILE COMMAND...: run under min(CAP, what is left of the budget)
step() {
  local name=$1 cap=$2 file=$3; shift 3
  local left=$((BUDGET_S - (SECONDS - STARTED)))
  local limit=$((cap < left ? cap : left))
  if [ "$limit" -lt 20 ]; then summary "SKIPPED $name: budget spent"; return; fi
  local t0=$SECONDS
  timeout --kill-after=10 "$limit" "$@" >"$WORK/$file" 2>&1
  local rc=$?
  local verdict=ok; [ $rc = 124 ] && verdict="TIMED OUT after ${limit}s"; [ $rc != 0 ] && [ $rc != 124 ] && verdict="exit $rc"
  summary "$(printf '%-12s %-22s %4ss  (%s)' "$name" "$verdict" $((SECONDS - t0)) "$file")"
}

summary "gpu_check $(date -u +%FT%TZ) dry_run=$DRY_RUN device=$DEVICE budget=${BUDGET_S}s"
{
  timeout 20 nvidia-smi || echo "no nvidia-smi"
  timeout 60 "$PYTHON" - <<'EOF'
import importlib, importlib.util
for name in ("numpy", "jax", "jaxlib", "torch", "optax", "array_api_compat", "pytest", "hypothesis", "array_api_strict", "matplotlib"):
    spec = importlib.util.find_spec(name)
    print(f"{name:18s}", getattr(importlib.import_module(name), "__version__", "?") if spec else "MISSING")
try:
    import jax; print("jax devices:", jax.devices())
except Exception as error: print("jax:", error)
try:
    import torch; print("torch cuda:", torch.cuda.is_available(), torch.cuda.get_device_name(0) if torch.cuda.is_available() else "", "cudnn", torch.backends.cudnn.version())
except Exception as error: print("torch:", error)
EOF
} >"$WORK/environment.txt" 2>&1
summary "$(grep -E 'MISSING|devices|cuda' "$WORK/environment.txt" | tr '\n' ';')"

step cuda-tests 90 tests_cuda.txt "$PYTHON" -m pytest -q -rs -p no:cacheprovider tests/test_cuda.py
step benchmark 220 bench_cuda.txt "$PYTHON" benchmarks/run.py --device "$DEVICE" --shapes "$SHAPES" --repeats "$REPEATS" --budget 15 \
  --json "$WORK/bench_cuda.json" --plot "$WORK/bench_cuda.png"
step torch-graph 60 torch_graph_cuda.txt "$PYTHON" benchmarks/gpu_torch_graph.py --shapes "$UNROLL_SHAPES"
step memory 50 memory_cuda.txt "$PYTHON" benchmarks/run.py --memory --device "$DEVICE" --shapes "$MEMORY_SHAPE" --json "$WORK/memory_cuda.json"
XDIST=""; "$PYTHON" -c "import xdist" 2>/dev/null && XDIST="-n 8"
# shellcheck disable=SC2086  # XDIST and SUITE are lists
step all-tests 250 tests_all.txt "$PYTHON" -m pytest -q -x -p no:cacheprovider $XDIST $SUITE
step latency 50 latency_cuda.txt "$PYTHON" benchmarks/latency.py --device "$DEVICE" --shape small
# Where the GPU default's fwd+bwd spends its time, kernel by kernel, on the shape it is slowest on.
step kernels 45 kernels_cuda.txt "$PYTHON" benchmarks/kernels.py --device "$DEVICE" --shape "$KERNELS_SHAPE" --direction fwd+bwd --calls 3 --top 25
step unroll 90 unroll_cuda.txt "$PYTHON" benchmarks/gpu_unroll.py --shapes "$UNROLL_SHAPES"
# The JAX backend with the shares and a reverse scan for its gradient (run.py --occupancy), to set
# against its GPU default (the mirror image's one scan) in bench_cuda.txt.
# (numpy is not run there; torch's own ops take the mirror image everywhere.)
step occupancy 110 occupancy_cuda.txt "$PYTHON" benchmarks/run.py --device "$DEVICE" --occupancy shares --backends jax \
  --shapes "$UNROLL_SHAPES" --repeats 5 --budget 5 --json "$WORK/occupancy_cuda.json"

tail -n 30 "$WORK/bench_cuda.txt" >>"$WORK/summary.txt" 2>/dev/null
tail -n 3 "$WORK/tests_all.txt" >>"$WORK/summary.txt" 2>/dev/null
summary "total $((SECONDS - STARTED))s"
