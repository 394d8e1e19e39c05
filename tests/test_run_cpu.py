"""benchmarks/run_cpu.sh, issue 11's one CPU command: its --smoke run goes through all four parts (heads, fused
DPO, trainer step, targets) into the results folder, and the record measures the forward rows the targets need."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "run_cpu.sh"


def test_unknown_argument_is_refused():
    done = subprocess.run(["bash", str(SCRIPT), "--fast"], capture_output=True, text=True)
    assert done.returncode == 2 and "unknown argument --fast" in done.stderr


def test_the_record_runs_the_heads_in_both_modes():
    assert "bench_linear_logps_cpu.py --modes fwd fwd+bwd" in SCRIPT.read_text()  # the bf16 fwd target needs them


@pytest.mark.slow
def test_smoke_run_writes_every_part_and_the_targets(tmp_path):
    pytest.importorskip("trl")
    pytest.importorskip("liger_kernel")
    env = dict(os.environ, FASTPREF_RESULTS_DIR=str(tmp_path), PYTHON=sys.executable, OMP_NUM_THREADS="1")
    done = subprocess.run(["bash", str(SCRIPT), "--smoke"], capture_output=True, text=True, env=env, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    names = {p.name for p in tmp_path.iterdir()}
    for name in ("linear_logps_cpu_heads", "fused_dpo_cpu", "step_cpu", "targets_cpu"):
        assert {f"{name}.json", f"{name}.png"} <= names, names
    checks = json.loads((tmp_path / "targets_cpu.json").read_text())["records"]
    measured = {c["target"] for c in checks if c["figure"] is not None}
    assert {"frozen_vs_trainable", "bf16_fwd_vs_gemm", "bf16_trainable_vs_4_gemms", "fused_dpo_vs_liger",
            "extra_memory_mib", "sr_dpo_lora_vs_trl"} <= measured
