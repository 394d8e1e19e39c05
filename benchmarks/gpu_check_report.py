"""The bookkeeping of benchmarks/gpu_check.sh: the environment record, pytest's JUnit XML as JSON, each part's
outcome, and the closing summary.

    python benchmarks/gpu_check_report.py env --dry-run 0 --wheels .whl      # starts gpu_check_summary.json
    python benchmarks/gpu_check_report.py junit A.xml B.xml --name gpu_tests
    python benchmarks/gpu_check_report.py part --name probe --rc 0 --seconds 41 --cap 75 --expect gpu_probe.json
    python benchmarks/gpu_check_report.py summary                            # prints; exits 1 if a part failed

Every file goes to the results folder (``$FASTPREF_RESULTS_DIR``, which gpu_check.sh points at ``$OUT``) through
record.py, so each carries the GPU name, library versions, git sha and date. A part is "ok" only when it exited 0
and wrote the JSON it was expected to; "timeout" when its cap stopped it (exit 124 or 137, or 130 from the
interrupt that ``timeout -s INT`` sends), "failed" otherwise, "skipped" when no time was left to start it.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import importlib.metadata
import json
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import record  # noqa: E402

SUMMARY = "gpu_check_summary"
TIMEOUT_CODES = (124, 130, 137)
EXTRA_PACKAGES = ("pyarrow", "fsspec", "huggingface-hub", "dill", "multiprocess", "numpy", "pytest",
                  "pytest-xdist", "pytest-timeout", "matplotlib")
REQUIRED_KEYS = ("benchmark", "date", "git_sha", "machine", "versions", "meta", "records")


def _summary_path() -> Path:
    return record.results_dir() / f"{SUMMARY}.json"


def _load_summary() -> dict:
    path = _summary_path()
    return json.loads(path.read_text()) if path.exists() else {"meta": {}, "records": []}


def _save_summary(meta: dict, parts: list[dict]) -> Path:
    return save_like_summary(SUMMARY, parts, meta)


def save_like_summary(name: str, records: list[dict], meta: dict) -> Path:
    """record.save_results, but the machine and versions copied from the summary that ``env`` wrote (importing
    torch again for each part would cost seconds); ``env`` itself goes through record.save_results."""
    header = _load_summary()
    if "machine" not in header:
        return record.save_results(name, records, meta)
    path = record.results_dir() / f"{name}.json"
    payload = {"benchmark": name, "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "git_sha": record.git_sha(), "machine": header["machine"], "versions": header["versions"],
               "meta": meta, "records": records}
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    tmp.replace(path)
    return path


def cmd_env(args) -> int:
    """Start the summary: environment (versions beyond record.py's, the GPU as nvidia-smi reports it)."""
    extra = {}
    for name in EXTRA_PACKAGES:
        try:
            extra[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            extra[name] = None
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=20).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        smi = None
    wheels = sorted(p.name for p in Path(args.wheels).glob("*.whl")) if args.wheels else []
    meta = {"dry_run": bool(args.dry_run), "wheels_dir": args.wheels, "wheels": wheels, "nvidia_smi": smi,
            "more_versions": extra, "python": sys.executable, "caps_s": json.loads(args.caps or "{}")}
    parts = [{"part": "env", "status": "ok", "rc": 0, "seconds": 0.0}]
    path = record.save_results(SUMMARY, parts, meta)
    payload = json.loads(path.read_text())
    print(f"GPU: {payload['machine'].get('gpu')}  nvidia-smi: {smi}")
    print("versions: " + ", ".join(f"{k} {v}" for k, v in {**payload["versions"], **extra}.items()))
    print(f"git sha: {payload['git_sha']}  wheels: {', '.join(wheels) or '-'}")
    return 0


def junit_records(paths: list[str]) -> tuple[list[dict], dict]:
    """One record per test case (outcome, seconds, message) and the counts, from JUnit XML files that exist."""
    records, counts = [], {"passed": 0, "failed": 0, "error": 0, "skipped": 0}
    for path in paths:
        if not Path(path).exists():
            records.append({"test": path, "outcome": "no report", "message": "pytest wrote no XML (killed?)"})
            continue
        for case in ET.parse(path).getroot().iter("testcase"):
            outcome, message = "passed", ""
            for child in case:
                if child.tag in ("failure", "error", "skipped"):
                    outcome = {"failure": "failed"}.get(child.tag, child.tag)
                    message = (child.get("message") or child.text or "")[:300]
            counts[outcome] += 1
            records.append({"test": f"{case.get('classname')}::{case.get('name')}", "outcome": outcome,
                            "seconds": float(case.get("time") or 0), "message": message, "report": Path(path).name})
    return records, counts


def cmd_junit(args) -> int:
    records, counts = junit_records(args.xml)
    if not records:
        records = [{"test": "-", "outcome": "no tests", "message": "no test case in the reports"}]
    save_like_summary(args.name, records, {"counts": counts, "reports": [Path(p).name for p in args.xml]})
    print("tests: " + ", ".join(f"{v} {k}" for k, v in counts.items()))
    for r in records:
        if r["outcome"] in ("failed", "error", "no report"):
            print(f"  {r['outcome'].upper()} {r['test']}: {r['message'][:160]}")
    return 0


def part_status(rc: int, expected: list[str]) -> tuple[str, list[str]]:
    """("ok" | "timeout" | "failed", the expected outputs that are missing or lack the required keys)."""
    bad = []
    for name in expected:
        path = record.results_dir() / name
        try:
            payload = json.loads(path.read_text())
            if any(key not in payload for key in REQUIRED_KEYS) or not payload["records"]:
                bad.append(f"{name} (incomplete)")
        except (OSError, ValueError):
            bad.append(f"{name} (missing)")
    if rc in TIMEOUT_CODES:
        return "timeout", bad
    return ("ok" if rc == 0 and not bad else "failed"), bad


def cmd_part(args) -> int:
    summary = _load_summary()
    status, bad = ("skipped", []) if args.skipped else part_status(args.rc, args.expect)
    entry = {"part": args.name, "status": status, "rc": args.rc, "seconds": args.seconds, "cap_s": args.cap,
             "outputs": args.expect, "bad_outputs": bad}
    _save_summary(summary["meta"], [r for r in summary["records"] if r["part"] != args.name] + [entry])
    print(f"=== part {args.name}: {status} (rc {args.rc}, {args.seconds:.0f} s of {args.cap:.0f} s)"
          + (f"; bad outputs: {', '.join(bad)}" if bad else ""), flush=True)
    return 0


def _read(name: str) -> list[dict]:
    path = record.results_dir() / f"{name}.json"
    return json.loads(path.read_text())["records"] if path.exists() else []


def print_figures(prefix: str) -> None:
    """The figures issue 12's closing note quotes: tests, probe, kernel table, step ratios, best tiles."""
    tests = [r for r in _read(f"{prefix}tests") if "outcome" in r]
    outcomes = [r["outcome"] for r in tests]
    print("tests: " + ", ".join(f"{outcomes.count(k)} {k}" for k in ("passed", "failed", "error", "skipped")))
    for r in [r for r in tests if r["outcome"] in ("failed", "error", "no report")][:12]:
        print(f"  {r['outcome'].upper()} {r['test'][-90:]}: {r['message'][:110]}")
    for r in _read(f"{prefix}probe"):
        shown = {"gemm_ceiling": f"{r.get('tflops', 0):.0f} TFLOP/s", "copy_bandwidth":
                 f"{r.get('gb_per_s', 0):.0f} GB/s"}.get(r["check"], "; ".join(r.get("failures", []))[:100])
        print(f"probe {r['check']:>14} {r['case']:<28} {'ok' if r['passed'] else 'FAILED'} {shown}")
    for r in _read(f"{prefix}linear_logps"):
        if r["status"] == "ok":
            extra = "-" if r.get("extra_mib") is None else f"{r['extra_mib']:.0f} MiB"
            print(f"kernel {r['mode']:>14} {r['impl']:>15} {r['median_ms']:9.3f} ms {r['tflops_equiv']:5.0f} TF-eq "
                  f"x{r.get('ratio_to_floor', float('nan')):.2f} floor  {extra}")
        else:
            print(f"kernel {r['mode']:>14} {r['impl']:>15} {r['status']}: {r.get('reason', '')[:70]}")
    for r in _read(f"{prefix}step"):
        ratios = "  ".join(f"{k} {r[k]:.2f}" for k in ("over_trl_dpo", "over_fastpref_dpo", "step_over_floor")
                           if r.get(k) is not None)
        shown = f"{r['step_ms']:8.1f} ms  {r['tokens_per_s']:8.0f} tok/s  {ratios}" if r.get("step_ms") else r["status"]
        print(f"step {r['config']:<32} {r['method']:<26} {shown[:110]}")
    tiles = [r for r in _read(f"{prefix}tiles") if r.get("status") == "ok"]
    for op in ("fwd", "bwd_dW"):
        done = sorted((r for r in tiles if r["op"] == op), key=lambda r: r["median_ms"])
        if done:
            print(f"tiles {op}: best {done[0]['config']} {done[0]['median_ms']:.3f} ms (default "
                  f"{next(r['median_ms'] for r in tiles if r['op'] == op):.3f} ms, {len(done)} configs)")


def cmd_summary(args) -> int:
    summary = _load_summary()
    print("\n================ gpu_check summary ================")
    print(f"git {summary.get('git_sha')}  date {summary.get('date')}  GPU {summary.get('machine', {}).get('gpu')}")
    try:
        print_figures(args.prefix)
    except Exception as exc:  # noqa: BLE001 (a malformed result must not hide the part table below)
        print(f"(figures unreadable: {type(exc).__name__}: {exc})")
    parts = summary["records"]
    for r in parts:
        print(f"part {r['part']:<8} {r['status']:<8} rc {r['rc']:>3}  {r['seconds']:6.0f} s"
              + (f"  bad: {', '.join(r['bad_outputs'])}" if r.get("bad_outputs") else ""))
    failed = [r["part"] for r in parts if r["status"] != "ok"]
    print(f"RESULT: {'all parts ok' if not failed else 'not ok: ' + ', '.join(failed)}")
    return 1 if failed else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True)
    env = sub.add_parser("env")
    env.add_argument("--dry-run", type=int, default=0)
    env.add_argument("--wheels", default="")
    env.add_argument("--caps", default="", help="the part caps, as JSON")
    junit = sub.add_parser("junit")
    junit.add_argument("xml", nargs="+")
    junit.add_argument("--name", default="gpu_tests")
    part = sub.add_parser("part")
    part.add_argument("--name", required=True)
    part.add_argument("--rc", type=int, default=0)
    part.add_argument("--seconds", type=float, default=0.0)
    part.add_argument("--cap", type=float, default=0.0)
    part.add_argument("--expect", nargs="*", default=[])
    part.add_argument("--skipped", action="store_true")
    summary = sub.add_parser("summary")
    summary.add_argument("--prefix", default="gpu_")
    args = parser.parse_args(argv)
    return {"env": cmd_env, "junit": cmd_junit, "part": cmd_part, "summary": cmd_summary}[args.command](args)


if __name__ == "__main__":
    sys.exit(main())
