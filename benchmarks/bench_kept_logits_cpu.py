"""Issue 11 item 3: a trainable head with a pair-local loss, 3 GEMMs (logits kept for one chunk of whole pairs;
fastpref.linear_preference_loss(path="kept"), csrc/kept_logits_cpu.cpp) against the 4-GEMM composed path
(fastpref.linear_logps + fastpref.preference_loss, backend "cpp": the backward recomputes the logits).

fwd+bwd of a sigmoid DPO loss over B pairs (chosen sequences first) with reference log-probs, hidden and weight
both trainable. Timed interleaved in one run (impl order rotates every repeat; best and median of R, and the median
over repeats of each impl's time over cpp's in the same repeat; also the same for process CPU time, which other
jobs' load disturbs least — with OMP_NUM_THREADS=1 it is the single thread's work):

- cpp:        linear_preference_loss(path="composed", backend="cpp"), then loss.backward()
- kept@M:     linear_preference_loss(path="kept", memory_budget=M MiB), then loss.backward(); chunk rows recorded
              (the automatic rule, fastpref.losses.linear_loss.kept_path_wins, is read off these)
- aten3:      the ATen prototype of the 3-GEMM scheme (kept3 below, head only, upstream g per sequence), --aten
- floor3/4:   3 and 4 bare torch.mm of the shape (h·Wᵀ), the least the two schemes can cost.

Before timing, kept3's log-probs and gradients are checked against the cpp path in float64 at a small odd shape.
Results: benchmarks/results/kept_logits_cpu.json + .png (uptime load before and after recorded).

    OMP_NUM_THREADS=1 python benchmarks/bench_kept_logits_cpu.py --repeats 3 --dtypes float32 bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results, save_results  # noqa: E402

import fastpref  # noqa: E402
from fastpref.losses.linear_loss import kept_path_wins  # noqa: E402

RESULTS_NAME = "kept_logits_cpu"
# (N, D, V, rows per sequence): a pair is 2 sequences, a chunk holds whole pairs
SHAPES = ((2048, 512, 32000, 128), (512, 896, 151936, 32))
# per shape: the memory budgets (MiB) of the kept path, chosen so that chunks hold different numbers of pairs
BUDGETS_MIB = {32000: (32, 64), 151936: (64, 256)}


def _cpp(hidden, weight, labels, cu_seqlens, upstream):
    logps = fastpref.linear_logps(hidden, weight, labels, cu_seqlens=cu_seqlens, backend="cpp").logps
    (logps * upstream).sum().backward()
    return logps.detach()


def _chunk_rows(seq_rows: int, vocab: int, budget_bytes: int, itemsize: int) -> int:
    """Rows of the largest chunk of whole pairs whose float logits fit the budget (at least one pair)."""
    pair_rows = 2 * seq_rows
    return max(1, budget_bytes // (pair_rows * vocab * itemsize)) * pair_rows


def kept3(hidden, weight, labels, seq_rows, upstream, budget_bytes, clock=None):
    """Per-sequence log-probs and (dH, dW) of Σ_s g_s·log p(seq s), logits kept per chunk: 3 GEMMs."""
    rows, vocab = hidden.shape[0], weight.shape[0]
    chunk = _chunk_rows(seq_rows, vocab, budget_bytes, weight.element_size())
    buf = torch.empty(min(chunk, rows), vocab, dtype=hidden.dtype)
    grad_hidden, grad_weight = torch.empty_like(hidden), torch.zeros_like(weight)
    token_logps = torch.empty(rows, dtype=hidden.dtype)
    row_upstream = upstream.repeat_interleave(seq_rows)
    clock = clock if clock is not None else {"gemm": 0.0, "elementwise": 0.0}
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        h_c, y_c, z = hidden[start:stop], labels[start:stop, None], buf[:stop - start]
        t0 = time.perf_counter()
        torch.mm(h_c, weight.T, out=z)
        t1 = time.perf_counter()
        z.sub_(z.amax(1, keepdim=True))
        z_y = z.gather(1, y_c).squeeze(1)
        z.exp_()
        row_sums = z.sum(1)
        token_logps[start:stop] = z_y - row_sums.log()
        # the loss is known here: g_row for these whole pairs; G = g·(onehot − softmax)
        g_c = row_upstream[start:stop]
        z.mul_((-g_c / row_sums)[:, None])
        z.scatter_add_(1, y_c, g_c[:, None])
        t2 = time.perf_counter()
        torch.mm(z, weight, out=grad_hidden[start:stop])
        grad_weight.addmm_(z.T, h_c)
        t3 = time.perf_counter()
        clock["gemm"] += (t1 - t0) + (t3 - t2)
        clock["elementwise"] += t2 - t1
    return token_logps.view(-1, seq_rows).sum(1), grad_hidden, grad_weight


def check_gradients():
    """kept3 against the cpp path, float64, odd sizes, two chunks (one a partial), non-uniform upstream."""
    gen = torch.Generator().manual_seed(1)
    seq_rows, seqs, dim, vocab = 7, 6, 13, 101
    rows = seq_rows * seqs
    hidden = torch.randn(rows, dim, generator=gen, dtype=torch.float64)
    weight = torch.randn(vocab, dim, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.randn(seqs, generator=gen, dtype=torch.float64)
    cu = torch.arange(0, rows + 1, seq_rows, dtype=torch.int32)
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    ref_logps = _cpp(h, w, labels, cu, upstream)
    budget = 2 * 2 * seq_rows * vocab * 8  # two pairs per chunk: chunks of 4, 2 sequences
    logps, grad_h, grad_w = kept3(hidden, weight, labels, seq_rows, upstream, budget)
    for name, got, want in (("logps", logps, ref_logps), ("dH", grad_h, h.grad), ("dW", grad_w, w.grad)):
        err = (got - want).abs().max().item()
        if not err < 1e-10:
            raise AssertionError(f"kept3 {name} differs from cpp by {err:.3g}")
    return dict(check="float64 vs cpp", rows=rows, dim=dim, vocab=vocab, max_abs_err_ok=True)


def _inputs(rows, dim, vocab, seq_rows, dtype):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(dtype)
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    upstream = torch.randn(rows // seq_rows, generator=gen).to(dtype)
    cu = torch.arange(0, rows + 1, seq_rows, dtype=torch.int32)
    return hidden, weight, labels, upstream, cu


def _loss_step(h, w, labels, cu, refs, **kwargs):
    def step():
        h.grad = w.grad = None
        fastpref.linear_preference_loss(h, w, labels, *refs, cu_seqlens=cu, **kwargs).loss.backward()
    return step


def _steps(hidden, weight, labels, upstream, cu, seq_rows, budgets, clock, aten):
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()
    pairs = upstream.shape[0] // 2
    gen = torch.Generator().manual_seed(2)
    refs = [-seq_rows * (1 + torch.rand(pairs, generator=gen)) for _ in range(2)]

    def floor(k):
        return lambda: [torch.mm(hidden, weight.T) for _ in range(k)]

    steps = dict(cpp=_loss_step(h, w, labels, cu, refs, path="composed", backend="cpp"))
    for mib in budgets:
        steps[f"kept@{mib}"] = _loss_step(h, w, labels, cu, refs, path="kept", memory_budget=mib << 20)
    if aten:
        steps["aten3"] = lambda: kept3(hidden, weight, labels, seq_rows, upstream, budgets[-1] << 20, clock)
    return dict(steps, floor3=floor(3), floor4=floor(4))


def _uptime() -> str:
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def measure(shape, dtype, repeats, budgets, aten):
    rows, dim, vocab, seq_rows = shape
    clock = {"gemm": 0.0, "elementwise": 0.0}
    steps = _steps(*_inputs(rows, dim, vocab, seq_rows, dtype), seq_rows, budgets, clock, aten)
    for fn in steps.values():
        fn()  # warm-up
    clock.update(gemm=0.0, elementwise=0.0)
    times = {name: [] for name in steps}
    cpu_times = {name: [] for name in steps}
    for rep in range(repeats):
        order = list(steps)[rep % len(steps):] + list(steps)[:rep % len(steps)]
        for name in order:
            start, cpu_start = time.perf_counter(), time.process_time()
            steps[name]()
            times[name].append(time.perf_counter() - start)
            cpu_times[name].append(time.process_time() - cpu_start)
    case = f"N{rows} D{dim} V{vocab} {str(dtype)[6:]}"
    records = []
    for name, secs in times.items():
        rec = dict(impl=name, case=case, rows=rows, dim=dim, vocab=vocab, seq_rows=seq_rows,
                   dtype=str(dtype)[6:], repeats=repeats, best_ms=1e3 * min(secs), median_ms=1e3 * statistics.median(secs))
        if name.startswith("kept@"):
            budget = int(name[5:]) << 20
            rec.update(chunk_rows=min(rows, _chunk_rows(seq_rows, vocab, budget, 4)),
                       auto_rule_takes_kept=kept_path_wins(rows, rows // seq_rows // 2, vocab, budget, dtype))
        if name == "aten3":
            rec.update(chunk_rows=min(rows, _chunk_rows(seq_rows, vocab, budgets[-1] << 20, 4)),
                       gemm_ms_mean=1e3 * clock["gemm"] / repeats, elementwise_ms_mean=1e3 * clock["elementwise"] / repeats)
        rec["times_ms"] = [round(1e3 * t, 2) for t in secs]
        rec["cpu_times_ms"] = [round(1e3 * t, 2) for t in cpu_times[name]]
        records.append(rec)
    cpp = next(r for r in records if r["impl"] == "cpp")
    for r, secs in zip(records, times.values()):
        r["best_over_cpp"], r["median_over_cpp"] = r["best_ms"] / cpp["best_ms"], r["median_ms"] / cpp["median_ms"]
        # same-repeat ratio (the two ran back to back): steadier than best/median on a shared machine
        r["paired_median_over_cpp"] = statistics.median(t / c for t, c in zip(secs, times["cpp"]))
        # process CPU seconds (all threads): the work done, least disturbed by other jobs' load
        r["cpu_paired_median_over_cpp"] = statistics.median(
            t / c for t, c in zip(cpu_times[r["impl"]], cpu_times["cpp"]))
    return records


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--aten", action="store_true", help="also time the ATen prototype (aten3)")
    parser.add_argument("--dtypes", nargs="+", default=["float32"], choices=["float32", "bfloat16"])
    parser.add_argument("--shapes", nargs="+", default=[f"{n}x{d}x{v}x{t}" for n, d, v, t in SHAPES])
    args = parser.parse_args(argv)
    check = check_gradients()
    print(check, flush=True)
    load_before, records = _uptime(), []
    for shape in (tuple(int(x) for x in s.split("x")) for s in args.shapes):
        for dtype_name in args.dtypes:
            new = measure(shape, getattr(torch, dtype_name), args.repeats, BUDGETS_MIB.get(shape[2], (64,)), args.aten)
            records += new
            for r in new:
                print({k: (round(v, 3) if isinstance(v, float) else v) for k, v in r.items()}, flush=True)
            meta = dict(timing=f"interleaved, best and median of {args.repeats} after one warm-up",
                        omp_num_threads=os.environ.get("OMP_NUM_THREADS"), torch_threads=torch.get_num_threads(),
                        budgets_mib=BUDGETS_MIB, loss="sigmoid, beta 0.1, reference log-probs", gradient_check=check,
                        load_before=load_before, load_after=_uptime())
            path = save_results(RESULTS_NAME, records, meta=meta)  # after every shape: a stopped run keeps it
    plot_results(path, x="case", y="paired_median_over_cpp", group="impl")
    print(meta["load_before"], "|", meta["load_after"])
    print(path)


if __name__ == "__main__":
    main()
