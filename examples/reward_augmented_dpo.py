"""Reward-augmented DPO (Zhang et al. 2024, arXiv:2410.08067) on the CPU, from scored pairs to inference.

The bundled demo pairs carry judge scores (0..10, :mod:`fastpref.data.synthetic`). :func:`fastpref.data.reward_augment`
turns each into two pairs — conditioned on the chosen response's score, the pair as is; conditioned on the
rejected response's score, chosen and rejected swapped — and a random-init tiny Llama with fastpref's local
tokenizer (nothing is downloaded) trains on them with plain DPO. The model thus learns what each score looks
like: conditioned on the top score it should prefer the better response of a held-out pair, conditioned on the
bottom score the worse one. It prints the held-out DPO loss of the pairs as they are under each condition before
and after, then a greedy answer conditioned on the top score (:func:`fastpref.data.reward_conditioned_prompt`),
and exits non-zero unless, after training, that loss is lower under the top score than under the bottom score
(the better response is preferred more when the top score is asked for: the score conditioning was learned).

    python examples/reward_augmented_dpo.py [--steps 60]
"""

from __future__ import annotations

import argparse
import tempfile

import torch
from datasets import Dataset

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset, reward_augment, reward_conditioned_prompt
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds import SamplingConfig, sample_responses
from fastpref.rounds.loop import load_policy

TOP_SCORE, BOTTOM_SCORE = 10, 0


def conditioned(pairs: Dataset, score: float) -> Dataset:
    """The held-out pairs as they are, their prompts conditioned on ``score``."""
    return pairs.map(lambda row: {"prompt": reward_conditioned_prompt(row["prompt"], score)})


def losses(trainer: PreferenceTrainer) -> tuple[float, float]:
    """Held-out DPO loss −log σ(β·(h_w − h_l)) of the pairs as they are, conditioned on the top and on the bottom
    score (the lower, the more the better response is preferred)."""
    metrics = trainer.evaluate()
    return metrics["eval_top_loss"], metrics["eval_bottom_loss"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = load_policy("tiny-llama", tokenizer, options.seed)
    batch_size = 16
    train = reward_augment(load_preference_dataset("demo", split="train").select(range(batch_size * options.steps // 2)))
    held_out = load_preference_dataset("demo", split="test").select(range(64))
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, loss_type="sigmoid", beta=0.5, learning_rate=3e-3,
                                max_steps=options.steps, per_device_train_batch_size=batch_size,
                                lr_scheduler_type="constant", logging_steps=options.steps, report_to=[],
                                save_strategy="no", use_cpu=True, disable_tqdm=True, seed=options.seed)
        evaluation = {"top": conditioned(held_out, TOP_SCORE), "bottom": conditioned(held_out, BOTTOM_SCORE)}
        trainer = PreferenceTrainer(model, args=args, train_dataset=train, eval_dataset=evaluation,
                                    processing_class=tokenizer)
        before = losses(trainer)
        trainer.train()
        after = losses(trainer)
    prompt = reward_conditioned_prompt(held_out[0]["prompt"], TOP_SCORE)
    answer = sample_responses(trainer.model, tokenizer, [prompt], SamplingConfig(samples_per_prompt=1,
                                                                                 max_new_tokens=24, temperature=0))
    print(f"held-out DPO loss conditioned on score {TOP_SCORE}: {before[0]:.3f} -> {after[0]:.3f}; "
          f"on score {BOTTOM_SCORE}: {before[1]:.3f} -> {after[1]:.3f}")
    print(f"{prompt!r} -> {answer[0][0]!r}")
    if not after[0] < after[1]:
        raise SystemExit(f"the score conditioning was not learned: held-out loss {after[0]:.4f} under score "
                         f"{TOP_SCORE}, not below {after[1]:.4f} under score {BOTTOM_SCORE}")


if __name__ == "__main__":
    main()
