"""The CPU trainer-step benchmark (TRL DPO vs fastpref DPO / Sr-DPO, LoRA and full) at a tiny model, in-process:
every method and mode recorded, rounds interleaved with rotating order, medians over rounds, ratios to TRL DPO."""

from __future__ import annotations

import json

import pytest


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("bench_step_cpu")


def test_defaults_are_the_issue_model(bench):
    args = bench.parse_args([])
    assert args.model_overrides["hidden_size"] == 256 and args.model_overrides["num_hidden_layers"] == 4
    assert args.vocab == 32000 and args.modes == ["lora", "full"] and args.backend is None
    assert args.methods == ["trl_dpo_precomputed", "fastpref_dpo", "fastpref_sr_dpo"]


def test_every_method_and_mode_with_medians_and_ratios(bench):
    pytest.importorskip("trl")
    path = bench.main(["--rounds", "2", "--pairs", "2", "--micro-batch", "1", "--steps", "1", "--warmup", "1",
                       "--case", "6", "5", "7", "--hidden", "64", "--vocab", "601"])
    assert path.with_suffix(".png").exists()
    records = json.loads(path.read_text())["records"]
    assert {(r["mode"], r["method"]) for r in records} == {
        (m, x) for m in ("lora", "full") for x in ("trl_dpo_precomputed", "fastpref_dpo", "fastpref_sr_dpo")}
    for r in records:
        assert r["status"] == "ok" and len(r["round_step_ms"]) == 2, r
        assert min(r["round_step_ms"]) <= r["step_ms"] <= max(r["round_step_ms"])
        assert r["over_trl_dpo"] == pytest.approx(r["step_ms"] / next(
            t["step_ms"] for t in records if t["config"] == r["config"] and t["method"] == "trl_dpo_precomputed"))


def test_rounds_rotate_the_method_order(bench):
    methods = ["a", "b", "c"]
    assert [bench._rotated(methods, i) for i in range(4)] == [["a", "b", "c"], ["b", "c", "a"], ["c", "a", "b"],
                                                              ["a", "b", "c"]]


def test_budget_stops_before_a_round_that_would_overrun(bench):
    """--budget 0: the first round runs (its JSON and PNG written), no later one starts; F and the tree agreement
    come from that round."""
    path = bench.main(["--rounds", "3", "--budget", "0", "--methods", "fastpref_dpo", "fastpref_sr_dpo",
                       "--modes", "lora", "--pairs", "2", "--micro-batch", "1", "--steps", "1", "--warmup", "1",
                       "--case", "6", "5", "7", "--hidden", "64", "--vocab", "601"])
    assert path.with_suffix(".png").exists()
    saved = json.loads(path.read_text())
    assert saved["meta"]["rounds_done"] == 1 and saved["meta"]["budget_s"] == 0
    records = saved["records"]
    assert [len(r["round_step_ms"]) for r in records] == [1, 1]
    assert "max_abs_diff_aug" in next(r for r in records if r["method"] == "fastpref_sr_dpo")
