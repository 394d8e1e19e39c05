"""CPU time of one PreferenceTrainer micro-step (compute_loss + backward) per stream layout: "padded", "tree"
(each pair as [x, y_w, y_l], the prompt once, a 4D mask) and "packed" (position_ids).

Tiny Llama from its config, the bundled demo data, sdpa, one thread. Layouts are interleaved so that load from
other processes hits each alike; a figure is the median over batches of the fastest of `--reps` runs of that
batch. Run: `python benchmarks/bench_layouts_cpu.py` → benchmarks/results/layouts_cpu.json (+ .png).
"""

from __future__ import annotations

import argparse
import copy
import statistics
import tempfile
import time
from pathlib import Path

import torch
from record import plot_results, save_results

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tiny_models import build_model
from fastpref.data.tokenizer import build_tokenizer

LAYOUTS = ("padded", "tree", "packed")


def _trainers(batch: int, loss_type: str, batches: int, workdir: Path):
    tokenizer = build_tokenizer()
    torch.manual_seed(0)
    base = build_model("tiny-llama", vocab_size=len(tokenizer))
    rows = load_preference_dataset("demo", split="train").select(range(batch * batches))
    trainers = {}
    for layout in LAYOUTS:
        args = PreferenceConfig(output_dir=str(workdir / layout), ref_cache_dir=str(workdir / "cache"),
                                report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                                per_device_train_batch_size=batch, learning_rate=1e-3, seed=0,
                                loss_type=loss_type, stream_layout=layout)
        trainers[layout] = PreferenceTrainer(copy.deepcopy(base), args=args, train_dataset=rows,
                                             processing_class=tokenizer)
    return trainers


def measure(batch: int, loss_type: str, reps: int, batches: int) -> list[dict]:
    with tempfile.TemporaryDirectory() as tmp:
        trainers = _trainers(batch, loss_type, batches, Path(tmp))
        inputs = {layout: [tr._prepare_inputs(tr.data_collator([tr.train_dataset[i] for i in range(j, j + batch)]))
                           for j in range(0, batch * batches, batch)] for layout, tr in trainers.items()}
        best = {layout: [float("inf")] * batches for layout in trainers}
        for _ in range(reps):
            for k in range(batches):
                for layout, tr in trainers.items():
                    start = time.perf_counter()
                    tr.compute_loss(tr.model, inputs[layout][k]).backward()
                    best[layout][k] = min(best[layout][k], time.perf_counter() - start)
    padded = statistics.median(best["padded"])
    return [dict(case=f"B{batch} {loss_type}", batch=batch, loss_type=loss_type, layout=layout,
                 median_ms=statistics.median(times) * 1e3, ratio_to_padded=statistics.median(times) / padded,
                 tokens_first_batch=int(inputs[layout][0]["input_ids"].numel()))
            for layout, times in best.items()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batches", type=int, nargs="+", default=[8, 32])
    parser.add_argument("--losses", nargs="+", default=["sigmoid", "sr_dpo"])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--num-batches", type=int, default=6)
    args = parser.parse_args()
    torch.set_num_threads(1)
    records = []
    for batch in args.batches:
        for loss_type in args.losses:
            records += measure(batch, loss_type, args.reps, args.num_batches)
            for r in records[-len(LAYOUTS):]:
                print(f"{r['case']:14s} {r['layout']:7s} {r['median_ms']:8.1f} ms  x{r['ratio_to_padded']:.2f} "
                      f"of padded  ({r['tokens_first_batch']} tokens)", flush=True)
    path = save_results("layouts_cpu", records, {"model": "tiny-llama", "attention": "sdpa", "threads": 1})
    print(path, plot_results(path, x="case", y="median_ms", group="layout"))


if __name__ == "__main__":
    main()
