"""Issue 11's targets, met or not, from the CPU benchmarks' JSON of the same run (bench_linear_logps_cpu.py with
``--modes fwd fwd+bwd``, bench_fused_dpo_cpu.py, bench_step_cpu.py): one check per target and case, each with its
figure, its limit and whether it is met (None: not measured in these files). Printed, and written to
``<results dir>/targets_cpu.json`` with a PNG (each figure over its limit; at or below 1 is met).

    python benchmarks/targets_cpu.py

Targets (benchmark figures, not timed tests):
- frozen_vs_trainable: cpp frozen-head fwd+bwd over the trainable-head fwd+bwd, ≤ 0.6, per shape and dtype
- frozen_vs_<peer>:    cpp frozen-head fwd+bwd over eager / compile / cce, < 1
- bf16_fwd_vs_gemm:    cpp bf16 forward over one bare bf16 GEMM, ≤ 1.5
- bf16_trainable_vs_4_gemms: cpp bf16 trainable fwd+bwd over four bare GEMMs, ≤ 1.5
- fused_dpo_vs_liger:  fastpref log-probs + loss over Liger's compiled fused DPO loss, < 1, per head, shape, dtype
- extra_memory_mib:    peak memory above the inputs less the gradients (hidden's, and weight's when trained), ≤ 64
- sr_dpo_lora_vs_trl:  fastpref Sr-DPO LoRA step over TRL DPO's, ≤ 0.35
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import results_dir, save_results  # noqa: E402

RESULTS_NAME = "targets_cpu"
SOURCES = {"heads": "linear_logps_cpu_heads", "dpo": "fused_dpo_cpu", "step": "step_cpu"}
ITEMSIZE = {"float32": 4, "bfloat16": 2}
PEERS = ("eager", "compile", "cce")


def _check(target, case, figure, limit, strict=False):
    met = None if figure is None else (figure < limit if strict else figure <= limit)
    return dict(target=target, case=case, figure=figure, limit=limit, met=met,
                figure_over_limit=None if figure is None else figure / limit)


def _find(records, **fields):
    hits = [r for r in records if all(r.get(k) == v for k, v in fields.items()) and r.get("best_ms") is not None]
    return hits[0] if hits else None


def _cases(records):
    return list(dict.fromkeys(r["case"] for r in records if r.get("rows")))


def _ratio(a, b, key="best_ms"):
    return a[key] / b[key] if a and b else None


def _gradient_mib(record):
    size = ITEMSIZE[record["dtype"]]
    weight = record["vocab"] * record["dim"] if record["head"] == "trainable" and record["mode"] == "fwd+bwd" else 0
    hidden = record["rows"] * record["dim"] if record["mode"] == "fwd+bwd" else 0
    return (hidden + weight) * size / 2**20


def head_checks(records):
    checks = []
    for case in _cases(records):
        frozen = _find(records, impl="cpp", mode="fwd+bwd", head="frozen", case=case)
        trainable = _find(records, impl="cpp", mode="fwd+bwd", head="trainable", case=case)
        checks.append(_check("frozen_vs_trainable", case, _ratio(frozen, trainable), 0.6))
        for peer in PEERS:
            other = _find(records, impl=peer, mode="fwd+bwd", head="frozen", case=case)
            checks.append(_check(f"frozen_vs_{peer}", case, _ratio(frozen, other), 1.0, strict=True))
        if "bfloat16" in case:
            fwd = _find(records, impl="cpp", mode="fwd", head="frozen", case=case)
            checks.append(_check("bf16_fwd_vs_gemm", case, fwd and fwd["time_over_gemm_floor"], 1.5))
            checks.append(_check("bf16_trainable_vs_4_gemms", case, trainable and trainable["time_over_gemm_floor"],
                                 1.5))
    for r in (r for r in records if r["impl"] == "cpp" and r.get("peak_mib") is not None):
        checks.append(_check("extra_memory_mib", f"linear_logps {r['mode']} {r['head']} {r['case']}",
                             max(0.0, r["peak_mib"] - _gradient_mib(r)), 64.0))
    return checks


def dpo_checks(records):
    checks = []
    for case in _cases(records):
        for head in ("frozen", "trainable"):
            ours = _find(records, impl="fastpref", head=head, case=case)
            liger = _find(records, impl="liger", head=head, case=case)
            checks.append(_check("fused_dpo_vs_liger", f"{head} {case}", _ratio(ours, liger), 1.0, strict=True))
            if ours:
                checks.append(_check("extra_memory_mib", f"fused_dpo {head} {case}",
                                     max(0.0, ours["peak_mib"] - _gradient_mib(dict(ours, mode="fwd+bwd"))), 64.0))
    return checks


def step_checks(records):
    ours = [r for r in records if r["mode"] == "lora" and r["method"] == "fastpref_sr_dpo"]
    return [_check("sr_dpo_lora_vs_trl", r["config"], r.get("over_trl_dpo"), 0.35) for r in ours] or \
        [_check("sr_dpo_lora_vs_trl", "lora", None, 0.35)]


def evaluate(folder: Path) -> list[dict]:
    """Every check from the JSON files present in `folder` (a missing file gives its checks as not measured)."""
    found = {}
    for key, name in SOURCES.items():
        path = folder / f"{name}.json"
        found[key] = json.loads(path.read_text())["records"] if path.exists() else []
    checks = head_checks(found["heads"]) + dpo_checks(found["dpo"]) + step_checks(found["step"])
    if not found["heads"]:
        checks.append(_check("frozen_vs_trainable", "linear_logps_cpu_heads.json missing", None, 0.6))
    if not found["dpo"]:
        checks.append(_check("fused_dpo_vs_liger", "fused_dpo_cpu.json missing", None, 1.0, strict=True))
    return checks


def plot_checks(path: Path) -> Path:
    """Horizontal bars of figure / limit per check (green met, red not met), a line at 1; PNG beside the JSON."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    payload = json.loads(path.read_text())
    checks = [c for c in payload["records"] if c["figure"] is not None]
    fig, ax = plt.subplots(figsize=(10, 0.28 * len(checks) + 1.5))
    labels = [f"{c['target']}  {c['case']}" for c in checks]
    ax.barh(range(len(checks)), [c["figure_over_limit"] for c in checks],
            color=["tab:green" if c["met"] else "tab:red" for c in checks])
    ax.axvline(1.0, color="black", lw=0.8)
    ax.set_yticks(range(len(checks)))
    ax.set_yticklabels(labels, fontsize=6)
    ax.invert_yaxis()
    ax.set_xlabel("figure / limit (≤ 1: met)")
    ax.set_xscale("log")
    met = sum(bool(c["met"]) for c in checks)
    fig.suptitle(f"{payload['benchmark']} — {met}/{len(checks)} met — {payload['git_sha'][:12]} — "
                 f"{payload['date'][:10]}", fontsize=9)
    fig.tight_layout()
    out = path.with_suffix(".png")
    fig.savefig(out, dpi=120)
    plt.close(fig)
    return out


def main(argv=None, plot=True):
    folder = results_dir()
    checks = evaluate(folder)
    for c in checks:
        figure = "not measured" if c["figure"] is None else f"{c['figure']:.3f}"
        verdict = {True: "met", False: "NOT MET", None: "-"}[c["met"]]
        print(f"{c['target']:<26} {c['case']:<52} {figure:>12}  limit {c['limit']:<5} {verdict}", flush=True)
    path = save_results(RESULTS_NAME, checks, meta=dict(sources=list(SOURCES.values()),
                                                        met=sum(c["met"] is True for c in checks),
                                                        not_met=sum(c["met"] is False for c in checks),
                                                        not_measured=sum(c["met"] is None for c in checks)))
    if plot and any(c["figure"] is not None for c in checks):
        plot_checks(path)
    print(path)
    return path


if __name__ == "__main__":
    main()
