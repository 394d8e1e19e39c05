"""Issue 3's benchmark: per-token log-probs of h·Wᵀ (+ backward) on one GPU, fastpref against the baselines.

For each N and (D, V) (default N ∈ {4096, 8192, 16384}, (D, V) ∈ {(896, 151936), (2048, 128256), (4096, 128256),
(2304, 256000)}), bf16, every row scored, in three modes — "fwd" (no gradient), "fwd+bwd" (a random non-uniform
upstream gradient on every token's log-prob, gradients for hidden and weight) and "fwd+bwd_frozen" (the same with
the head frozen, ``weight.requires_grad=False``: gradient for hidden only, as with LoRA) — side by side:

- eager:          full logits, float32 log_softmax, gather (what a user writes)
- eager_compiled: torch.compile of the same
- trl:            TRL 1.16 trl/kernels/chunked_logprob.py (ChunkedLogProbFunction, chunk 32768 as its trainer)
- liger:          Liger LigerFusedLinearCrossEntropyLoss(reduction="none")
- cce:            Cut Cross-Entropy 25.1.1 linear_cross_entropy(reduction="none", impl="cce"), its default
                  gradient filter (filter_eps="high": gradients below the threshold are skipped, not exact)
- cce_exact:      the same with filter_eps=None (exact gradients). PyPI's 25.1.1 has no impl "cce_exact"; it offers
                  impl "cce" and "torch_compile" only. Each record names the call in ``impl_call``.
- gemm_floor:     one bare cuBLAS h·Wᵀ; the floor is 1 GEMM for "fwd", 4 for "fwd+bwd", 2 for "fwd+bwd_frozen"
- fastpref:       fastpref.linear_logps(backend="triton", return_token_logps=True)

Each record: median time (triton.testing.do_bench), peak memory over the inputs (MiB; "extra_mib" also subtracts
the gradients returned, the target's "extra peak memory"), TFLOPS-equivalent (2·N·D·V per GEMM of the mode's
floor — 1, 4 or 2 — over the median time) and the ratio to the GEMM floor. A baseline that is not installed, or
fails, is recorded as missing with the reason. Results: <results dir>/<name>.json (+ a PNG unless --no-plot), via
record.py, saved after every measurement so a time limit keeps what was measured.

``--budget SECONDS`` is the GPU check's mode: only N=8192, D=4096, V=128256, the measurements in priority order
(fastpref and the floor first, then the baselines), short timings, and nothing new started once the budget is
spent (the rest recorded as "skipped"). ``--dry-run`` runs the same plan on the CPU at a tiny shape (Triton in the
interpreter; what needs CUDA is recorded as skipped): it checks the script, not the speed.

    python benchmarks/bench_linear_logps_gpu.py --shapes 4096x128256
    python benchmarks/bench_linear_logps_gpu.py --budget 140 --no-plot       # what gpu_check.sh runs
    python benchmarks/bench_linear_logps_gpu.py --budget 30 --dry-run        # CPU
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results, save_results  # noqa: E402

ROWS = (4096, 8192, 16384)
SHAPES = ((896, 151936), (2048, 128256), (4096, 128256), (2304, 256000))
MODES = ("fwd", "fwd+bwd", "fwd+bwd_frozen")
IMPLS = ("eager", "eager_compiled", "trl", "liger", "cce", "cce_exact", "gemm_floor", "fastpref")
FLOOR_GEMMS = {"fwd": 1, "fwd+bwd": 4, "fwd+bwd_frozen": 2}
NEEDS_CUDA = ("trl", "liger", "cce", "cce_exact")  # Triton kernels of their own (no interpreter path)
# The GPU check's plan, most wanted first: (impl, mode).
BUDGET_PLAN = (
    ("gemm_floor", "fwd"), ("fastpref", "fwd+bwd"), ("fastpref", "fwd+bwd_frozen"), ("fastpref", "fwd"),
    ("eager", "fwd+bwd"), ("trl", "fwd+bwd"), ("liger", "fwd+bwd"), ("cce", "fwd+bwd"),
    ("eager_compiled", "fwd+bwd"), ("eager", "fwd+bwd_frozen"), ("cce_exact", "fwd+bwd"), ("eager", "fwd"),
    ("trl", "fwd"), ("cce", "fwd"), ("liger", "fwd"), ("eager_compiled", "fwd"),
    ("trl", "fwd+bwd_frozen"), ("liger", "fwd+bwd_frozen"), ("cce", "fwd+bwd_frozen"),
)
BUDGET_SHAPE, BUDGET_ROWS = (4096, 128256), 8192
DRY_RUN_SHAPE, DRY_RUN_ROWS = (16, 67), 21  # one or two interpreter tiles per dimension


class Missing(Exception):
    """The baseline is not installed here (or cannot run); the message says why."""


def eager_token_logps(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, dim=-1).gather(1, labels[:, None]).squeeze(1)


_compiled_eager = None


def compiled_token_logps(hidden, weight, labels):
    global _compiled_eager
    if _compiled_eager is None:
        _compiled_eager = torch.compile(eager_token_logps, dynamic=False)
    return _compiled_eager(hidden, weight, labels)


_trl_function = None


def _load_trl_chunked_logprob():
    """TRL's ChunkedLogProbFunction: imported normally, or — when the full trl package cannot import here (the
    GPU image carries only a --no-deps wheel) — its one file loaded on its own. Its backward imports
    ``trl.trainer.utils.maybe_gather_lm_head_ctx``, which is a null context unless DeepSpeed ZeRO-3 is on; a stub
    module provides exactly that, so the measured code is TRL's own."""
    try:
        from trl.kernels.chunked_logprob import ChunkedLogProbFunction
        return ChunkedLogProbFunction, "trl"
    except Exception as exc:  # ImportError, or trl failing on one of its own dependencies
        import contextlib
        import importlib.util
        import types

        spec = importlib.util.find_spec("trl")
        if spec is None or not spec.submodule_search_locations:
            raise Missing(f"trl: {exc}") from exc
        source = Path(next(iter(spec.submodule_search_locations))) / "kernels" / "chunked_logprob.py"
        if not source.exists():
            raise Missing(f"trl: {exc}; and no {source}") from exc
        for name in ("trl", "trl.kernels", "trl.trainer"):
            sys.modules[name] = types.ModuleType(name)
            sys.modules[name].__path__ = []
        utils = types.ModuleType("trl.trainer.utils")
        utils.maybe_gather_lm_head_ctx = lambda *params: contextlib.nullcontext()
        sys.modules["trl.trainer.utils"] = utils
        module_spec = importlib.util.spec_from_file_location("trl.kernels.chunked_logprob", source)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules["trl.kernels.chunked_logprob"] = module
        module_spec.loader.exec_module(module)
        return module.ChunkedLogProbFunction, f"trl file alone ({type(exc).__name__} importing trl)"


def trl_token_logps(hidden, weight, labels):
    global _trl_function
    if _trl_function is None:
        _trl_function, how = _load_trl_chunked_logprob()
        print(f"TRL chunked_logprob loaded as: {how}", flush=True)
    return _trl_function.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))[0]


_liger_loss = None


def liger_token_logps(hidden, weight, labels):
    global _liger_loss
    if _liger_loss is None:
        try:
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        except Exception as exc:
            raise Missing(f"liger-kernel: {exc}") from exc
        _liger_loss = LigerFusedLinearCrossEntropyLoss(reduction="none")
    loss = _liger_loss(weight, hidden, labels)
    return -(loss[0] if isinstance(loss, tuple) else loss)


# The exact call each CCE row makes (PyPI 25.1.1: impl "cce" or "torch_compile"; filter_eps "high" by default).
CCE_CALLS = {"cce": dict(impl="cce", filter_eps="high"), "cce_exact": dict(impl="cce", filter_eps=None)}


def cce_token_logps(kwargs):
    def run(hidden, weight, labels):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise Missing(f"cut-cross-entropy: {exc}") from exc
        return -linear_cross_entropy(hidden, weight, labels, reduction="none", **kwargs)
    return run


def fastpref_token_logps(hidden, weight, labels):
    import fastpref

    return fastpref.linear_logps(hidden, weight, labels, backend="triton", return_token_logps=True).token_logps


TOKEN_LOGPS = {
    "eager": eager_token_logps,
    "eager_compiled": compiled_token_logps,
    "trl": trl_token_logps,
    "liger": liger_token_logps,
    "cce": cce_token_logps(CCE_CALLS["cce"]),
    "cce_exact": cce_token_logps(CCE_CALLS["cce_exact"]),
    "fastpref": fastpref_token_logps,
}


def impl_call(impl: str) -> str:
    """The call a record measured, in words (so a result says which CCE variant it is)."""
    if impl in CCE_CALLS:
        args = ", ".join(f"{k}={v!r}" for k, v in CCE_CALLS[impl].items())
        return f"cut_cross_entropy.linear_cross_entropy(reduction='none', {args})"
    return {"gemm_floor": "torch.mm(hidden, weight.T)", "fastpref": "fastpref.linear_logps(backend='triton')",
            "trl": "trl.kernels.chunked_logprob.ChunkedLogProbFunction (chunk 32768)",
            "liger": "liger_kernel LigerFusedLinearCrossEntropyLoss(reduction='none')",
            "eager": "log_softmax((h @ W.T).float()).gather", "eager_compiled": "torch.compile(eager)"}[impl]


def make_step(impl, mode, hidden, weight, labels, upstream):
    """A no-argument callable doing one measured step of `impl` in `mode` (weight.requires_grad set by mode)."""
    if impl == "gemm_floor":
        return lambda: torch.mm(hidden, weight.T)
    token_logps = TOKEN_LOGPS[impl]
    if mode == "fwd":
        def forward_only():
            with torch.no_grad():
                return token_logps(hidden, weight, labels)
        return forward_only
    wanted = (hidden,) if mode == "fwd+bwd_frozen" else (hidden, weight)

    def forward_backward():
        out = token_logps(hidden, weight, labels)
        return torch.autograd.grad(out, wanted, upstream.to(out.dtype))
    return forward_backward


def peak_memory(step, device) -> tuple[float | None, int]:
    """(peak MiB over what was allocated before, bytes of the step's result that outlive it); (None, 0) on CPU."""
    if device.type != "cuda":
        return None, 0
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - before) / 2**20
    results = result if isinstance(result, (tuple, list)) else (result,)
    kept = sum(t.numel() * t.element_size() for t in results if isinstance(t, torch.Tensor))
    del result, results
    return peak, kept


def median_ms(step, device, warmup_ms: float, rep_ms: float) -> float:
    """Median milliseconds of `step`: triton.testing.do_bench (CUDA events) on a GPU; on the CPU (dry run) one
    host-clock run, which checks the code path and means nothing as a speed."""
    if device.type == "cuda":
        import triton

        return triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    start = time.perf_counter()
    step()
    return 1e3 * (time.perf_counter() - start)


def make_inputs(rows, dim, vocab, dtype, device, frozen):
    """Random (never zero) hidden, weight, labels and a non-uniform upstream gradient; fixed seed per shape."""
    gen = torch.Generator(device=device).manual_seed(rows + dim + vocab)
    hidden = torch.randn(rows, dim, device=device, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * dim ** -0.5).to(dtype)
    weight.requires_grad_(not frozen)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    upstream = torch.randn(rows, device=device, generator=gen)
    return hidden, weight, labels, upstream


def measure(impl, mode, rows, dim, vocab, dtype, device, warmup_ms, rep_ms) -> dict:
    record = {"impl": impl, "mode": mode, "rows": rows, "dim": dim, "vocab": vocab, "dtype": str(dtype),
              "shape": f"N{rows}-D{dim}-V{vocab}", "impl_call": impl_call(impl), "device": device.type}
    if device.type != "cuda" and impl in NEEDS_CUDA:
        return {**record, "status": "skipped", "reason": "needs CUDA (dry run)"}
    if device.type != "cuda" and impl == "eager_compiled":
        return {**record, "status": "skipped", "reason": "inductor CPU compile is too slow for a dry run"}
    hidden, weight, labels, upstream = make_inputs(rows, dim, vocab, dtype, device, mode == "fwd+bwd_frozen")
    try:
        step = make_step(impl, mode, hidden, weight, labels, upstream)
        step()  # compile / autotune / load modules outside the timings
        if device.type == "cuda":
            torch.cuda.synchronize()
        peak_mib, kept = peak_memory(step, device)
        ms = median_ms(step, device, warmup_ms, rep_ms)
    except Missing as exc:
        return {**record, "status": "missing", "reason": str(exc)}
    except torch.cuda.OutOfMemoryError as exc:
        return {**record, "status": "oom", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 (a baseline failing on this shape must not stop the others)
        return {**record, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        del hidden, weight, labels, upstream
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()
    gemms = 1 if impl == "gemm_floor" else FLOOR_GEMMS[mode]
    return {**record, "status": "ok", "median_ms": ms, "peak_mib": peak_mib,
            "extra_mib": None if peak_mib is None else peak_mib - kept / 2**20,
            "floor_gemms": gemms, "tflops_equiv": 2 * gemms * rows * dim * vocab / ms / 1e9}


def add_floor_ratios(records):
    """ratio_to_floor = time / (the bare GEMM's time × the mode's floor GEMMs: 1 fwd, 4 fwd+bwd, 2 frozen)."""
    gemm = {r["shape"]: r["median_ms"] for r in records if r["impl"] == "gemm_floor" and r["status"] == "ok"}
    for r in records:
        if r["status"] == "ok" and r["shape"] in gemm:
            r["floor_ms"] = gemm[r["shape"]] * r["floor_gemms"]
            r["ratio_to_floor"] = r["median_ms"] / r["floor_ms"]


def _parse_shape(text: str) -> tuple[int, int]:
    dim, vocab = text.lower().split("x")
    return int(dim), int(vocab)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=list(SHAPES), help="DxV, e.g. 4096x128256")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup-ms", type=float, default=None, help="do_bench warm-up (100; 25 with --budget)")
    parser.add_argument("--rep-ms", type=float, default=None, help="do_bench repetitions (500; 250 with --budget)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: the GPU check's plan (N=8192, D=4096, V=128256, priority order)")
    parser.add_argument("--dry-run", action="store_true", help="the plan on the CPU at a tiny shape")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    parser.add_argument("--name", default=None, help="results name (default: linear_logps_gpu_<shapes>)")
    args = parser.parse_args(argv)
    # A training loop validates its labels once; the per-call value check is one host sync kept out of timings.
    os.environ.setdefault("FASTPREF_SKIP_VALUE_CHECKS", "1")
    quick = args.budget is not None or args.dry_run
    args.warmup_ms = args.warmup_ms if args.warmup_ms is not None else (25 if quick else 100)
    args.rep_ms = args.rep_ms if args.rep_ms is not None else (250 if quick else 500)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before any kernel module is imported
        args.device = torch.device("cpu")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run on a CPU)")
    else:
        args.device = torch.device("cuda")
    return args


def plan(args) -> list[tuple[int, int, int, str, str]]:
    """(rows, dim, vocab, impl, mode) in the order measured."""
    if args.budget is not None or args.dry_run:
        (dim, vocab), rows = (DRY_RUN_SHAPE, DRY_RUN_ROWS) if args.dry_run else (BUDGET_SHAPE, BUDGET_ROWS)
        return [(rows, dim, vocab, impl, mode) for impl, mode in BUDGET_PLAN]
    return [(rows, dim, vocab, impl, mode) for dim, vocab in args.shapes for rows in args.rows
            for mode in args.modes for impl in args.impls if impl != "gemm_floor" or mode == "fwd"]


def main(argv=None) -> Path | None:
    args = parse_args(argv)
    dtype = getattr(torch, args.dtype)
    name = args.name or "linear_logps_gpu_" + "_".join(f"{d}x{v}" for d, v in args.shapes)
    meta = {"dtype": args.dtype, "scored_fraction": 1.0, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
            "budget_s": args.budget, "dry_run": args.dry_run,
            "flops": "2NDV per floor GEMM: 1 fwd, 4 fwd+bwd, 2 fwd+bwd_frozen",
            "cce_calls": {k: impl_call(k) for k in CCE_CALLS}}
    records: list[dict] = []
    path, start = None, time.time()
    for rows, dim, vocab, impl, mode in plan(args):
        began = time.time()
        if args.budget is not None and began - start > args.budget:
            rec = {"impl": impl, "mode": mode, "rows": rows, "dim": dim, "vocab": vocab, "dtype": str(dtype),
                   "shape": f"N{rows}-D{dim}-V{vocab}", "impl_call": impl_call(impl), "status": "skipped",
                   "reason": f"budget of {args.budget:.0f} s spent"}
        else:
            rec = measure(impl, mode, rows, dim, vocab, dtype, args.device, args.warmup_ms, args.rep_ms)
        records.append(rec)
        print_record(rec, time.time() - began)
        add_floor_ratios(records)
        path = save_results(name, records, meta)  # after every measurement: a time limit keeps what was measured
    if path is not None and not args.no_plot and any(r["status"] == "ok" for r in records):
        print(f"plot: {plot_results(path, x='shape', y='tflops_equiv', group='impl', facet='mode')}")
    print_table(records)
    print(f"results: {path}")
    return path


def print_record(rec: dict, seconds: float) -> None:
    shown = (f"{rec['median_ms']:9.3f} ms {rec['tflops_equiv']:6.0f} TF " + (
        f"{rec['extra_mib']:9.1f} MiB" if rec["extra_mib"] is not None else "") if rec["status"] == "ok"
        else f"{rec['status']}: {rec.get('reason', '')[:80]}")
    print(f"{rec['shape']:>22} {rec['mode']:>14} {rec['impl']:>15} {shown}  ({seconds:.0f}s)", flush=True)


def print_table(records: list[dict]) -> None:
    print(f"\n{'shape':>22} {'mode':>14} {'impl':>15} {'ms':>9} {'TF-eq':>6} {'extraMiB':>9} {'x floor':>7}")
    for r in records:
        if r["status"] == "ok":
            extra = f"{r['extra_mib']:9.1f}" if r["extra_mib"] is not None else f"{'-':>9}"
            print(f"{r['shape']:>22} {r['mode']:>14} {r['impl']:>15} {r['median_ms']:9.3f} "
                  f"{r['tflops_equiv']:6.0f} {extra} {r.get('ratio_to_floor', float('nan')):7.2f}")


if __name__ == "__main__":
    main()
