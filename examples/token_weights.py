"""Token-weighted DPO in the style of TGDPO (Zhu et al. 2025, arXiv:2506.14574) on the CPU: per-token weights as
dataset columns (``chosen_token_weights``/``rejected_token_weights``), computed from a guide model's token rewards.

A random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded). The guide is that model after a
short SFT on the chosen responses; its token reward is r_t = log π_guide(y_t | x, y_<t) − log π_init(y_t | x, y_<t),
standardised over the data's response tokens to z_t, and each token's weight is 1 + α·z_t on chosen responses and
1 − α·z_t on rejected ones (clipped to [0.2, 2]), so
tokens the guide prefers weigh more in the chosen answer and tokens it dislikes weigh more in the rejected one.
The weights align with the trainer's tokens through ``fastpref.data.response_tokens``. DPO then trains on the
weighted pairs: the weights multiply log p_t in the policy and in the reference. It prints the weights' spread and
the held-out margin before and after, and exits non-zero unless the weights vary and the margin grew.

    python examples/token_weights.py [--steps 30]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset, response_tokens, tokenize_pair
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds.loop import load_policy

ALPHA, LOW, HIGH = 0.5, 0.2, 2.0


def settings(output_dir: str, steps: int, seed: int, **fields) -> PreferenceConfig:
    return PreferenceConfig(output_dir=output_dir, beta=0.5, learning_rate=3e-3, max_steps=steps,
                            per_device_train_batch_size=16, lr_scheduler_type="constant", logging_steps=steps,
                            report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True, seed=seed,
                            ref_cache_dir=f"{output_dir}/ref_cache", **fields)


def token_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """log p(y_t | x, y_<t) of each response token."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1:-1].float()
    return torch.log_softmax(logits, -1).gather(-1, torch.tensor(response)[:, None])[:, 0]


def with_guide_weights(rows, guide, initial, tokenizer):
    """``rows`` with TGDPO-style token weights from the guide's token rewards (module docstring)."""
    def rewards(example):
        prompt = tokenize_pair(example, tokenizer, max_length=None)["prompt_input_ids"]
        tokens = response_tokens(example, tokenizer)
        return {f"{side}_reward": (token_logps(guide, prompt, tokens[side]) - token_logps(initial, prompt, tokens[side])
                                   ).tolist() for side in ("chosen", "rejected")}

    rows = rows.map(rewards, desc="Guide token rewards")
    every = torch.tensor([r for side in ("chosen", "rejected") for row in rows[f"{side}_reward"] for r in row])
    mean, std = every.mean(), every.std()

    def weights(example):
        return {f"{side}_token_weights": (1.0 + sign * ALPHA * (torch.tensor(example[f"{side}_reward"]) - mean) / std
                                          ).clamp(LOW, HIGH).tolist() for side, sign in (("chosen", 1), ("rejected", -1))}

    return rows.map(weights).remove_columns(["chosen_reward", "rejected_reward"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    initial = load_policy("tiny-llama", tokenizer, options.seed)
    train = load_preference_dataset("demo", split="train").select(range(16 * options.steps))
    held_out = load_preference_dataset("demo", split="test").select(range(64))
    with tempfile.TemporaryDirectory() as output_dir:
        guide = copy.deepcopy(initial)
        PreferenceTrainer(guide, args=settings(output_dir + "/guide", 10, options.seed, loss_type="sft"),
                          train_dataset=train, processing_class=tokenizer).train()
        weighted = with_guide_weights(train, guide.eval(), initial.eval(), tokenizer)
        trainer = PreferenceTrainer(copy.deepcopy(initial), ref_model=initial,
                                    args=settings(output_dir + "/dpo", options.steps, options.seed),
                                    train_dataset=weighted, eval_dataset=held_out, processing_class=tokenizer)
        before = trainer.evaluate()["eval_rewards/margins"]
        trainer.train()
        after = trainer.evaluate()["eval_rewards/margins"]
    chosen = torch.tensor([w for row in weighted["chosen_token_weights"] for w in row])
    rejected = torch.tensor([w for row in weighted["rejected_token_weights"] for w in row])
    print(f"guide token weights: chosen mean {chosen.mean():.3f} (std {chosen.std():.3f}), "
          f"rejected mean {rejected.mean():.3f} (std {rejected.std():.3f})")
    print(f"held-out margin beta*(h) {before:+.3f} -> {after:+.3f} after token-weighted DPO")
    if not min(chosen.std(), rejected.std()) > 0.01:
        raise SystemExit("the guide's token weights do not vary: the guide learned nothing")
    if not after > before:
        raise SystemExit(f"the held-out margin did not grow: {before:.4f} -> {after:.4f}")


if __name__ == "__main__":
    main()
