"""Issue 11's target checks from hand-made benchmark records: each figure, limit and verdict, the gradient memory
left out of the extra memory, and files that are missing reported as not measured."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
CASE = "N8 D4 V16 bfloat16"


@pytest.fixture
def targets(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import targets_cpu

    monkeypatch.setenv("FASTPREF_RESULTS_DIR", str(tmp_path))
    return targets_cpu


def _head(impl, mode, head, ms, **extra):
    return dict(dict(impl=impl, mode=mode, head=head, case=CASE, dtype="bfloat16", rows=8, dim=4, vocab=16,
                     best_ms=ms, peak_mib=0.0), **extra)


def _write(folder, name, records):
    (folder / f"{name}.json").write_text(json.dumps({"records": records}))


def _by_target(checks):
    return {(c["target"], c["case"]): c for c in checks}


def test_figures_limits_and_verdicts(targets, tmp_path):
    _write(tmp_path, "linear_logps_cpu_heads", [
        _head("cpp", "fwd", "frozen", 3.0, time_over_gemm_floor=1.5),  # at the limit: met
        _head("cpp", "fwd+bwd", "frozen", 6.0, peak_mib=64.0 + 8 * 4 * 2 / 2**20),  # 64 MiB + the hidden gradient
        _head("cpp", "fwd+bwd", "trainable", 10.0, time_over_gemm_floor=1.6, peak_mib=65.0 + 24 * 4 * 2 / 2**20),
        _head("eager", "fwd+bwd", "frozen", 6.0), _head("compile", "fwd+bwd", "frozen", 12.0)])
    _write(tmp_path, "fused_dpo_cpu", [
        dict(impl=i, head="frozen", case=CASE, dtype="bfloat16", rows=8, dim=4, vocab=16, best_ms=ms, peak_mib=0.0)
        for i, ms in (("fastpref", 1.0), ("liger", 2.0))])
    _write(tmp_path, "step_cpu", [dict(mode="lora", method="fastpref_sr_dpo", config="m/lora/cpu", over_trl_dpo=0.3)])
    checks = _by_target(targets.evaluate(tmp_path))
    ratio = checks["frozen_vs_trainable", CASE]
    assert ratio["figure"] == pytest.approx(0.6) and ratio["met"]
    assert checks["frozen_vs_eager", CASE]["met"] is False  # equal is not faster
    assert checks["frozen_vs_compile", CASE]["met"] is True
    assert checks["frozen_vs_cce", CASE]["met"] is None  # not measured
    assert checks["bf16_fwd_vs_gemm", CASE]["met"] is True
    assert checks["bf16_trainable_vs_4_gemms", CASE]["met"] is False
    frozen_mem = checks["extra_memory_mib", f"linear_logps fwd+bwd frozen {CASE}"]
    trainable_mem = checks["extra_memory_mib", f"linear_logps fwd+bwd trainable {CASE}"]
    assert frozen_mem["figure"] == pytest.approx(64.0) and frozen_mem["met"]
    assert trainable_mem["figure"] == pytest.approx(65.0) and trainable_mem["met"] is False
    assert checks["fused_dpo_vs_liger", f"frozen {CASE}"]["figure"] == pytest.approx(0.5)
    assert checks["sr_dpo_lora_vs_trl", "m/lora/cpu"]["met"] is True


def test_missing_files_are_not_measured_and_main_writes_json(targets, tmp_path):
    path = targets.main([])
    checks = json.loads(path.read_text())["records"]
    assert {c["target"] for c in checks} == {"frozen_vs_trainable", "fused_dpo_vs_liger", "sr_dpo_lora_vs_trl"}
    assert all(c["met"] is None and c["figure"] is None for c in checks)
    assert not path.with_suffix(".png").exists()  # nothing measured, nothing drawn
