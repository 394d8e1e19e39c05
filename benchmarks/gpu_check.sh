#!/usr/bin/env bash
# Issue 12's prepared GPU check: one command, at most ~9 minutes, every GPU figure, each part capped and its
# results in the output folder as soon as it ends.
#
#   bash benchmarks/gpu_check.sh --prepare .whl    # HERE (network): fetch the wheels, record the git sha in .whl/
#   bash benchmarks/gpu_check.sh --wheels .whl     # THERE (device tool, carry [".whl"]): the check itself
#   bash benchmarks/gpu_check.sh --dry-run         # CPU, < 1 minute: the same orchestration at tiny shapes
#
# Parts (cap in seconds): 1 setup (40): install the carried wheels and fastpref without building csrc/, print
# versions; 2 probe (75): benchmarks/gpu_probe.py; 3 tests (210): pytest -m gpu, then the device-placed
# tests/test_triton_logps.py; 4 kernels (150): bench_linear_logps_gpu.py --budget; 5 step (130):
# bench_step_gpu.py --budget; 6 tiles (what is left): bench_tiles_gpu.py --budget. The whole run stops by
# --total seconds (540); a part gets min(its cap, time left). Caps can be changed with GPU_CHECK_CAP_<PART>=s.
#
# Output folder: --out, else $OUT (the device tool's), else benchmarks/results/gpu/. It receives at most 7 files
# (the device tool returns 8): gpu_check_summary.json (parts, environment), gpu_probe.json, gpu_tests.json,
# gpu_linear_logps.json, gpu_step.json, gpu_tiles.json, gpu_check.log. Every JSON carries the GPU name, library
# versions, git sha and date (record.py). Draw PNGs afterwards on a CPU: python benchmarks/plot_gpu_check.py DIR.
# Exit status: 0 when every part is ok, 1 otherwise (the summary names the parts that were not).
set -u

WHEEL_PINS=(trl==1.16.0 liger-kernel==0.8.5 cut-cross-entropy==25.1.1 datasets==5.2.0 dill==0.4.1
            multiprocess==0.70.19)
DRY=0 WHEELS="" OUTDIR="${OUT:-}" TOTAL=540 PREPARE=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --wheels) WHEELS="$2"; shift ;;
    --out) OUTDIR="$2"; shift ;;
    --total) TOTAL="$2"; shift ;;
    --prepare) PREPARE="$2"; shift ;;
    -h|--help) sed -n '2,22p' "$0"; exit 0 ;;
    *) echo "gpu_check.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
  esac
  shift
done

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-python3}"

if [ -n "$PREPARE" ]; then  # on the CPU machine: wheels for the image's Python 3.12, and the sha to name
  mkdir -p "$PREPARE"
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d "$PREPARE" "${WHEEL_PINS[@]}" || exit 1
  sha="$(git rev-parse HEAD)"; [ -n "$(git status --porcelain --untracked-files=no)" ] && sha="$sha-dirty"
  echo "$sha" > "$PREPARE/GIT_SHA"
  ls -l "$PREPARE"; du -sh "$PREPARE"; echo "GIT_SHA $sha"
  exit 0
fi

[ -n "$OUTDIR" ] || OUTDIR="$REPO/benchmarks/results/gpu"
mkdir -p "$OUTDIR" || exit 2
OUTDIR="$(cd "$OUTDIR" && pwd)"
export FASTPREF_RESULTS_DIR="$OUTDIR" PYTHONUNBUFFERED=1 FASTPREF_SKIP_VALUE_CHECKS=1
LOG="$OUTDIR/gpu_check.log"
: > "$LOG"
if sha="$(git rev-parse HEAD 2>/dev/null)"; then
  [ -n "$(git status --porcelain --untracked-files=no 2>/dev/null)" ] && sha="$sha-dirty"
elif [ -n "$WHEELS" ] && [ -f "$WHEELS/GIT_SHA" ]; then
  sha="$(cat "$WHEELS/GIT_SHA")"
else
  sha="${GIT_SHA:-unknown}"
fi
export GIT_SHA="$sha"
if [ "$DRY" = 1 ]; then
  export TRITON_INTERPRET=1 CUDA_VISIBLE_DEVICES=""
fi
START=$(date +%s)
SITE=/tmp/gpu_check_site
REPORT=benchmarks/gpu_check_report.py

# run_part NAME CAP EXPECTED_JSON COMMAND...: run COMMAND under min(CAP, time left), log it, record the outcome.
run_part() {
  local name="$1" cap="$2" expect="$3"; shift 3
  local override="GPU_CHECK_CAP_${name^^}"
  cap="${!override:-$cap}"
  local left=$(( START + TOTAL - $(date +%s) ))
  [ "$cap" -gt "$left" ] && cap="$left"
  if [ "$cap" -lt 1 ]; then
    "$PY" "$REPORT" part --name "$name" --skipped --cap "$cap" | tee -a "$LOG"
    return
  fi
  echo "=== part $name: cap ${cap} s, started $(date -u +%H:%M:%S)" | tee -a "$LOG"
  local began=$(date +%s)
  PART_CAP="$cap" timeout -s INT -k 10 "$cap" "$@" >> "$LOG" 2>&1
  local rc=$?
  "$PY" "$REPORT" part --name "$name" --rc "$rc" --seconds $(( $(date +%s) - began )) --cap "$cap" \
    --expect $expect | tee -a "$LOG"
}

part_setup() {
  set -e
  if [ -n "$WHEELS" ] && [ ! -d "$WHEELS" ]; then echo "no wheels folder $WHEELS"; exit 2; fi
  if [ "$DRY" = 1 ]; then
    echo "dry run: no install (the checkout's environment is used)"
  else
    rm -rf "$SITE"
    local wheels=()
    [ -n "$WHEELS" ] && wheels=("$WHEELS"/*.whl)
    # fastpref without its C++ extension (FASTPREF_NO_EXT=1: no csrc/ build), with the carried wheels, all
    # --no-deps: the image's torch, triton, transformers, peft and accelerate stay as they are.
    FASTPREF_NO_EXT=1 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir \
      --no-build-isolation --upgrade --target "$SITE" "${wheels[@]}" .
  fi
  PYTHONPATH="$([ "$DRY" = 1 ] || echo "$SITE")${PYTHONPATH:+:$PYTHONPATH}" "$PY" "$REPORT" env \
    --dry-run "$DRY" --wheels "$WHEELS" --caps "$CAPS_JSON"
  nvidia-smi 2>/dev/null || true
}

part_tests() {
  # Two pytest runs: the gpu-marked tests, then the device-placed odd-shape tests of test_triton_logps.py, 8
  # workers each. Run A keeps each file in one worker (--dist loadfile): its compile test must follow eager calls
  # of the triton backend, since a process whose first call is traced fails on load_kernels' import (see
  # benchmarks/README.md). Run B is one file, spread over the workers (--dist load).
  local gpu_args=(-q -p no:cacheprovider -rfE) sel_a=(-m gpu tests/) sel_b=(tests/test_triton_logps.py -m "not gpu")
  if [ "$DRY" = 1 ]; then
    sel_a=(-m gpu tests/test_gpu_logps.py)
    sel_b=(tests/test_triton_logps.py -k test_compact_rows_puts_scored_rows_first_in_order)
  else
    gpu_args+=(-n 8 --timeout 120)
  fi
  rm -f /tmp/gpu_tests_a.xml /tmp/gpu_tests_b.xml
  local half=$(( PART_CAP * 3 / 5 ))
  local dist_a=() dist_b=()
  [ "$DRY" = 1 ] || { dist_a=(--dist loadfile); dist_b=(--dist load); }
  timeout -s INT -k 5 "$half" "$PY" -P -m pytest "${gpu_args[@]}" "${dist_a[@]}" --junitxml=/tmp/gpu_tests_a.xml \
    "${sel_a[@]}"
  local rc_a=$?
  local rest=$(( PART_CAP - ($(date +%s) - PART_START) - 8 ))
  local rc_b=124
  if [ "$rest" -gt 5 ]; then
    timeout -s INT -k 5 "$rest" "$PY" -P -m pytest "${gpu_args[@]}" "${dist_b[@]}" --junitxml=/tmp/gpu_tests_b.xml \
      "${sel_b[@]}"
    rc_b=$?
  fi
  "$PY" "$REPORT" junit /tmp/gpu_tests_a.xml /tmp/gpu_tests_b.xml --name gpu_tests
  echo "pytest exit codes: gpu-marked $rc_a, test_triton_logps $rc_b"
  [ "$rc_a" = 0 ] && [ "$rc_b" = 0 ]
}

export -f part_setup part_tests
CAPS_JSON='{"setup": 40, "probe": 75, "tests": 210, "kernels": 150, "step": 130, "tiles": "rest", "total": '"$TOTAL"'}'
export DRY WHEELS SITE PY REPORT CAPS_JSON
DRY_FLAG=""; [ "$DRY" = 1 ] && DRY_FLAG="--dry-run"
STEP_FLAGS=""; [ "$DRY" = 1 ] && STEP_FLAGS="--smoke --methods fastpref_sr_dpo fastpref_dpo --modes lora"
export DRY_FLAG STEP_FLAGS

# A benchmark's --budget is its cap less the longest single measurement it may still be in (it saves after each).
run_part setup 40 gpu_check_summary.json bash -c part_setup
[ "$DRY" = 1 ] || export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
# The checkout's fastpref/ has no kernels/ inside (setup.py maps it): keep the working directory off sys.path so
# every python (tests' subprocesses too) imports the installed package. The scripts put their own folder first.
export PYTHONSAFEPATH=1
run_part probe 75 gpu_probe.json "$PY" benchmarks/gpu_probe.py $DRY_FLAG --name gpu_probe
run_part tests 210 gpu_tests.json bash -c 'PART_START=$(date +%s); part_tests'
run_part kernels 150 gpu_linear_logps.json bash -c 'exec "$PY" benchmarks/bench_linear_logps_gpu.py $DRY_FLAG \
  --budget $((PART_CAP - 30)) --no-plot --name gpu_linear_logps'
run_part step 130 gpu_step.json bash -c 'exec "$PY" benchmarks/bench_step_gpu.py $STEP_FLAGS \
  --budget $((PART_CAP - 45)) --no-plot --results-name gpu_step'
run_part tiles $(( START + TOTAL - $(date +%s) - 5 )) gpu_tiles.json bash -c 'exec "$PY" benchmarks/bench_tiles_gpu.py \
  $DRY_FLAG --budget $((PART_CAP - 25)) --no-plot --name gpu_tiles'

"$PY" "$REPORT" summary 2>&1 | tee -a "$LOG"
exit "${PIPESTATUS[0]}"
