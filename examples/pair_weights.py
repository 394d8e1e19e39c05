"""Per-pair weights in the style of MADPO (margin-adaptive DPO) on the CPU: a ``weight`` column, computed from a
reward model's margin, multiplies each pair's loss.

A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded) trains on the bundled demo pairs,
whose ``score_chosen``/``score_rejected`` stand in for the reward model. A pair's margin Δ = s_w − s_l sets its
weight w = 2·σ(−(Δ − median Δ)/T): pairs the reward model finds hard (a small margin) weigh up to 2, easy ones
down to 0. At the start the policy equals the reference, so every pair's DPO loss is log 2 and the weighted loss
is mean(w)·log 2: the example checks that (the column reaches the loss), trains, prints the held-out margin
before and after, and exits non-zero unless both hold.

    python examples/pair_weights.py [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import math
import statistics
import tempfile

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy

TEMPERATURE = 1.0


def with_margin_weights(rows):
    """``rows`` with MADPO-style weights from the score margins (module docstring)."""
    margins = [w - l for w, l in zip(rows["score_chosen"], rows["score_rejected"], strict=True)]
    middle = statistics.median(margins)
    weights = [2.0 / (1.0 + math.exp((margin - middle) / TEMPERATURE)) for margin in margins]
    return rows.add_column("weight", weights)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    tokenizer = build_tokenizer()
    initial = load_policy("tiny-llama", tokenizer, options.seed)
    train = with_margin_weights(load_preference_dataset("demo", split="train").select(range(16 * options.steps)))
    held_out = load_preference_dataset("demo", split="test").select(range(64))
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, beta=0.5, learning_rate=3e-3, max_steps=options.steps,
                                per_device_train_batch_size=16, per_device_eval_batch_size=16,
                                lr_scheduler_type="constant", logging_steps=options.steps, report_to=[],
                                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=options.seed,
                                ref_cache_dir=f"{output_dir}/ref_cache")
        trainer = PreferenceTrainer(copy.deepcopy(initial), ref_model=initial, args=args, train_dataset=train,
                                    eval_dataset=held_out, processing_class=tokenizer)
        weighted_loss = trainer.evaluate(train.select(range(64)), metric_key_prefix="weighted")["weighted_loss"]
        before = trainer.evaluate()["eval_rewards/margins"]
        trainer.train()
        after = trainer.evaluate()["eval_rewards/margins"]
    weights = train["weight"][:64]
    expected = statistics.fmean(weights) * math.log(2)
    print(f"pair weights from score margins: min {min(train['weight']):.3f}, max {max(train['weight']):.3f}")
    print(f"weighted loss at the start {weighted_loss:.4f} (mean(w)*log 2 = {expected:.4f})")
    print(f"held-out margin beta*(h) {before:+.3f} -> {after:+.3f} after pair-weighted DPO")
    if not abs(weighted_loss - expected) < 1e-3:
        raise SystemExit(f"the weight column did not reach the loss: {weighted_loss:.5f} != {expected:.5f}")
    if not after > before:
        raise SystemExit(f"the held-out margin did not grow: {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
