"""Issue 11's fused DPO row: the sigmoid DPO loss straight from hidden states, forward + backward, side by side:

- fastpref: fastpref.linear_logps(backend="cpp") for the sequence log-probs, then fastpref.preference_loss
  (loss_type="sigmoid"), the reference log-probs given as [B] tensors (a cached reference)
- liger:    Liger-Kernel 0.8.5 LigerFusedLinearDPOLoss(compiled=True, use_ref_model=False, chunk_size=1), the
  same sigmoid loss on summed log-probs; without a reference model it takes the reference log-probs as 0, so both
  do the same head work (Liger cannot take given reference log-probs; the subtraction is free)

Rows N = 2·B·T: B pairs of chosen and rejected sequences of T tokens (chosen rows first, as Liger stacks them),
every row scored. Frozen head (the weight needs no gradient) and trainable head, float32 and bfloat16. Each
record: best-of-R wall time after one warm-up (compile excluded), peak resident memory above the inputs
(fastpref.profiling.peak_memory), and time and memory over fastpref's. A peer that fails to import or run is
recorded as skipped with the reason. Results: benchmarks/results/fused_dpo_cpu.json + .png.

    python benchmarks/bench_fused_dpo_cpu.py                    # both shapes (≈ minutes on 2 cores)
    python benchmarks/bench_fused_dpo_cpu.py --shapes 2048x512x32000 --dtypes bfloat16
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_linear_logps_cpu import DTYPES, SHAPES, _best_time_and_peak  # noqa: E402
from record import plot_results, save_results  # noqa: E402

import fastpref  # noqa: E402

RESULTS_NAME = "fused_dpo_cpu"
IMPLS = ("fastpref", "liger")
BETA = 0.1
PAIRS = {2048: 4, 512: 2}  # B pairs for the benchmark's N; other N use one pair


def _fastpref_loss(hidden, weight, labels, ref_logps):
    logps = fastpref.linear_logps(hidden, weight, labels, backend="cpp").logps
    pairs = logps.shape[0] // 2
    return fastpref.preference_loss(logps[:pairs], logps[pairs:], ref_logps[:pairs], ref_logps[pairs:],
                                    loss_type="sigmoid", beta=BETA).loss


def _liger_loss_fn():
    from liger_kernel.chunked_loss import LigerFusedLinearDPOLoss  # liger-kernel 0.8.5

    module = LigerFusedLinearDPOLoss(beta=BETA, compiled=True, use_ref_model=False, average_log_prob=False,
                                     chunk_size=1, loss_type="sigmoid")

    def loss(hidden, weight, labels, ref_logps):
        return module(weight, hidden, labels)[0]
    return loss


def _loss_fn(impl):
    return _fastpref_loss if impl == "fastpref" else _liger_loss_fn()


def _inputs(shape, dtype, head):
    rows, dim, vocab = shape
    pairs = PAIRS.get(rows, 1)
    if rows % (2 * pairs):
        raise ValueError(f"shapes: N={rows} is not 2·B·T for B={pairs} pairs")
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(2 * pairs, rows // (2 * pairs), dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(dtype).requires_grad_(head == "trainable")
    labels = torch.randint(0, vocab, hidden.shape[:2], generator=gen)
    ref_logps = -(torch.rand(2 * pairs, generator=gen) + 1) * hidden.shape[1] * 10  # ≈ a cached reference's sums
    return hidden, weight, labels, ref_logps


def _measure(impl, head, shape, dtype_name, rounds):
    hidden, weight, labels, ref_logps = _inputs(shape, DTYPES[dtype_name], head)
    loss_fn = _loss_fn(impl)

    def step():
        hidden.grad = weight.grad = None
        loss_fn(hidden, weight, labels, ref_logps).backward()
    seconds, peak = _best_time_and_peak(step, rounds)
    return dict(best_ms=seconds * 1e3, peak_mib=peak / 2**20)


def _add_ratios(records):
    by_key = {(r["impl"], r["head"], r["case"]): r for r in records if r.get("best_ms") is not None}
    for r in records:
        ours = by_key.get(("fastpref", r["head"], r["case"]))
        ok = ours is not None and r.get("best_ms") is not None
        r["time_over_fastpref"] = r["best_ms"] / ours["best_ms"] if ok else None
        r["peak_over_fastpref"] = r["peak_mib"] / ours["peak_mib"] if ok and ours["peak_mib"] > 0 else None


def _record(impl, head, shape, dtype_name, rounds):
    rows, dim, vocab = shape
    rec = dict(impl=impl, mode="fwd+bwd", head=head, dtype=dtype_name, case=f"N{rows} D{dim} V{vocab} {dtype_name}",
               rows=rows, dim=dim, vocab=vocab, pairs=PAIRS.get(rows, 1))
    try:
        rec.update(_measure(impl, head, shape, dtype_name, rounds), status="ok")
    except Exception as exc:  # a peer that fails to import or run is recorded, not fatal
        rec.update(best_ms=None, peak_mib=None, status=f"skipped: {type(exc).__name__}: {exc}"[:300])
    return rec


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--impls", nargs="+", default=list(IMPLS), choices=IMPLS)
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{d}x{v}" for n, d, v in SHAPES])
    parser.add_argument("--dtypes", nargs="+", default=list(DTYPES), choices=list(DTYPES))
    parser.add_argument("--heads", nargs="+", default=["frozen", "trainable"], choices=["frozen", "trainable"])
    parser.add_argument("--rounds", type=int, default=1)
    parser.add_argument("--no-plot", action="store_true")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    records, path = [], None
    for shape in (tuple(int(x) for x in s.split("x")) for s in args.shapes):
        for dtype_name in args.dtypes:
            for head in args.heads:
                for impl in args.impls:
                    rec = _record(impl, head, shape, dtype_name, args.rounds)
                    print({k: (round(v, 2) if isinstance(v, float) else v) for k, v in rec.items()}, flush=True)
                    records.append(rec)
                    _add_ratios(records)
                    path = save_results(RESULTS_NAME, records, meta=dict(
                        timing=f"best of {args.rounds} after one warm-up", loss="sigmoid DPO, beta 0.1, summed logps",
                        reference="given (fastpref) / none, taken as 0 (liger)", impls=args.impls))
    if not args.no_plot:
        plot_results(path, x="case", y=["best_ms", "peak_mib"], group="impl", facet="head", log_y=True)
    print(path)
    return path


if __name__ == "__main__":
    main()
