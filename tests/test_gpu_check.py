"""Issue 12: the prepared GPU check, exercised on the CPU.

- ``benchmarks/gpu_check.sh --dry-run`` runs every part (setup, probe, tests, kernels, step, tiles) at tiny
  shapes with Triton in the interpreter: each part must end "ok" and leave its JSON with the GPU name, versions,
  git sha and date, in at most the 8 files the device tool returns.
- A part that fails or runs past its cap is reported as such (summary and exit status), never hidden.
- The benchmarks' ``--budget`` starts nothing once the budget is spent.
- ``resolve_backend`` (reached inside every op, also while torch.compile traces a step) never asks the driver for
  the device name, which broke ``torch.compile(fullgraph=True)`` on CUDA.
"""

from __future__ import annotations

import importlib
import importlib.metadata
import json
import os
import shutil
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.sh"
PARTS = ("setup", "probe", "tests", "kernels", "step", "tiles")
OUTPUTS = {"probe": "gpu_probe.json", "tests": "gpu_tests.json", "kernels": "gpu_linear_logps.json",
           "step": "gpu_step.json", "tiles": "gpu_tiles.json"}
REQUIRED = ("benchmark", "date", "git_sha", "machine", "versions", "meta", "records")
B = importlib.import_module("fastpref.backends")  # fastpref.backends is also the name of the report function


def _run_check(out: Path, *extra: str, env: dict | None = None) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    full_env.pop("OUT", None)
    full_env.pop("FASTPREF_RESULTS_DIR", None)
    return subprocess.run(["bash", str(SCRIPT), "--dry-run", "--out", str(out), *extra], cwd=ROOT, env=full_env,
                          capture_output=True, text=True, timeout=600)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check")
    done = _run_check(out)
    return out, done


def _payload(out: Path, name: str) -> dict:
    return json.loads((out / name).read_text())


@pytest.mark.slow
def test_dry_run_every_part_ok_and_says_so(dry_run):
    out, done = dry_run
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "RESULT: all parts ok" in done.stdout
    parts = {r["part"]: r["status"] for r in _payload(out, "gpu_check_summary.json")["records"]}
    assert {p: parts.get(p) for p in PARTS} == {p: "ok" for p in PARTS}


@pytest.mark.slow
def test_dry_run_writes_each_part_json_with_provenance(dry_run):
    out, _ = dry_run
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
    for name in ("gpu_check_summary.json", *OUTPUTS.values()):
        payload = _payload(out, name)
        assert all(key in payload for key in REQUIRED), (name, sorted(payload))
        assert payload["records"], name
        assert "gpu" in payload["machine"], name
        assert payload["versions"]["torch"] == importlib.metadata.version("torch"), name
        assert payload["git_sha"].startswith(sha), (name, payload["git_sha"])
        assert payload["date"][:4].isdigit(), name
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 8 and "gpu_check.log" in files, files  # the device tool returns 8 files at most


@pytest.mark.slow
def test_dry_run_records_what_each_part_measured(dry_run):
    out, _ = dry_run
    probe = _payload(out, "gpu_probe.json")["records"]
    assert {r["check"] for r in probe} == {"accuracy", "determinism", "gemm_ceiling", "copy_bandwidth"}
    assert all(r["passed"] for r in probe) and {r["dtype"] for r in probe if r["check"] == "accuracy"} == {
        "bfloat16", "float16", "float32"}
    assert any(r["frozen"] for r in probe if r["check"] == "accuracy")
    tests = _payload(out, "gpu_tests.json")
    assert tests["meta"]["counts"]["passed"] >= 1 and tests["meta"]["counts"]["failed"] == 0
    kernels = {(r["impl"], r["mode"]): r for r in _payload(out, "gpu_linear_logps.json")["records"]}
    for key in (("fastpref", "fwd+bwd"), ("fastpref", "fwd+bwd_frozen"), ("fastpref", "fwd"), ("gemm_floor", "fwd")):
        assert kernels[key]["status"] == "ok" and kernels[key]["median_ms"] > 0, key
    assert kernels[("fastpref", "fwd+bwd_frozen")]["floor_gemms"] == 2
    assert "filter_eps=None" in kernels[("cce_exact", "fwd+bwd")]["impl_call"]  # 25.1.1 has no impl="cce_exact"
    step = {r["method"]: r for r in _payload(out, "gpu_step.json")["records"]}
    assert step["fastpref_sr_dpo"]["status"] == "ok" and step["fastpref_sr_dpo"]["over_fastpref_dpo"] > 0
    tiles = [r for r in _payload(out, "gpu_tiles.json")["records"] if r["status"] == "ok"]
    assert {r["op"] for r in tiles} == {"fwd", "bwd_dW"} and len({r["config"] for r in tiles}) >= 2
    assert all(r["agrees"] for r in tiles)


@pytest.mark.slow
def test_pngs_are_drawn_afterwards_from_the_returned_jsons(dry_run, tmp_path, monkeypatch):
    out, _ = dry_run
    for name in OUTPUTS.values():
        shutil.copy(out / name, tmp_path / name)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    drawn = importlib.import_module("plot_gpu_check").draw(tmp_path)
    assert {p.name for p in drawn} == {"gpu_linear_logps.png", "gpu_step.png", "gpu_tiles.png"}  # no memory on CPU
    assert all(p.stat().st_size > 10_000 for p in drawn)
    assert not list(tmp_path.glob("*_ok.json"))


@pytest.mark.slow
def test_a_failing_part_and_a_timed_out_part_are_reported(tmp_path):
    """Setup fails (the wheels folder does not exist), the probe outruns a 1 s cap, the others get what is left
    of 15 s: the summary records each part's outcome and the exit status says the check did not pass."""
    done = _run_check(tmp_path, "--wheels", str(tmp_path / "no-such-wheels"), "--total", "15",
                      env={"GPU_CHECK_CAP_PROBE": "1"})
    assert done.returncode == 1, done.stdout[-3000:]
    parts = {r["part"]: r for r in _payload(tmp_path, "gpu_check_summary.json")["records"]}
    assert parts["setup"]["status"] == "failed" and parts["setup"]["rc"] == 2
    assert parts["probe"]["status"] == "timeout"
    assert set(PARTS) <= set(parts)
    assert all(parts[p]["status"] in ("ok", "failed", "timeout", "skipped") for p in PARTS)
    assert "not ok: " in done.stdout and "setup" in done.stdout.split("not ok: ")[1]
    assert "no wheels folder" in (tmp_path / "gpu_check.log").read_text()


@pytest.fixture
def report(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("FASTPREF_RESULTS_DIR", str(tmp_path))
    return importlib.import_module("gpu_check_report")


def test_part_status_needs_exit_zero_and_a_complete_json(report, tmp_path):
    full = {key: {} for key in REQUIRED} | {"records": [{"x": 1}]}
    (tmp_path / "good.json").write_text(json.dumps(full))
    (tmp_path / "empty.json").write_text(json.dumps(full | {"records": []}))
    (tmp_path / "partial.json").write_text(json.dumps({"records": [{"x": 1}]}))
    assert report.part_status(0, ["good.json"]) == ("ok", [])
    assert report.part_status(1, ["good.json"]) == ("failed", [])
    assert report.part_status(124, ["good.json"]) == ("timeout", [])
    assert report.part_status(0, ["missing.json"]) == ("failed", ["missing.json (missing)"])
    assert report.part_status(0, ["empty.json", "partial.json"]) == (
        "failed", ["empty.json (incomplete)", "partial.json (incomplete)"])


def test_junit_counts_every_outcome_and_a_missing_report(report, tmp_path):
    xml = tmp_path / "a.xml"
    xml.write_text('<testsuites><testsuite name="s">'
                   '<testcase classname="t" name="ok" time="0.5"/>'
                   '<testcase classname="t" name="bad" time="1"><failure message="boom">trace</failure></testcase>'
                   '<testcase classname="t" name="err"><error message="setup broke"/></testcase>'
                   '<testcase classname="t" name="skip"><skipped message="no gpu"/></testcase>'
                   '<testcase classname="t" name="ok2"/></testsuite></testsuites>')
    records, counts = report.junit_records([str(xml), str(tmp_path / "killed.xml")])
    assert counts == {"passed": 2, "failed": 1, "error": 1, "skipped": 1}
    assert {r["test"]: r["outcome"] for r in records}["t::bad"] == "failed"
    assert records[-1]["outcome"] == "no report"


def test_kernel_benchmark_budget_starts_nothing_once_spent(monkeypatch, tmp_path):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    monkeypatch.setenv("FASTPREF_RESULTS_DIR", str(tmp_path))
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")  # main() sets it for its timings; undone after the test
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    bench = importlib.import_module("bench_linear_logps_gpu")
    monkeypatch.setattr(bench, "measure", lambda *a, **k: pytest.fail("measured after the budget was spent"))
    path = bench.main(["--dry-run", "--budget", "-1", "--no-plot", "--name", "spent"])
    records = json.loads(path.read_text())["records"]
    assert len(records) == len(bench.BUDGET_PLAN) and {r["status"] for r in records} == {"skipped"}


# ------------------------------------------------------------------ issue 12 item 1: resolve_backend while tracing

def _refuse_device_name(*args, **kwargs):
    raise AssertionError("resolve_backend asked the driver for the device name")


@pytest.fixture
def cuda_like(monkeypatch):
    """A process where CUDA counts as available and the device name cannot be read (as during tracing)."""
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.delenv("FASTPREF_BACKEND", raising=False)
    monkeypatch.setattr(B, "_TRITON_MISSING", {})  # a fresh process: the status is taken at first use
    monkeypatch.setattr(torch.cuda, "get_device_name", _refuse_device_name)
    with monkeypatch.context() as m:
        m.setattr(torch.cuda, "is_available", lambda: True)
        yield m


def test_resolve_backend_never_reads_the_device_name(cuda_like):
    cuda = torch.device("cuda")
    assert B.resolve_backend(None, cuda) == "triton"
    assert B.resolve_backend("triton", cuda) == "triton"
    with pytest.raises(B.BackendUnavailableError, match="CPU tensors only"):
        B.resolve_backend("cpp", cuda)


def test_resolve_backend_traces_fullgraph_on_a_cuda_process(cuda_like):
    assert B.missing_reason("triton") is None  # the per-process status, taken while CUDA "is available"
    cuda_like.undo()  # dynamo itself must see the real CUDA state; the cached status stays
    cuda = types.SimpleNamespace(type="cuda")  # torch.device("cuda") would make dynamo initialize CUDA

    def step(x):
        return x * (2.0 if B.resolve_backend(None, cuda) == "triton" else 3.0)

    torch._dynamo.reset()
    try:
        out = torch.compile(step, fullgraph=True, backend="eager")(torch.ones(3))
    finally:
        torch._dynamo.reset()
    assert torch.equal(out, torch.full((3,), 2.0))


def test_backends_report_still_names_the_cuda_device(monkeypatch):
    pytest.importorskip("triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake H200")
    status = B.backends()["triton"]
    assert status.available and "Fake H200" in status.reason
