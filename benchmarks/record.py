"""Benchmark results as committed files: one JSON per benchmark (with the machine, library versions, git sha
and date) under ``benchmarks/results/``, and a PNG chart drawn from it.

    path = save_results("linear_logps_cpu", records)          # records: list of flat dicts, one per measurement
    plot_results(path, x="shape", y="median_ms", group="impl")

Benchmark scripts run as ``python benchmarks/<script>.py`` (or under pytest from the repo root) and import this
module as ``from record import save_results, plot_results`` (their own folder is on sys.path either way).
``FASTPREF_RESULTS_DIR`` moves the output folder (benchmarks/gpu_check.sh points it at the device tool's
``$OUT``); ``GIT_SHA`` names the commit where the tree has no git (the device machine).
"""

from __future__ import annotations

import datetime as _dt
import importlib.metadata
import json
import os
import platform
import subprocess
import time
from pathlib import Path

RESULTS_DIR = Path(__file__).resolve().parent / "results"
_LIBRARIES = ("torch", "triton", "transformers", "peft", "accelerate", "datasets", "trl", "liger-kernel",
              "cut-cross-entropy", "fastpref")


def results_dir() -> Path:
    """Where results go: ``$FASTPREF_RESULTS_DIR`` when set, else ``benchmarks/results/``."""
    chosen = os.environ.get("FASTPREF_RESULTS_DIR")
    return Path(chosen) if chosen else RESULTS_DIR


def git_sha() -> str:
    """HEAD's sha (+ "-dirty" when tracked files changed); ``$GIT_SHA`` where there is no git repository."""
    if os.environ.get("GIT_SHA"):
        return os.environ["GIT_SHA"]
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True,
                               text=True, check=False, cwd=Path(__file__).resolve().parent).stdout.strip()
        return sha + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get("GIT_SHA", "unknown")


def versions() -> dict[str, str | None]:
    """Installed versions of the libraries the benchmarks compare (None when not installed)."""
    found = {}
    for name in _LIBRARIES:
        try:
            found[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            found[name] = None
    return found


def machine() -> dict:
    """The device the numbers were taken on: GPU name when CUDA is used, else the CPU and its core count."""
    import torch

    info = {
        "cpu": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info.update(gpu=props.name, gpu_memory_gib=round(props.total_memory / 2**30, 1),
                    sm_count=props.multi_processor_count, cuda=torch.version.cuda)
    else:
        info["gpu"] = None
    return info


def time_ms(fn, device, warmup: int = 25, rep: int = 200) -> float:
    """Median milliseconds of `fn` on CUDA (``triton.testing.do_bench``); one timed call elsewhere (dry runs)."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    start = time.perf_counter()
    fn()
    return 1e3 * (time.perf_counter() - start)


def save_results(name: str, records: list[dict], meta: dict | None = None) -> Path:
    """Write ``<results dir>/<name>.json`` holding `records` plus machine, versions, git sha and date."""
    if not records:
        raise ValueError("records is empty: a benchmark with no measurement is not saved")
    folder = results_dir()
    folder.mkdir(parents=True, exist_ok=True)
    payload = {
        "benchmark": name,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "machine": machine(),
        "versions": versions(),
        "meta": meta or {},
        "records": records,
    }
    path = folder / f"{name}.json"
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(payload, indent=2, default=str) + "\n")
    os.replace(tmp, path)
    return path


def plot_results(json_path: str | Path, *, x: str, y: str | list[str], group: str, facet: str | None = None,
                 log_y: bool = False) -> Path:
    """Grouped bar chart of `y` over `x`, one bar per `group` value, one panel per `facet` value; PNG beside
    the JSON. A list of metrics for `y` draws each (time and memory) in its own row of panels, aligned by facet.
    The title carries the device and the git sha so the picture is never separated from its source."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    json_path = Path(json_path)
    payload = json.loads(json_path.read_text())
    records = payload["records"]
    metrics = [y] if isinstance(y, str) else list(y)
    facets = sorted({str(r[facet]) for r in records}) if facet else [None]
    fig, axes = plt.subplots(len(metrics), len(facets), figsize=(max(6, 5 * len(facets)), 4.5 * len(metrics)),
                             squeeze=False)
    for col, facet_value in enumerate(facets):
        rows = [r for r in records if facet is None or str(r[facet]) == facet_value]
        for row, metric in enumerate(metrics):
            _bars(axes[row][col], rows, x, metric, group, log_y)
            if facet:
                axes[row][col].set_title(f"{facet}={facet_value}", fontsize=9)
    device = payload["machine"].get("gpu") or f"CPU x{payload['machine'].get('torch_threads')}"
    fig.suptitle(f"{payload['benchmark']} — {device} — torch {payload['versions'].get('torch')} — "
                 f"{payload['git_sha'][:12]} — {payload['date'][:10]}", fontsize=9)
    fig.tight_layout()
    out = json_path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def _bars(ax, rows: list[dict], x: str, y: str, group: str, log_y: bool) -> None:
    rows = [r for r in rows if r.get(y) is not None]  # failed or skipped runs have no bar
    xs = list(dict.fromkeys(str(r[x]) for r in rows))
    groups = list(dict.fromkeys(str(r[group]) for r in rows))
    width = 0.8 / max(1, len(groups))
    for gi, gname in enumerate(groups):
        values = []
        for xv in xs:
            hit = [r[y] for r in rows if str(r[x]) == xv and str(r[group]) == gname]
            values.append(hit[0] if hit else float("nan"))
        ax.bar([i + gi * width for i in range(len(xs))], values, width, label=gname)
    ax.set_xticks([i + width * (len(groups) - 1) / 2 for i in range(len(xs))])
    ax.set_xticklabels(xs, rotation=20, ha="right", fontsize=8)
    ax.set_ylabel(y)
    if log_y:
        ax.set_yscale("log")
    ax.legend(fontsize=7)
