"""Issue 3's benchmark: per-token log-probs of h·Wᵀ (+ backward) on one GPU, fastpref against the baselines.

For each N ∈ {4096, 8192, 16384} and (D, V) ∈ {(896, 151936), (2048, 128256), (4096, 128256), (2304, 256000)},
bf16, every row scored, in two modes — "fwd" (no gradient) and "fwd+bwd" (a random non-uniform upstream gradient
on every token's log-prob, gradients for hidden and weight) — side by side in one run:

- eager:          full logits, float32 log_softmax, gather (what a user writes)
- eager_compiled: torch.compile of the same
- trl:            TRL 1.16 trl/kernels/chunked_logprob.py (ChunkedLogProbFunction, chunk 32768 as its trainer)
- liger:          Liger LigerFusedLinearCrossEntropyLoss(reduction="none")
- cce, cce_exact: Cut Cross-Entropy linear_cross_entropy(reduction="none", impl=...)
- gemm_floor:     one bare cuBLAS h·Wᵀ; the floor is 1 GEMM for "fwd" and 4 for "fwd+bwd"
- fastpref:       fastpref.linear_logps(backend="triton", return_token_logps=True)

Each record: median time (triton.testing.do_bench), peak memory over the inputs (MiB; "extra_mib" also
subtracts the gradients returned, the target's "extra peak memory"), TFLOPS-equivalent (2·N·D·V for fwd,
8·N·D·V for fwd+bwd, over the median time) and the ratio to the GEMM floor. A baseline that is not installed, or
fails, is recorded as missing with the reason. Results: benchmarks/results/<name>.json and a PNG, via record.py;
also copied under $OUT when that is set.

Run one (D, V) shape per call to stay inside a 10-minute device command, e.g.
    python benchmarks/bench_linear_logps_gpu.py --shapes 4096x128256
    python benchmarks/bench_linear_logps_gpu.py --shapes 4096x128256 --rows 8192 --impls fastpref gemm_floor
"""

from __future__ import annotations

import argparse
import gc
import os
import shutil
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results, save_results

# A training loop validates its labels once; the per-call value check is one host sync we keep out of timings.
os.environ.setdefault("FASTPREF_SKIP_VALUE_CHECKS", "1")

ROWS = (4096, 8192, 16384)
SHAPES = ((896, 151936), (2048, 128256), (4096, 128256), (2304, 256000))
MODES = ("fwd", "fwd+bwd")
IMPLS = ("eager", "eager_compiled", "trl", "liger", "cce", "cce_exact", "gemm_floor", "fastpref")


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


def cce_token_logps(impl):
    def run(hidden, weight, labels):
        try:
            from cut_cross_entropy import linear_cross_entropy
        except Exception as exc:
            raise Missing(f"cut-cross-entropy: {exc}") from exc
        return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl=impl)
    return run


def fastpref_token_logps(hidden, weight, labels):
    import fastpref

    return fastpref.linear_logps(hidden, weight, labels, backend="triton", return_token_logps=True).token_logps


TOKEN_LOGPS = {
    "eager": eager_token_logps,
    "eager_compiled": compiled_token_logps,
    "trl": trl_token_logps,
    "liger": liger_token_logps,
    "cce": cce_token_logps("cce"),
    "cce_exact": cce_token_logps("cce_exact"),
    "fastpref": fastpref_token_logps,
}


def make_step(impl, mode, hidden, weight, labels, upstream):
    """A no-argument callable doing one measured step of `impl` in `mode`."""
    if impl == "gemm_floor":
        return lambda: torch.mm(hidden, weight.T)
    token_logps = TOKEN_LOGPS[impl]
    if mode == "fwd":
        def forward_only():
            with torch.no_grad():
                return token_logps(hidden, weight, labels)
        return forward_only

    def forward_backward():
        out = token_logps(hidden, weight, labels)
        return torch.autograd.grad(out, (hidden, weight), upstream.to(out.dtype))
    return forward_backward


def peak_memory(step) -> tuple[float, int]:
    """(peak MiB over what was allocated before, bytes of the step's result that outlive it)."""
    gc.collect()
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    before = torch.cuda.memory_allocated()
    result = step()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - before
    results = result if isinstance(result, (tuple, list)) else (result,)
    kept = sum(t.numel() * t.element_size() for t in results if isinstance(t, torch.Tensor))
    del result, results
    return peak / 2**20, kept


def measure(impl, mode, rows, dim, vocab, dtype, warmup_ms, rep_ms):
    import triton

    gen = torch.Generator(device="cuda").manual_seed(rows + dim + vocab)
    hidden = (torch.randn(rows, dim, device="cuda", generator=gen) * 1.0).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, device="cuda", generator=gen) * dim ** -0.5).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), device="cuda", generator=gen)
    upstream = torch.randn(rows, device="cuda", generator=gen)
    record = {"impl": impl, "mode": mode, "rows": rows, "dim": dim, "vocab": vocab, "dtype": str(dtype),
              "shape": f"N{rows}-D{dim}-V{vocab}"}
    try:
        step = make_step(impl, mode, hidden, weight, labels, upstream)
        step()  # compile / autotune / load modules outside the timings
        torch.cuda.synchronize()
        peak_mib, kept = peak_memory(step)
        median_ms = triton.testing.do_bench(step, warmup=warmup_ms, rep=rep_ms, return_mode="median")
    except Missing as exc:
        return {**record, "status": "missing", "reason": str(exc)}
    except torch.cuda.OutOfMemoryError as exc:
        return {**record, "status": "oom", "reason": str(exc).splitlines()[0]}
    except Exception as exc:  # noqa: BLE001 (a baseline failing on this shape must not stop the others)
        return {**record, "status": "error", "reason": f"{type(exc).__name__}: {exc}"[:500]}
    finally:
        del hidden, weight, labels, upstream
        gc.collect()
        torch.cuda.empty_cache()
    flops = (2 if mode == "fwd" else 8) * rows * dim * vocab
    return {**record, "status": "ok", "median_ms": median_ms, "peak_mib": peak_mib,
            "extra_mib": peak_mib - kept / 2**20, "tflops_equiv": flops / median_ms / 1e9}


def add_floor_ratios(records):
    """ratio_to_floor = time / (1 GEMM for fwd, 4 GEMMs for fwd+bwd) at the same shape."""
    gemm = {r["shape"]: r["median_ms"] for r in records if r["impl"] == "gemm_floor" and r["status"] == "ok"}
    for r in records:
        if r["status"] == "ok" and r["shape"] in gemm:
            floor = gemm[r["shape"]] * (1 if r["mode"] == "fwd" or r["impl"] == "gemm_floor" else 4)
            r["floor_ms"] = floor
            r["ratio_to_floor"] = r["median_ms"] / floor


def _parse_shape(text: str) -> tuple[int, int]:
    dim, vocab = text.lower().split("x")
    return int(dim), int(vocab)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rows", type=int, nargs="+", default=list(ROWS))
    parser.add_argument("--shapes", type=_parse_shape, nargs="+", default=list(SHAPES), help="DxV, e.g. 4096x128256")
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16"])
    parser.add_argument("--warmup-ms", type=float, default=100)
    parser.add_argument("--rep-ms", type=float, default=500)
    parser.add_argument("--name", default=None, help="results name (default: linear_logps_gpu_<shapes>)")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit("bench_linear_logps_gpu.py needs a CUDA device")
    dtype = getattr(torch, args.dtype)
    name = args.name or "linear_logps_gpu_" + "_".join(f"{d}x{v}" for d, v in args.shapes)
    records: list[dict] = []
    meta = {"dtype": args.dtype, "scored_fraction": 1.0, "warmup_ms": args.warmup_ms, "rep_ms": args.rep_ms,
            "flops": "2NDV fwd, 8NDV fwd+bwd", "floor": "1 bare GEMM (fwd), 4 (fwd+bwd)"}
    path = None
    for dim, vocab in args.shapes:
        for rows in args.rows:
            for mode in args.modes:
                for impl in args.impls:
                    if impl == "gemm_floor" and mode != "fwd":
                        continue
                    start = time.time()
                    rec = measure(impl, mode, rows, dim, vocab, dtype, args.warmup_ms, args.rep_ms)
                    records.append(rec)
                    shown = (f"{rec['median_ms']:9.3f} ms {rec['tflops_equiv']:6.0f} TF {rec['extra_mib']:9.1f} MiB"
                             if rec["status"] == "ok" else f"{rec['status']}: {rec.get('reason', '')[:80]}")
                    print(f"{rec['shape']:>22} {mode:>7} {impl:>15} {shown}  ({time.time() - start:.0f}s)",
                          flush=True)
            add_floor_ratios(records)
            path = save_results(name, records, meta)  # after every shape: a timeout keeps what was measured
    if path is None:
        return
    ok = [r for r in records if r["status"] == "ok"]
    if ok:
        plot_path = plot_results(path, x="shape", y="tflops_equiv", group="impl", facet="mode")
        print(f"results: {path}\nplot: {plot_path}")
    out = os.environ.get("OUT")
    if out:
        for produced in path.parent.glob(f"{name}.*"):
            shutil.copy(produced, Path(out) / produced.name)
    print(f"\n{'shape':>22} {'mode':>7} {'impl':>15} {'ms':>9} {'TF-eq':>6} {'extraMiB':>9} {'x floor':>7}")
    for r in ok:
        print(f"{r['shape']:>22} {r['mode']:>7} {r['impl']:>15} {r['median_ms']:9.3f} {r['tflops_equiv']:6.0f} "
              f"{r['extra_mib']:9.1f} {r.get('ratio_to_floor', float('nan')):7.2f}")


if __name__ == "__main__":
    main()
