"""Listwise preference optimisation (TPO, arXiv 2405.16681; LiPO-λ, arXiv 2402.01878) on the CPU.

A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded) trains on ranked rows of the
synthetic task (:func:`fastpref.data.synthetic.generate_ranked`: K = 4 responses per prompt, each scored 0..10)
with ``loss_type="plackett_luce"`` (ListMLE over the score order) or ``"lambda_rank"``. It prints, on held-out
ranked rows, the loss and the pair accuracy (the fraction of pairs s_i > s_j whose implicit rewards
r = β·(log π − log π_ref) are ordered the same way) before and after, and exits non-zero unless the loss fell
and the pair accuracy ends above one half.

    python examples/listwise_tpo.py [--loss_type lambda_rank] [--steps 30]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data.synthetic import generate_ranked
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--loss_type", default="plackett_luce", choices=["plackett_luce", "lambda_rank"])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = load_policy("tiny-llama", tokenizer, options.seed)
    train = Dataset.from_list(generate_ranked(8 * options.steps, k=4, seed=options.seed))
    held_out = Dataset.from_list(generate_ranked(48, k=4, seed=options.seed + 1))
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, ref_cache_dir=f"{output_dir}/cache",
                                loss_type=options.loss_type, beta=0.5, learning_rate=3e-3, max_steps=options.steps,
                                per_device_train_batch_size=8, per_device_eval_batch_size=16,
                                lr_scheduler_type="constant", logging_steps=options.steps, report_to=[],
                                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=options.seed)
        trainer = PreferenceTrainer(model, args=args, train_dataset=train, eval_dataset=held_out,
                                    processing_class=tokenizer)
        before = trainer.evaluate()
        trainer.train()
        after = trainer.evaluate()
    loss, accuracy = "eval_loss", "eval_rewards/pair_accuracies"
    print(f"{options.loss_type}, K=4: held-out loss {before[loss]:.3f} -> {after[loss]:.3f}; "
          f"pair accuracy {before[accuracy]:.3f} -> {after[accuracy]:.3f}; "
          f"top-1 accuracy {before['eval_rewards/top1_accuracies']:.3f} -> {after['eval_rewards/top1_accuracies']:.3f}")
    if not after[loss] < before[loss]:
        raise SystemExit(f"the held-out listwise loss did not fall: {before[loss]:.4f} -> {after[loss]:.4f}")
    if not after[accuracy] > 0.5:
        raise SystemExit(f"the rewards do not rank held-out responses better than chance: {after[accuracy]:.3f}")


if __name__ == "__main__":
    main()
