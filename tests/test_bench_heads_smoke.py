"""The CPU head benchmark's code paths (every peer, CCE where cut-cross-entropy is installed — benchmarks/run_cpu.sh
installs it, the test extra does not —, both heads, fp32 and bf16) at a tiny shape."""

from __future__ import annotations

import importlib.util
import json


def test_heads_benchmark_records_every_peer_with_ratios(load_benchmark, tmp_path):
    bench_linear_logps_cpu = load_benchmark("bench_linear_logps_cpu")
    impls = ["gemm_floor", "eager", "cpp"] + (["cce"] if importlib.util.find_spec("cut_cross_entropy") else [])
    bench_linear_logps_cpu.main(["--shapes", "37x16x101", "--impls", *impls])
    path = next(tmp_path.glob("*.json"))
    assert path.with_suffix(".png").exists()  # time and memory panels
    records = json.loads(path.read_text())["records"]
    assert {r["impl"] for r in records} == set(impls)
    assert all(r.get("error") is None and r["best_ms"] > 0 for r in records), records
    assert all(r["time_over_cpp"] is not None for r in records)
    assert {(r["head"], r["dtype"]) for r in records} == {(h, d) for h in ("frozen", "trainable")
                                                          for d in ("float32", "bfloat16")}


def test_plot_draws_one_row_of_panels_per_metric_and_skips_failed_runs(load_benchmark, monkeypatch, tmp_path):
    import matplotlib.pyplot as plt

    record = load_benchmark("record")
    monkeypatch.setenv("FASTPREF_RESULTS_DIR", str(tmp_path))
    records = [dict(impl="a", case="c", head=h, best_ms=1.0, peak_mib=2.0) for h in ("frozen", "trainable")]
    records.append(dict(impl="b", case="c", head="frozen", best_ms=None, error="ImportError"))  # no bar
    path = record.save_results("plot_check", records)
    figures = []
    monkeypatch.setattr(plt, "close", figures.append)
    record.plot_results(path, x="case", y=["best_ms", "peak_mib"], group="impl", facet="head", log_y=True)
    axes = figures[0].axes
    assert [ax.get_ylabel() for ax in axes] == ["best_ms", "best_ms", "peak_mib", "peak_mib"]
    assert [len(ax.patches) for ax in axes] == [1, 1, 1, 1]
    assert path.with_suffix(".png").exists()
