"""Issue 11's CPU trainer step: one optimizer step (forward + backward + AdamW) of TRL 1.16's DPOTrainer (sigmoid,
reference log-probs precomputed) vs fastpref DPO and Sr-DPO (cached reference, fused cpp head), LoRA and full
fine-tune, on a random-init Llama of hidden 256, 4 layers, vocabulary 32000, float32.

The step code is bench_step_gpu.py's (its run_configuration: the same pairs, initial weights and timing); here the
methods are interleaved: R rounds, each running every method's warm-up + timed steps in turn (the order rotating
per round), so a slow spell of the shared machine hits all of them. Each record: the median over rounds of each
round's median step time, the per-round medians, tokens/s, and the ratio to TRL DPO of the same configuration
(and to fastpref DPO). F (the floor's forward) and the tree-vs-separate agreement are measured in the first round
only (the merged record keeps the first round's). Results:
benchmarks/results/step_cpu.json + .png, both rewritten after every configuration, so a run stopped from outside
keeps what it measured. ``--budget`` seconds: no round is started that the longest round so far would carry past
it (the first always runs), so the run ends inside run_cpu.sh's cap.

    python benchmarks/bench_step_cpu.py                            # ≈ 2 minutes on 2 quiet cores
    python benchmarks/bench_step_cpu.py --modes lora --rounds 1
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_step_gpu as step_bench  # noqa: E402
from record import plot_results, save_results  # noqa: E402

from fastpref.data.tokenizer import build_tokenizer  # noqa: E402

RESULTS_NAME = "step_cpu"
METHODS = ("trl_dpo_precomputed", "fastpref_dpo", "fastpref_sr_dpo")
MODES = ("lora", "full")
# Llama, hidden 256, 4 layers (head_dim 64, GQA 2 kv heads), untied 32000-token head
MODEL = dict(hidden_size=256, intermediate_size=688, num_hidden_layers=4, num_attention_heads=4,
             num_key_value_heads=2, tie_word_embeddings=False)
VOCAB = 32000
CASE = step_bench.Case("cpu", 64, 128, 160)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=list(step_bench.DPO_FLOOR))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(step_bench.METHODS))
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds (every method once per round)")
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: start no round that would end past this (default: every round)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs per optimizer step")
    parser.add_argument("--micro-batch", type=int, default=4, help="pairs per forward/backward")
    parser.add_argument("--steps", type=int, default=2, help="timed steps per method per round")
    parser.add_argument("--warmup", type=int, default=1, help="untimed steps per method per round")
    parser.add_argument("--case", type=int, nargs=3, default=None, metavar=("PROMPT", "CHOSEN", "REJECTED"),
                        help=f"token lengths (default {CASE.prompt_len} {CASE.chosen_len} {CASE.rejected_len})")
    parser.add_argument("--hidden", type=int, default=MODEL["hidden_size"], help="model width (smoke tests shrink)")
    parser.add_argument("--vocab", type=int, default=VOCAB)
    parser.add_argument("--no-plot", action="store_true")
    mine = parser.parse_args(argv)
    args = step_bench.parse_args(["--smoke", "--attn", "sdpa", "--pairs", str(mine.pairs), "--micro-batch",
                                  str(mine.micro_batch), "--steps", str(mine.steps), "--warmup", str(mine.warmup),
                                  "--modes", *mine.modes, "--methods", *mine.methods])
    args.smoke, args.backend = False, None  # a failing method is recorded, not fatal; the best backend (cpp)
    args.model = "tiny-llama"
    args.model_overrides = dict(MODEL, hidden_size=mine.hidden, intermediate_size=mine.hidden * 688 // 256)
    args.rounds, args.vocab, args.no_plot, args.results_name = mine.rounds, mine.vocab, mine.no_plot, RESULTS_NAME
    args.round_budget = mine.budget  # not args.budget: that is bench_step_gpu's GPU-check plan (None here)
    args.case = step_bench.Case("cpu", *mine.case) if mine.case else CASE
    return args


def _rotated(items, by):
    return items[by % len(items):] + items[:by % len(items)]


def _round(args, mode, round_index, tokenizer, out_dir, forward_s=None):
    """One record per method of one mode, the methods in this round's order (F given after the first round)."""
    methods = list(args.methods)
    args.methods = _rotated(methods, round_index)
    try:
        return step_bench.run_configuration(args, mode, args.case, tokenizer, args.vocab, out_dir,
                                            forward_s=forward_s)
    finally:
        args.methods = methods


def _merge(rounds_records):
    """Median over rounds per (config, method); per-round medians kept."""
    merged = {}
    for record in (r for records in rounds_records for r in records):
        key = (record["config"], record["method"])
        first = merged.setdefault(key, dict(record, round_step_ms=[], statuses=[]))
        first["round_step_ms"].append(record["step_ms"])
        first["statuses"].append(record["status"])
    for record in merged.values():
        times = [t for t in record["round_step_ms"] if t is not None]
        record["step_ms"] = statistics.median(times) if times else None
        record["status"] = "ok" if times else record["statuses"][-1]
        record["tokens_per_s"] = record["step_tokens"] / record["step_ms"] * 1e3 if times else None
        record["step_over_floor"] = record["step_ms"] / record["floor_ms"] if times else None
    records = sorted(merged.values(), key=lambda r: (r["config"], step_bench.METHODS.index(r["method"])))
    step_bench.add_ratios(records)
    return records


def main(argv=None):
    args = parse_args(argv)
    meta = dict(model=dict(args.model_overrides, vocab_size=args.vocab, family="llama"), case=vars(args.case),
                beta=step_bench.BETA, dtype="float32", rounds=args.rounds, budget_s=args.round_budget,
                steps=args.steps, warmup=args.warmup,
                timing="median over interleaved rounds of each round's median step",
                torch_threads=torch.get_num_threads())
    tokenizer = build_tokenizer()
    if args.vocab < len(tokenizer):
        raise ValueError(f"--vocab {args.vocab} is below the tokenizer's {len(tokenizer)} tokens")
    with tempfile.TemporaryDirectory() as out_dir:
        path = _run_rounds(args, tokenizer, out_dir, meta)
    for r in json_records(path):
        print(f"{r['config']:<28} {r['method']:<22} {r['step_ms'] or float('nan'):9.1f} ms  "
              f"over TRL DPO {r['over_trl_dpo'] or float('nan'):.3f}  {r['status']}", flush=True)
    print(path)
    return path


def _run_rounds(args, tokenizer, out_dir, meta):
    """Every round that fits the budget, saved after each configuration; the path of the JSON."""
    by_round, path, forward_s, longest, started = [], None, {}, 0.0, time.monotonic()
    for round_index in range(args.rounds):
        if round_index and args.round_budget is not None and time.monotonic() - started + longest > args.round_budget:
            print(f"round {round_index + 1} of {args.rounds} not started: it would end past the "
                  f"{args.round_budget:.0f} s budget", flush=True)
            break
        round_started = time.monotonic()
        for mode in args.modes:
            args.check_agreement = round_index == 0  # _merge keeps the first round's figures of a record
            records = _round(args, mode, round_index, tokenizer, out_dir, forward_s.get(mode))
            forward_s.setdefault(mode, records[0]["F_ms"] / 1e3)
            by_round.append(records)
            meta["rounds_done"] = round_index + 1
            path = _save(args, _merge(by_round), meta)
        longest = max(longest, time.monotonic() - round_started)
    return path


def _save(args, records, meta):
    """The JSON and (unless --no-plot) its PNG, as they stand."""
    path = save_results(RESULTS_NAME, records, meta)
    if not args.no_plot:
        plot_results(path, x="method", y="step_ms", group="mode", facet="config")
    return path


def json_records(path):
    import json

    return json.loads(Path(path).read_text())["records"]


if __name__ == "__main__":
    main()
