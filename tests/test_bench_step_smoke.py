"""The end-to-end step benchmark's code paths, on CPU with a tiny model (``--smoke``), in-process."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("bench_step_gpu")


def _run(bench, methods: list[str], modes: list[str]) -> list[dict]:
    path = bench.main(["--smoke", "--steps", "1", "--warmup", "1", "--modes", *modes, "--methods", *methods])
    assert path.exists() and path.with_suffix(".png").exists()
    return json.loads(path.read_text())["records"]


def test_smoke_fastpref_and_naive_paths(bench):
    methods = ["naive_sr_dpo", "fastpref_dpo", "fastpref_sr_dpo", "fastpref_sr_dpo_naive"]
    records = _run(bench, methods, ["lora", "full_gc"])
    assert [(r["mode"], r["method"]) for r in records] == [(m, x) for m in ("lora", "full_gc") for x in methods]
    for r in records:
        assert r["status"] == "ok" and r["step_ms"] > 0 and r["tokens_per_s"] > 0 and r["floor_ms"] > 0
        multiple = bench.DPO_FLOOR[r["mode"]] + (r["method"] in bench.SR_METHODS)
        assert r["floor_ms"] == pytest.approx(multiple * r["F_ms"])
    for r in records:  # the Sr-DPO run checks its tree/prefix log-probs against full logits (fp32 here)
        if r["method"] == "fastpref_sr_dpo":
            assert r["max_abs_diff_plain"] < 1e-3 and r["max_abs_diff_aug"] < 1e-3 and r["mean_abs_logps"] > 1


def test_smoke_trl_paths(bench):
    pytest.importorskip("trl")
    records = _run(bench, ["trl_dpo", "trl_dpo_precomputed"], ["lora"])
    assert all(r["status"] == "ok" and r["step_ms"] > 0 for r in records)


def test_budget_plan_puts_the_target_ratios_first_and_stops_when_spent(bench):
    args = bench.parse_args(["--smoke", "--budget", "60"])
    assert args.methods == list(bench.BUDGET_METHODS) and args.attn == ["sdpa"]
    assert args.methods[:2] == ["fastpref_sr_dpo", "trl_dpo_precomputed"]  # issue 12's ratio: Sr-DPO / TRL DPO
    assert bench.CASES["p128r256"] == bench.Case("p128r256", 128, 256, 256)
    path = bench.main(["--smoke", "--budget", "-1", "--no-plot", "--modes", "lora", "--methods", "fastpref_dpo",
                       "fastpref_sr_dpo"])
    records = json.loads(path.read_text())["records"]
    assert [r["method"] for r in records] == ["fastpref_dpo", "fastpref_sr_dpo"]
    assert all(r["status"].startswith("skipped: budget") and r["step_ms"] is None for r in records)
    assert not path.with_suffix(".png").exists()


def test_ratios_divide_by_the_same_configuration_baselines(bench):
    records = [dict(config="a", method="trl_dpo_precomputed", step_ms=200.0),
               dict(config="a", method="fastpref_dpo", step_ms=80.0),
               dict(config="a", method="fastpref_sr_dpo", step_ms=100.0),
               dict(config="b", method="fastpref_sr_dpo", step_ms=50.0)]
    bench.add_ratios(records)
    assert records[2]["over_trl_dpo"] == pytest.approx(0.5) and records[2]["over_fastpref_dpo"] == pytest.approx(1.25)
    assert records[3]["over_trl_dpo"] is None and records[3]["over_fastpref_dpo"] is None
