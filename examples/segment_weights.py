"""Segment-level DPO in the style of SDPO (Kong et al. 2025, arXiv:2501.01821) on the CPU: the loss sees only the
segment where the two responses differ, given as character spans (``chosen_segments``/``rejected_segments``).

A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded) trains on the bundled demo pairs,
whose chosen and rejected answers share most of their text ("Ugh. milk. 6+0=8." against "Ugh. moon. 6+0=8.").
Each response's shared start and end get weight 0 as ``[start_char, end_char, 0.0]`` spans; the differing segment
is uncovered and keeps weight 1, so the policy and reference log-probs sum over that segment only (a token partly
inside a zero span takes weight 0). It prints the share of response tokens the loss sees and the held-out margin
(over whole responses) before and after, and exits non-zero unless the share is strictly between 0 and 1 and the
margin grew.

    python examples/segment_weights.py [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import os
import tempfile

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy


def differing_segments(example: dict) -> dict:
    """Weight-0 spans over the text both responses share at their start and at their end."""
    chosen, rejected = example["chosen"], example["rejected"]
    start = len(os.path.commonprefix([chosen, rejected]))
    end = len(os.path.commonprefix([chosen[start:][::-1], rejected[start:][::-1]]))
    out = {}
    for side, text in (("chosen", chosen), ("rejected", rejected)):
        spans = [[0, start, 0.0]] if start else []
        if end:
            spans.append([len(text) - end, len(text), 0.0])
        out[f"{side}_segments"] = spans
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    tokenizer = build_tokenizer()
    initial = load_policy("tiny-llama", tokenizer, options.seed)
    train = load_preference_dataset("demo", split="train").select(range(16 * options.steps)).map(differing_segments)
    held_out = load_preference_dataset("demo", split="test").select(range(64))
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, beta=0.5, learning_rate=3e-3, max_steps=options.steps,
                                per_device_train_batch_size=16, lr_scheduler_type="constant",
                                logging_steps=options.steps, report_to=[], save_strategy="no", use_cpu=True,
                                disable_tqdm=True, seed=options.seed, ref_cache_dir=f"{output_dir}/ref_cache")
        trainer = PreferenceTrainer(copy.deepcopy(initial), ref_model=initial, args=args, train_dataset=train,
                                    eval_dataset=held_out, processing_class=tokenizer)
        before = trainer.evaluate()["eval_rewards/margins"]
        trainer.train()
        after = trainer.evaluate()["eval_rewards/margins"]
    weights = [w for side in ("chosen", "rejected") for row in trainer.train_dataset[f"{side}_token_weights"]
               for w in row]
    seen = sum(w > 0 for w in weights) / len(weights)
    print(f"the loss sees {seen:.1%} of the response tokens (the differing segments)")
    print(f"held-out margin beta*(h) {before:+.3f} -> {after:+.3f} after segment-weighted DPO")
    if not 0 < seen < 1:
        raise SystemExit(f"the segments weight {seen:.1%} of the tokens: they did not reach the trainer")
    if not after > before:
        raise SystemExit(f"the held-out margin did not grow: {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
