"""The CPU fused DPO benchmark (fastpref vs Liger's fused DPO loss) at a tiny shape: both peers, both heads, both
dtypes, ratios; the two compute the same loss; a peer that cannot be imported is recorded as skipped."""

from __future__ import annotations

import json
import sys

import pytest
import torch


@pytest.fixture
def bench(load_benchmark):
    return load_benchmark("bench_fused_dpo_cpu")


def test_fastpref_and_liger_compute_the_same_loss(bench):
    pytest.importorskip("liger_kernel")
    hidden, weight, labels, ref_logps = bench._inputs((2 * 7, 16, 101), torch.float32, "trainable")
    zero_ref = torch.zeros_like(ref_logps)  # Liger without a reference model takes the reference as 0
    ours = bench._loss_fn("fastpref")(hidden, weight, labels, zero_ref)
    theirs = bench._loss_fn("liger")(hidden, weight, labels, zero_ref)
    assert ours.item() == pytest.approx(theirs.item(), rel=1e-4)
    assert ours.item() != pytest.approx(bench._loss_fn("fastpref")(hidden, weight, labels, ref_logps).item())


def test_records_both_peers_heads_and_dtypes_with_ratios(bench, tmp_path):
    pytest.importorskip("liger_kernel")
    path = bench.main(["--shapes", "40x16x101"])
    assert path.with_suffix(".png").exists()
    records = json.loads(path.read_text())["records"]
    assert {(r["impl"], r["head"], r["dtype"]) for r in records} == {
        (i, h, d) for i in ("fastpref", "liger") for h in ("frozen", "trainable") for d in ("float32", "bfloat16")}
    assert all(r["status"] == "ok" and r["best_ms"] > 0 and r["peak_mib"] >= 0 for r in records), records
    assert all(r["time_over_fastpref"] == 1.0 for r in records if r["impl"] == "fastpref")
    assert all(r["time_over_fastpref"] > 0 for r in records)


def test_a_peer_that_fails_to_import_is_recorded_as_skipped(bench, monkeypatch):
    monkeypatch.setitem(sys.modules, "liger_kernel.chunked_loss", None)  # import now raises ImportError
    path = bench.main(["--shapes", "40x16x101", "--dtypes", "float32", "--heads", "frozen", "--no-plot"])
    by_impl = {r["impl"]: r for r in json.loads(path.read_text())["records"]}
    assert by_impl["fastpref"]["status"] == "ok"
    assert by_impl["liger"]["status"].startswith("skipped: ModuleNotFoundError") and by_impl["liger"]["best_ms"] is None
    assert by_impl["liger"]["time_over_fastpref"] is None
