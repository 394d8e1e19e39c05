"""ORPO (Hong et al. 2024, arXiv:2403.07691) on the CPU: ``loss_type=["sft", "orpo"]``, no reference model.

A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded) trains on 640 of the bundled
demo pairs (:mod:`fastpref.data.synthetic`) with ORPO's loss: the SFT negative log-likelihood of the chosen
response plus β·(−log σ(log odds_w − log odds_l)), the odds taken on the mean token log-prob. It prints the
held-out loss and the held-out margin β·(log π_w − log π_l) before and after, and exits non-zero unless the loss
fell and the margin grew.

    python examples/orpo.py [--steps 40]
"""

from __future__ import annotations

import argparse
import tempfile

import torch

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy


def held_out_figures(trainer: PreferenceTrainer) -> tuple[float, float]:
    """(sft + orpo loss, mean margin β·(log π_w − log π_l)) on the evaluation set (no reference: rewards are β·log π)."""
    metrics = trainer.evaluate()
    return metrics["eval_loss"], metrics["eval_rewards/margins"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    model = load_policy("tiny-llama", tokenizer, options.seed)
    train = load_preference_dataset("demo", split="train").select(range(16 * options.steps))
    held_out = load_preference_dataset("demo", split="test").select(range(64))
    with tempfile.TemporaryDirectory() as output_dir:
        args = PreferenceConfig(output_dir=output_dir, loss_type=["sft", "orpo"], beta=0.5, learning_rate=3e-3,
                                max_steps=options.steps, per_device_train_batch_size=16, lr_scheduler_type="constant",
                                logging_steps=options.steps, report_to=[], save_strategy="no", use_cpu=True,
                                disable_tqdm=True, seed=options.seed)
        trainer = PreferenceTrainer(model, args=args, train_dataset=train, eval_dataset=held_out,
                                    processing_class=tokenizer)
        before = held_out_figures(trainer)
        trainer.train()
        after = held_out_figures(trainer)
    print(f"held-out ORPO loss {before[0]:.3f} -> {after[0]:.3f}; "
          f"margin beta*(log p_w - log p_l) {before[1]:+.3f} -> {after[1]:+.3f}")
    if not after[0] < before[0]:
        raise SystemExit(f"the held-out ORPO loss did not fall: {before[0]:.4f} -> {after[0]:.4f}")
    if not after[1] > before[1]:
        raise SystemExit(f"the chosen-over-rejected margin did not grow: {before[1]:.4f} -> {after[1]:.4f}")


if __name__ == "__main__":
    main()
