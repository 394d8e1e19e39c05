"""Curry-DPO (Pattnaik et al. 2024, arXiv 2403.07230): DPO on pairs from ranked responses, easy → hard, on the CPU.

Ranked rows of the synthetic task (:func:`fastpref.data.synthetic.generate_ranked`, K = 4 scored responses per
prompt) become pairs with :func:`fastpref.data.pairs_from_ranked` (``"best_vs_rest"``: the best response against
each lower-scored one), sorted by decreasing score gap. ``train_sampling_strategy="sequential"`` keeps that order,
so training meets the large-gap (easy) pairs first; the example splits the curriculum into three stages and
prints each stage's gap range. A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded)
trains with ``loss_type="sigmoid"``. It exits non-zero unless the batches follow the curriculum, the held-out
DPO loss fell and the held-out reward accuracy ends above one half.

    python examples/curry_dpo.py [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import pairs_from_ranked
from fastpref.data.synthetic import generate_ranked
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy

STAGES = 3


def gaps(pairs: list[dict]) -> list[float]:
    return [pair["score_chosen"] - pair["score_rejected"] for pair in pairs]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    batch_size = 8
    pairs = pairs_from_ranked(generate_ranked(4 * options.steps, k=4, seed=options.seed), strategy="best_vs_rest")
    pairs = pairs[: batch_size * options.steps]
    stage_size = -(-len(pairs) // STAGES)
    for stage in range(STAGES):
        stage_gaps = gaps(pairs[stage * stage_size:(stage + 1) * stage_size])
        print(f"stage {stage + 1}: {len(stage_gaps)} pairs, score gap {max(stage_gaps):.2f} .. {min(stage_gaps):.2f}")
    held_out = Dataset.from_list(pairs_from_ranked(generate_ranked(32, k=4, seed=options.seed + 1)))
    tokenizer = build_tokenizer()
    model = load_policy("tiny-llama", tokenizer, options.seed)
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, ref_cache_dir=f"{output_dir}/cache", loss_type="sigmoid",
                                beta=0.5, learning_rate=5e-4, max_steps=options.steps,
                                per_device_train_batch_size=batch_size, train_sampling_strategy="sequential",
                                lr_scheduler_type="constant", logging_steps=options.steps, report_to=[],
                                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=options.seed)
        trainer = PreferenceTrainer(model, args=args, train_dataset=Dataset.from_list(pairs), eval_dataset=held_out,
                                    processing_class=tokenizer)
        seen = [int(i) for batch in trainer.get_train_dataloader() for i in batch["example_index"]]
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    print(f"held-out DPO loss {before['eval_loss']:.3f} -> {after['eval_loss']:.3f}; reward accuracy "
          f"{before['eval_rewards/accuracies']:.3f} -> {after['eval_rewards/accuracies']:.3f}")
    if seen != list(range(len(pairs))):
        raise SystemExit("the batches did not follow the curriculum order")
    if not after["eval_loss"] < before["eval_loss"]:
        raise SystemExit(f"the held-out DPO loss did not fall: {before['eval_loss']:.4f} -> {after['eval_loss']:.4f}")
    if not after["eval_rewards/accuracies"] > 0.5:
        raise SystemExit(f"held-out reward accuracy {after['eval_rewards/accuracies']:.3f} is not above chance")


if __name__ == "__main__":
    main()
