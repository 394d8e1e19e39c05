#!/usr/bin/env bash
# Issue 11's CPU record in one command: the head table, the fused DPO row, the trainer step, then the targets.
#
#   bash benchmarks/run_cpu.sh            # the record: ≤ 12 minutes on 2 quiet cores, into benchmarks/results/
#   bash benchmarks/run_cpu.sh --smoke    # the same orchestration at tiny shapes (about a minute; tests use it)
#
# Parts (cap in seconds; each script saves after every measurement, so a capped part keeps what it measured):
#   1 heads (330): bench_linear_logps_cpu.py --modes fwd fwd+bwd: every peer, frozen and trainable, fp32 and bf16
#   2 dpo   (180): bench_fused_dpo_cpu.py: fastpref linear_logps + preference_loss vs Liger's fused DPO loss
#   3 step  (170): bench_step_cpu.py: TRL 1.16 DPO vs fastpref DPO / Sr-DPO, LoRA and full, up to 3 interleaved
#                  rounds, none started that would end past the cap less 20 s (--budget)
#   4 targets:     targets_cpu.py: each target met or not, from the three JSONs (targets_cpu.json + .png)
# Caps change with RUN_CPU_CAP_<PART>=s. Missing pinned peers (liger-kernel 0.8.5, cut-cross-entropy 25.1.1,
# trl 1.16.0) are installed first with pip --no-deps. $PYTHON picks the interpreter (default .venv/bin/python);
# FASTPREF_RESULTS_DIR moves the output folder. Exit status 1 when a part failed or hit its cap.
set -u

SMOKE=0
case "${1:-}" in
  --smoke) SMOKE=1 ;;
  "") ;;
  -h|--help) sed -n '2,16p' "$0"; exit 0 ;;
  *) echo "run_cpu.sh: unknown argument $1 (see --help)" >&2; exit 2 ;;
esac
REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$REPO" || exit 2
PY="${PYTHON:-.venv/bin/python}"
PINS=(liger-kernel==0.8.5 cut-cross-entropy==25.1.1 trl==1.16.0)

for pin in "${PINS[@]}"; do
  if ! "$PY" -c "import importlib.metadata as m, sys; n, v = sys.argv[1].split('=='); sys.exit(m.version(n) != v)" \
      "$pin" 2>/dev/null; then
    echo "== installing $pin (--no-deps)"
    "$PY" -m pip install -q --no-deps "$pin" || echo "run_cpu.sh: could not install $pin; its rows are skipped" >&2
  fi
done

if [ "$SMOKE" = 1 ]; then
  HEADS=(--shapes 37x16x101 --impls gemm_floor eager cpp)
  DPO=(--shapes 40x16x101)
  STEP=(--rounds 2 --pairs 2 --micro-batch 1 --steps 1 --warmup 1 --case 6 5 7 --hidden 64 --vocab 601)
else
  HEADS=() DPO=() STEP=()
fi

STATUS=0
part() {  # part NAME CAP SCRIPT ARGS...
  local name="$1" cap="$2" script="$3"; shift 3
  local start=$SECONDS
  echo "== $name (cap ${cap} s): $script $*"
  timeout --signal=INT --kill-after=15 "$cap" "$PY" "benchmarks/$script" "$@"
  local rc=$?
  echo "== $name: exit $rc after $((SECONDS - start)) s"
  [ "$rc" = 0 ] || STATUS=1
}

part heads "${RUN_CPU_CAP_HEADS:-330}" bench_linear_logps_cpu.py --modes fwd fwd+bwd "${HEADS[@]}"
part dpo "${RUN_CPU_CAP_DPO:-180}" bench_fused_dpo_cpu.py "${DPO[@]}"
STEP_CAP="${RUN_CPU_CAP_STEP:-170}"
part step "$STEP_CAP" bench_step_cpu.py --budget $((STEP_CAP - 20)) "${STEP[@]}"
part targets 30 targets_cpu.py
echo "== total $SECONDS s"
exit $STATUS
