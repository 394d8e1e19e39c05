"""The GPU check's probe: is fastpref's triton backend right on this device, is it deterministic, and what are
the device's two ceilings.

0. Ceilings: a bare bf16 GEMM (8192³ on a GPU) in TFLOP/s and a device-to-device copy in GB/s (bytes read +
   written), both ``triton.testing.do_bench`` medians on random data.
1. Accuracy: ``fastpref.linear_logps(backend="triton")`` forward and backward in bf16, fp16 and fp32 at odd N
   and V, with and without bias and softcap, ~40% ignored rows, packed sequences (``cu_seqlens``), trainable and
   frozen heads (``weight.requires_grad=False``), non-uniform upstream gradients on both ``logps`` and
   ``token_logps``. Ground truth: the float64 oracle (fastpref.logps.oracle). Rule: max |fast − oracle| ≤
   2 × max |eager − oracle| + atol·max(1, max |oracle|), eager being plain PyTorch in the same dtype (full
   logits, float32 log_softmax); outputs finite; ignored rows exactly 0.
2. Determinism: the same bf16 call twice gives bit-identical outputs and gradients.

    python benchmarks/gpu_probe.py --name gpu_probe          # GPU
    python benchmarks/gpu_probe.py --dry-run                 # CPU: tiny shapes, Triton interpreter

Writes <results dir>/<name>.json via record.py (one record per check, each with "passed"); exits 1 when a check
failed, after saving.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import save_results, time_ms  # noqa: E402

ATOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}
DTYPES = {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}
# (name, dtype, rows, dim, vocab, bias, softcap, frozen): odd N and V everywhere.
GPU_CASES = (
    ("bf16-trainable", "bfloat16", 1999, 1024, 32003, False, None, False),
    ("bf16-frozen-bias-softcap", "bfloat16", 1999, 1000, 50257, True, 30.0, True),
    ("bf16-few-rows", "bfloat16", 3, 2304, 256001, False, None, False),
    ("fp16-trainable-bias-softcap", "float16", 777, 768, 32003, True, 30.0, False),
    ("fp16-frozen", "float16", 777, 768, 32003, False, None, True),
    ("fp32-trainable-bias", "float32", 513, 512, 10007, True, None, False),
    ("fp32-frozen-softcap", "float32", 513, 520, 10007, False, 20.0, True),
)
DRY_RUN_CASES = (
    ("bf16-trainable", "bfloat16", 19, 16, 67, False, None, False),
    ("fp16-frozen-bias-softcap", "float16", 19, 16, 67, True, 30.0, True),
    ("fp32-trainable-bias", "float32", 19, 24, 53, True, None, False),
)


def make_case(rows, dim, vocab, dtype, bias, frozen, device, seed):
    gen = torch.Generator(device=device).manual_seed(seed)
    hidden = torch.randn(rows, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * dim ** -0.5 * 3).to(dtype)
    weight.requires_grad_(not frozen)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    labels[torch.rand(rows, device=device, generator=gen) < 0.4] = -100
    cuts = torch.sort(torch.randint(0, rows, (min(6, rows),), device=device, generator=gen)).values
    cu = torch.cat([cuts.new_zeros(1), cuts, cuts.new_full((1,), rows)])
    b = torch.randn(vocab, device=device, generator=gen).to(dtype).requires_grad_(not frozen) if bias else None
    g_seq = torch.randn(cu.numel() - 1, device=device, generator=gen, dtype=torch.float64)
    g_tok = torch.randn(rows, device=device, generator=gen, dtype=torch.float64)
    return dict(hidden=hidden, weight=weight, labels=labels, bias=b, cu=cu, g_seq=g_seq, g_tok=g_tok)


def eager_outputs(c, softcap):
    """Plain PyTorch in the inputs' dtype: full logits, float32 log_softmax, gather; per-sequence sums."""
    z = c["hidden"] @ c["weight"].T
    if c["bias"] is not None:
        z = z + c["bias"]
    z = z.float()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    scored = c["labels"] != -100
    tok = torch.log_softmax(z, -1).gather(1, c["labels"].clamp(min=0)[:, None]).squeeze(1) * scored
    seq = torch.segment_reduce(tok, "sum", offsets=c["cu"], axis=0) if tok.numel() else tok
    return seq, tok


def outputs_and_grads(kind, c, softcap):
    """(logps, token_logps, grads of Σ g_seq·logps + Σ g_tok·token_logps wrt the trainable inputs)."""
    import fastpref
    from fastpref.logps import oracle

    kwargs = dict(bias=c["bias"], softcap=softcap, cu_seqlens=c["cu"], return_token_logps=True)
    if kind == "fastpref":
        out = fastpref.linear_logps(c["hidden"], c["weight"], c["labels"], backend="triton", **kwargs)
        seq, tok = out.logps, out.token_logps
    elif kind == "oracle":  # on float64 copies, so its gradients are float64 too (not rounded to the dtype)
        c = {k: v.detach().double().requires_grad_(v.requires_grad) if isinstance(v, torch.Tensor)
             and v.is_floating_point() and k not in ("g_seq", "g_tok") else v for k, v in c.items()}
        kwargs["bias"] = c["bias"]
        out = oracle.linear_logps(c["hidden"], c["weight"], c["labels"], **kwargs)
        seq, tok = out.logps, out.token_logps
    else:
        seq, tok = eager_outputs(c, softcap)
    params = [p for p in (c["hidden"], c["weight"], c["bias"]) if p is not None and p.requires_grad]
    loss = (seq.double() * c["g_seq"]).sum() + (tok.double() * c["g_tok"]).sum()
    return seq.detach(), tok.detach(), torch.autograd.grad(loss, params)


def accuracy_record(case, device) -> dict:
    name, dtype_name, rows, dim, vocab, bias, softcap, frozen = case
    dtype = DTYPES[dtype_name]
    c = make_case(rows, dim, vocab, dtype, bias, frozen, device, seed=rows + vocab)
    fast, eager, ref = (outputs_and_grads(kind, c, softcap) for kind in ("fastpref", "eager", "oracle"))
    names = ["logps", "token_logps"] + [n for n, p in (("grad_hidden", c["hidden"]), ("grad_weight", c["weight"]),
                                                        ("grad_bias", c["bias"])) if p is not None and p.requires_grad]
    record = dict(check="accuracy", case=name, dtype=dtype_name, rows=rows, dim=dim, vocab=vocab, bias=bias,
                  softcap=softcap, frozen=frozen, passed=True, failures=[])
    for label, f, e, o in zip(names, [fast[0], fast[1], *fast[2]], [eager[0], eager[1], *eager[2]],
                              [ref[0], ref[1], *ref[2]]):
        f, e, o = f.double(), e.double(), o.double()
        err, eager_err = (f - o).abs().max().item(), (e - o).abs().max().item()
        bound = 2 * eager_err + ATOL[dtype] * max(1.0, o.abs().max().item())
        record[f"{label}_err"], record[f"{label}_eager_err"] = err, eager_err
        if not (torch.isfinite(f).all() and err <= bound):
            record["passed"] = False
            record["failures"].append(f"{label}: error {err:.3g} > bound {bound:.3g} (eager {eager_err:.3g})")
    unscored = fast[1][c["labels"] == -100]
    if unscored.numel() and unscored.abs().max().item() != 0:
        record["passed"] = False
        record["failures"].append("token_logps not 0 at ignored rows")
    return record


def determinism_record(device, dry_run: bool) -> dict:
    rows, dim, vocab = (19, 16, 67) if dry_run else (4097, 2048, 50257)
    c = make_case(rows, dim, vocab, torch.bfloat16, False, False, device, seed=11)
    first, second = (outputs_and_grads("fastpref", c, None) for _ in range(2))
    same = [torch.equal(a, b) for a, b in zip([first[0], first[1], *first[2]], [second[0], second[1], *second[2]])]
    return dict(check="determinism", case=f"bf16 N{rows} D{dim} V{vocab}", passed=all(same),
                identical=same, failures=[] if all(same) else ["two identical calls differ"])


def ceiling_records(device, dry_run: bool) -> list[dict]:
    """The bare bf16 GEMM rate and the device copy bandwidth (medians; random data, never zeros)."""
    size = 256 if dry_run else 8192
    a, b = (torch.randn(size, size, device=device).to(torch.bfloat16) for _ in range(2))
    src = torch.randn((1 << 16) if dry_run else (1 << 29), device=device)  # 2 GiB float32 on the GPU
    dst = torch.empty_like(src)
    gemm_ms, copy_ms = (time_ms(fn, device) for fn in (lambda: torch.mm(a, b), lambda: dst.copy_(src)))
    return [dict(check="gemm_ceiling", case=f"bf16 mm {size}^3", median_ms=gemm_ms,
                 tflops=2 * size ** 3 / gemm_ms / 1e9, passed=True, failures=[]),
            dict(check="copy_bandwidth", case=f"copy {src.numel() * 4 / 2**30:.3g} GiB", median_ms=copy_ms,
                 gb_per_s=2 * src.numel() * 4 / copy_ms / 1e6, passed=True, failures=[])]


def guarded(check: str, case: str, fn) -> list[dict]:
    """Run one check; an exception becomes a failed record instead of ending the probe."""
    try:
        found = fn()
        return found if isinstance(found, list) else [found]
    except Exception as exc:  # noqa: BLE001 (the probe reports every check)
        return [dict(check=check, case=case, passed=False, failures=[f"{type(exc).__name__}: {exc}"[:500]])]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, Triton interpreter")
    parser.add_argument("--name", default="gpu_probe")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run on a CPU)")
    os.environ.setdefault("FASTPREF_SKIP_VALUE_CHECKS", "1")
    device = torch.device("cpu" if args.dry_run else "cuda")
    cases = DRY_RUN_CASES if args.dry_run else GPU_CASES
    # Cheapest and most wanted first, saved after each, so a cap keeps them: the ceilings (no Triton compile), the
    # first bf16 case, determinism (the same kernel variants), then the other dtypes and paths.
    checks = [("ceilings", "ceilings", lambda: ceiling_records(device, args.dry_run)),
              ("accuracy", cases[0][0], lambda: accuracy_record(cases[0], device)),
              ("determinism", "determinism", lambda: determinism_record(device, args.dry_run))]
    checks += [("accuracy", case[0], lambda case=case: accuracy_record(case, device)) for case in cases[1:]]
    records: list[dict] = []
    meta = {"dry_run": args.dry_run, "rule": "err <= 2*eager_err + atol*max(1, max|oracle|)", "atol": str(ATOL)}
    for check, case, fn in checks:
        found = guarded(check, case, fn)
        records += found
        save_results(args.name, records, meta)
        for rec in found:
            print_record(rec)
    failed = [r for r in records if not r["passed"]]
    print(f"probe: {len(records) - len(failed)} passed, {len(failed)} failed", flush=True)
    return 1 if failed else 0


def print_record(rec: dict) -> None:
    detail = {"gemm_ceiling": lambda r: f"{r['tflops']:.0f} TFLOP/s", "copy_bandwidth":
              lambda r: f"{r['gb_per_s']:.0f} GB/s"}.get(rec["check"]) if rec["passed"] else None
    detail = detail or (lambda r: "; ".join(r["failures"])[:160])
    print(f"{rec['check']:>15} {rec['case']:<30} {'ok' if rec['passed'] else 'FAILED'} {detail(rec)}", flush=True)


if __name__ == "__main__":
    sys.exit(main())
