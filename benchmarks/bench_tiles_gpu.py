"""Tile sweep of the Triton log-prob kernels: the forward kernel and the weight-gradient backward (logits-gradient
+ dW kernels) under each candidate block shape, at N=8192, D=4096, V=128256 bf16.

The kernels take their block shapes from the per-kernel table ``fastpref.kernels.rows.TILES``; for each candidate
the sweep replaces the entries of the kernels an op launches (the forward: ``forward``; the dW backward: ``dlogits``
and ``weight_grad``) for the run (kernels/ is not edited), times both ops (``triton.testing.do_bench`` median), and checks each output against the default
config's (max |diff| relative to max |default|): a config that compiles but computes something else is flagged.
Candidates are ordered by expected gain (larger tiles and deeper pipelines first after the default); the sweep
stops starting new ones when ``--budget`` seconds are spent. A config the compiler rejects (shared memory,
register limits) is recorded as an error.

    python benchmarks/bench_tiles_gpu.py --budget 90 --no-plot     # GPU (what gpu_check.sh runs)
    python benchmarks/bench_tiles_gpu.py --dry-run                  # CPU: interpreter tiles, tiny shape
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from record import plot_results, save_results, time_ms  # noqa: E402

SHAPE = (8192, 4096, 128256)
DRY_RUN_SHAPE = (21, 16, 67)
# (block_m, block_n, block_k, num_warps, num_stages); the first is today's default of TILES.
GPU_CANDIDATES = ((128, 128, 64, 8, 3), (128, 256, 64, 8, 3), (256, 128, 64, 8, 3), (128, 256, 64, 8, 4),
                  (128, 128, 64, 8, 4), (128, 128, 64, 4, 4), (256, 128, 64, 8, 4), (64, 256, 64, 4, 4),
                  (128, 64, 64, 4, 4), (128, 256, 32, 8, 5))
DRY_RUN_CANDIDATES = ((16, 32, 16, 1, 1), (16, 16, 16, 1, 1))


# The TILES entries each timed op launches.
OP_KERNELS = {"fwd": ("forward",), "bwd_dW": ("dlogits", "weight_grad")}


def make_inputs(rows, dim, vocab, device):
    gen = torch.Generator(device=device).manual_seed(7)
    hidden = torch.randn(rows, dim, device=device, generator=gen).to(torch.bfloat16)
    weight = (torch.randn(vocab, dim, device=device, generator=gen) * dim ** -0.5).to(torch.bfloat16)
    labels = torch.randint(0, vocab, (rows,), device=device, generator=gen)
    grad_rows = torch.randn(rows, device=device, generator=gen)
    return hidden, weight, labels, grad_rows


def ops(inputs):
    """{"fwd": callable, "bwd_dW": callable}: the forward kernel, and the backward asked for dW only."""
    from fastpref.kernels import linear_logps_bwd, linear_logps_fwd
    from fastpref.logps.contract import GradsWanted, LinearHead

    hidden, weight, labels, grad_rows = inputs
    _, state, _, _ = linear_logps_fwd.linear_logps_forward(hidden, weight, None, labels, -100, 1.0, None)
    return {
        "fwd": lambda: linear_logps_fwd.linear_logps_forward(hidden, weight, None, labels, -100, 1.0, None)[0],
        "bwd_dW": lambda: linear_logps_bwd.linear_logps_backward(
            LinearHead(hidden, weight, None, labels, -100, 1.0, None), state, grad_rows,
            GradsWanted(hidden=False, weight=True, bias=False))[1],
    }


def sweep_one(candidate, inputs, reference, device, shape) -> list[dict]:
    """Records of both ops under one candidate config; `reference` (op -> default output) is filled on first use."""
    import dataclasses

    from fastpref.kernels import rows as kernel_rows

    block_m, block_n, block_k, warps, stages = candidate
    rows, dim, vocab = shape
    found = []
    for op, fn in ops(inputs).items():
        saved = {name: kernel_rows.TILES[name] for name in OP_KERNELS[op]}
        config = kernel_rows.TileConfig(block_m, block_n, block_k, warps, stages, saved[OP_KERNELS[op][0]].gpu.group_m)
        base = dict(config=f"{block_m}x{block_n}x{block_k} w{warps} s{stages}", **dataclasses.asdict(config),
                    rows=rows, dim=dim, vocab=vocab, replaced=",".join(saved))
        for name, tiles in saved.items():
            kernel_rows.TILES[name] = dataclasses.replace(tiles, gpu=config, interpreter=config)
        try:
            out = fn().float()
            want = reference.setdefault(op, out)
            diff = ((out - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()
            ms = time_ms(fn, device, warmup=10, rep=100)
            gemms = 1 if op == "fwd" else 2  # bwd_dW: the recomputed logits GEMM and the dW GEMM
            found.append(dict(base, op=op, status="ok", median_ms=ms, max_rel_diff_vs_default=diff,
                              agrees=diff < 1e-2, tflops_equiv=2 * gemms * rows * dim * vocab / ms / 1e9))
        except Exception as exc:  # noqa: BLE001 (a config the compiler rejects is a result)
            found.append(dict(base, op=op, status="error", reason=f"{type(exc).__name__}: {exc}"[:400]))
        finally:
            kernel_rows.TILES.update(saved)
    return found


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--budget", type=float, default=None, help="seconds; no new config once spent")
    parser.add_argument("--dry-run", action="store_true", help="CPU, Triton interpreter, tiny shape")
    parser.add_argument("--no-plot", action="store_true")
    parser.add_argument("--name", default="tiles_gpu")
    args = parser.parse_args(argv)
    if args.dry_run:
        os.environ.setdefault("TRITON_INTERPRET", "1")
    elif not torch.cuda.is_available():
        parser.error("needs a CUDA device (or --dry-run on a CPU)")
    from fastpref.kernels import rows as kernel_rows

    device = torch.device("cpu" if args.dry_run else "cuda")
    shape = DRY_RUN_SHAPE if args.dry_run else SHAPE
    inputs, reference, records, start = make_inputs(*shape, device), {}, [], time.time()
    defaults = {name: asdict(kernel_rows.tile_config(name, torch.bfloat16)) for ops_ in OP_KERNELS.values()
                for name in ops_}
    meta = dict(dtype="bfloat16", budget_s=args.budget, dry_run=args.dry_run, defaults=defaults)
    path = None
    for candidate in DRY_RUN_CANDIDATES if args.dry_run else GPU_CANDIDATES:
        if args.budget is not None and time.time() - start > args.budget:
            records.append(dict(config="x".join(map(str, candidate[:3])) + f" w{candidate[3]} s{candidate[4]}",
                                op="all", status="skipped", reason=f"budget of {args.budget:.0f} s spent"))
        else:
            records += sweep_one(candidate, inputs, reference, device, shape)
        path = save_results(args.name, records, meta)
        for r in records[-2:] if records[-1]["op"] != "all" else records[-1:]:
            shown = (f"{r['median_ms']:8.3f} ms {r['tflops_equiv']:6.0f} TF  diff {r['max_rel_diff_vs_default']:.1e}"
                     if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')[:90]}")
            print(f"{r['config']:>22} {r['op']:>7} {shown}", flush=True)
    if path is not None and not args.no_plot and any(r["status"] == "ok" for r in records):
        plot_results(path, x="config", y="median_ms", group="op")
    return path


if __name__ == "__main__":
    main()
