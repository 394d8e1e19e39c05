"""Issue 11's CPU table: per-token log-probs of h·Wᵀ with a non-uniform upstream gradient, every row scored, for a
frozen head (LoRA: gradient for hidden only) and a trainable one (hidden and weight), float32 and bfloat16, side by
side in one run:

- gemm_floor: one bare h·Wᵀ GEMM of the shape in the dtype (torch.mm), times the GEMMs the pass needs at the
  least: 1 for fwd, 2 for a frozen fwd+bwd, 4 for a trainable fwd+bwd (3 for eager, which keeps the logits)
- eager:      full logits, float32 log_softmax, gather (what a user writes)
- compile:    torch.compile of eager (compile time excluded)
- trl:        TRL 1.16 ChunkedLogProbFunction (its torch fold path on CPU, chunk 32768 as its trainer)
- cce:        cut-cross-entropy 25.1.1 linear_cross_entropy(impl="torch_compile", reduction="none"), negated
- cpp:        fastpref.linear_logps(backend="cpp", return_token_logps=True)

Each record: best-of-R wall time after one warm-up (the machine is shared; the best run is the least disturbed),
peak resident memory above the inputs during the timed runs (fastpref.profiling.peak_memory), GFLOP/s-equivalent (2·N·D·V per GEMM the pass
needs), time over cpp's and over the GEMM floor. Results: benchmarks/results/linear_logps_cpu_heads.json + .png.

    python benchmarks/bench_linear_logps_cpu.py                      # all (≈ minutes on 2 cores)
    python benchmarks/bench_linear_logps_cpu.py --impls cpp eager gemm_floor --shapes 2048x512x32000
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results, save_results  # noqa: E402

import fastpref  # noqa: E402
from fastpref.profiling import peak_memory  # noqa: E402

RESULTS_NAME = "linear_logps_cpu_heads"
SHAPES = ((2048, 512, 32000), (512, 896, 151936))
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
IMPLS = ("gemm_floor", "eager", "compile", "cce", "trl", "cpp")
GEMMS = {("fwd", "frozen"): 1, ("fwd", "trainable"): 1, ("fwd+bwd", "frozen"): 2, ("fwd+bwd", "trainable"): 4}


def _eager(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).squeeze(1)


_compiled = torch.compile(_eager, dynamic=False)


def _trl(hidden, weight, labels):
    from trl.kernels.chunked_logprob import ChunkedLogProbFunction

    return ChunkedLogProbFunction.apply(hidden, weight, None, labels, 1.0, 32768, None, 1.0, ("log_probs",))[0]


def _cce(hidden, weight, labels):
    from cut_cross_entropy import linear_cross_entropy  # cut-cross-entropy 25.1.1; per-token loss = -log p

    return -linear_cross_entropy(hidden, weight, labels, reduction="none", impl="torch_compile")


def _cpp(hidden, weight, labels):
    return fastpref.linear_logps(hidden, weight, labels, return_token_logps=True, backend="cpp").token_logps


TOKEN_LOGPS = {"eager": _eager, "compile": _compiled, "cce": _cce, "trl": _trl, "cpp": _cpp}


def _step(impl, backward, hidden, weight, labels, upstream):
    if impl == "gemm_floor":
        return lambda: torch.mm(hidden.detach(), weight.detach().T)
    fn = TOKEN_LOGPS[impl]

    def run():
        hidden.grad = weight.grad = None
        with torch.set_grad_enabled(backward):
            token = fn(hidden, weight, labels)
            if backward:
                (token.float() * upstream).sum().backward()
        return None
    return run


def _best_time_and_peak(step, rounds: int) -> tuple[float, int]:
    step()  # warm-up (and compilation)
    best, peak = float("inf"), 0
    for _ in range(rounds):
        start = time.perf_counter()
        _, used = peak_memory(step)
        best, peak = min(best, time.perf_counter() - start), max(peak, used)
    return best, peak


def _measure(impl, mode, head, shape, dtype_name, rounds):
    rows, dim, vocab = shape
    gen = torch.Generator().manual_seed(0)
    dtype = DTYPES[dtype_name]
    hidden = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(dtype).requires_grad_(head == "trainable")
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.randn(rows, generator=gen)
    step = _step(impl, mode == "fwd+bwd", hidden, weight, labels, upstream)
    seconds, peak = _best_time_and_peak(step, rounds)
    gemms = GEMMS[(mode, head)]
    if impl == "gemm_floor":
        seconds *= gemms
    return dict(impl=impl, mode=mode, head=head, dtype=dtype_name, case=f"N{rows} D{dim} V{vocab} {dtype_name}",
                run=f"{mode} N{rows} D{dim} V{vocab} {dtype_name}", rows=rows, dim=dim, vocab=vocab,
                gemms_needed=gemms, best_ms=seconds * 1e3, peak_mib=peak / 2**20,
                gflops_equiv=2 * gemms * rows * dim * vocab / seconds / 1e9)


def _add_ratios(records):
    by_key = {(r["impl"], r["mode"], r["head"], r["case"]): r for r in records}
    for r in records:
        cpp = by_key.get(("cpp", r["mode"], r["head"], r["case"]))
        floor = by_key.get(("gemm_floor", r["mode"], r["head"], r["case"]))
        r["time_over_cpp"] = r["best_ms"] / cpp["best_ms"] if cpp else None
        r["time_over_gemm_floor"] = r["best_ms"] / floor["best_ms"] if floor else None
        trainable = by_key.get((r["impl"], r["mode"], "trainable", r["case"]))
        r["frozen_over_trainable"] = (r["best_ms"] / trainable["best_ms"]
                                      if r["head"] == "frozen" and trainable else None)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{d}x{v}" for n, d, v in SHAPES])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--modes", nargs="+", default=["fwd+bwd"], choices=["fwd", "fwd+bwd"])
    parser.add_argument("--rounds", type=int, default=1)
    args = parser.parse_args(argv)
    records = []
    for shape in (tuple(int(x) for x in s.split("x")) for s in args.shapes):
        for dtype_name in args.dtypes:
            for mode in args.modes:
                for head in ("frozen", "trainable"):
                    for impl in args.impls:
                        if mode == "fwd" and head == "trainable":
                            continue  # the forward alone does not depend on the head
                        try:
                            rec = _measure(impl, mode, head, shape, dtype_name, args.rounds)
                        except Exception as exc:  # a peer that fails here is recorded, not fatal
                            rec = dict(impl=impl, mode=mode, head=head, dtype=dtype_name, case=str(shape),
                                       best_ms=None, error=f"{type(exc).__name__}: {exc}"[:300])
                        print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
                        records.append(rec)
                        path = _save(records, args)  # after every record: a stopped run keeps what it measured
    plot_results(path, x="run", y=["best_ms", "peak_mib"], group="impl", facet="head", log_y=True)
    print(path)


def _save(records, args):
    _add_ratios([r for r in records if r.get("best_ms") is not None])
    return save_results(RESULTS_NAME, records, meta=dict(timing=f"best of {args.rounds} after one warm-up",
                                                         upstream="randn per token", rows_scored="all",
                                                         impls=args.impls))


if __name__ == "__main__":
    main()
