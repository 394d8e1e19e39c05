"""Two rounds of online DPO on the CPU, on a task whose reward is computable from the text.

Task: the synthetic demo task (:mod:`fastpref.data.synthetic`): a prompt "Say fox and add 3+8." asks for an
opener "Sure!", the word, the sum "3+8=11." and a closer "Done."; the known reward
(:class:`fastpref.rounds.scorers.DemoTaskReward`) adds 1, 2, 3 and 1 for them, scaled to 0..10. The policy is a
random-init tiny Llama with fastpref's local tokenizer (nothing is downloaded), given the task's format by a short
SFT warm-up (``loss_type="sft"`` on the chosen responses of the bundled demo pairs). Then each round samples K
responses per held-in prompt, pairs every two samples whose reward differs, trains a DPO stage with the round's
starting policy as the reference, and reports the mean known reward of samples on held-out prompts (drawn with
the same seed every round).

    python examples/rounds_known_reward.py [--output_dir runs/rounds-example] [--rounds 2]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tokenizer import build_tokenizer
from fastpref.rounds import RoundsConfig, run_rounds
from fastpref.rounds.loop import load_policy
from fastpref.rounds.scorers import DemoTaskReward


def _config(output_dir: str, seed: int, **fields) -> PreferenceConfig:
    return PreferenceConfig(output_dir=output_dir, report_to=[], save_strategy="no", use_cpu=True, disable_tqdm=True,
                            lr_scheduler_type="constant", per_device_train_batch_size=16, seed=seed, **fields)


def warm_up(tokenizer, output_dir: Path, steps: int, seed: int):
    """A random-init tiny Llama taught the task's response format by ``steps`` SFT steps."""
    model = load_policy("tiny-llama", tokenizer, seed)
    pairs = load_preference_dataset("demo", split="train").select(range(16 * steps))
    args = _config(str(output_dir / "warmup"), seed, loss_type="sft", learning_rate=3e-3, max_steps=steps,
                   logging_steps=steps, ref_cache_dir=str(output_dir / "warmup" / "ref_cache"))
    PreferenceTrainer(model, args=args, train_dataset=pairs, processing_class=tokenizer).train()
    return model


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output_dir", default=None, help="default: a fresh temporary directory")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--warmup_steps", type=int, default=40)
    parser.add_argument("--prompts", type=int, default=24, help="training prompts per round")
    parser.add_argument("--eval_prompts", type=int, default=16, help="held-out prompts")
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    started = time.perf_counter()
    output_dir = Path(options.output_dir or tempfile.mkdtemp(prefix="fastpref-rounds-"))
    tokenizer = build_tokenizer()
    model = warm_up(tokenizer, output_dir, options.warmup_steps, options.seed)

    train_prompts = list(dict.fromkeys(load_preference_dataset("demo", split="train")["prompt"][-400:]))
    held_out = list(dict.fromkeys(load_preference_dataset("demo", split="test")["prompt"]))
    args = _config(str(output_dir / "rounds"), options.seed, loss_type="sigmoid", beta=0.1, learning_rate=1e-3,
                   max_steps=12, logging_steps=4)
    config = RoundsConfig(rounds=options.rounds, samples_per_prompt=4, max_new_tokens=20, pairing="all_pairs",
                          seed=options.seed)
    result = run_rounds(model, train_prompts[:options.prompts], DemoTaskReward(), args=args, config=config,
                        tokenizer=tokenizer, eval_prompts=held_out[:options.eval_prompts])

    print(f"\nheld-out known reward (0..10; {options.eval_prompts} prompts x {config.samples_per_prompt} samples):")
    print(f"  after the SFT warm-up: {result.initial['heldout_reward']:.3f}")
    for metrics in result.rounds:
        print(f"  round {metrics['round']}: {metrics['heldout_reward']:.3f}   ({metrics['pairs']} pairs, train loss "
              f"{metrics.get('train_loss', float('nan')):.3f}, on-policy sample reward "
              f"{metrics['sample_reward']:.3f})")
    print(f"output: {output_dir}   ({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
