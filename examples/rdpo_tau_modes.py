"""rDPO (Gallego 2024, arXiv:2402.08005) with each τ mode, from the judge's score columns, on the CPU.

The bundled demo pairs (:mod:`fastpref.data.synthetic`) carry ``score_chosen``/``score_rejected`` on a 0..10 scale.
The example shifts them to a judge on −5..5 (negative scores), prints the soft labels τ that
:func:`fastpref.losses.tau_from_scores` derives in each ``tau_mode`` — "bt" σ((s_w − s_l)/T), "normalized"
(s_w − lo)/((s_w − lo) + (s_l − lo)) with ``score_range=(−5, 5)``, "hard" 1/½/0 — and trains a random-init tiny
Llama (local tokenizer, nothing downloaded) with ``loss_type="rdpo"`` for a few steps in each mode. It exits
non-zero unless the τ values follow their formulas and every mode's held-out loss fell.

    python examples/rdpo_tau_modes.py [--steps 12]
"""

from __future__ import annotations

import argparse
import copy
import tempfile

import torch

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tokenizer import build_tokenizer
from fastpref.losses import tau_from_scores
from fastpref.rounds.loop import load_policy

SCORE_RANGE = (-5.0, 5.0)
MODES = {"bt": {"score_temperature": 2.0}, "normalized": {"score_range": list(SCORE_RANGE)}, "hard": {}}


def shifted(dataset):
    """The pairs with scores moved from 0..10 to the −5..5 judge scale."""
    return dataset.map(lambda row: {"score_chosen": row["score_chosen"] - 5.0,
                                    "score_rejected": row["score_rejected"] - 5.0})


def check_taus(dataset) -> None:
    s_w = torch.tensor(dataset["score_chosen"], dtype=torch.float64)
    s_l = torch.tensor(dataset["score_rejected"], dtype=torch.float64)
    lo = SCORE_RANGE[0]
    expected = {"bt": torch.sigmoid((s_w - s_l) / 2.0), "normalized": (s_w - lo) / ((s_w - lo) + (s_l - lo)),
                "hard": torch.where(s_w > s_l, 1.0, torch.where(s_w == s_l, 0.5, 0.0)).double()}
    for mode, fields in MODES.items():
        tau = tau_from_scores(s_w, s_l, mode, temperature=fields.get("score_temperature", 1.0),
                              score_range=fields.get("score_range"))
        print(f"tau_mode={mode:<10} tau mean {tau.mean():.3f}  min {tau.min():.3f}  max {tau.max():.3f}")
        if not torch.allclose(tau, expected[mode], rtol=1e-12, atol=0):
            raise SystemExit(f"tau_mode {mode!r}: τ does not follow its formula")
    binary = tau_from_scores(torch.tensor([1.0]), torch.tensor([0.0]), "bt").item()
    print(f"a 0/1 judge with tau_mode='bt' (T = 1): tau = {binary:.3f}, not 1")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args()
    torch.set_num_threads(1)
    tokenizer = build_tokenizer()
    train = shifted(load_preference_dataset("demo", split="train").select(range(16 * options.steps)))
    held_out = shifted(load_preference_dataset("demo", split="test").select(range(64)))
    check_taus(train)
    initial = load_policy("tiny-llama", tokenizer, options.seed)
    for mode, fields in MODES.items():
        with tempfile.TemporaryDirectory() as output_dir:
            args = PreferenceConfig(output_dir=output_dir, loss_type="rdpo", tau_mode=mode, beta=0.5,
                                    learning_rate=3e-3, max_steps=options.steps, per_device_train_batch_size=16,
                                    lr_scheduler_type="constant", logging_steps=options.steps, report_to=[],
                                    save_strategy="no", use_cpu=True, disable_tqdm=True, seed=options.seed,
                                    ref_cache_dir=f"{output_dir}/ref_cache", **fields)
            trainer = PreferenceTrainer(copy.deepcopy(initial), args=args, train_dataset=train,
                                        eval_dataset=held_out, processing_class=tokenizer)
            before = trainer.evaluate()["eval_loss"]
            trainer.train()
            after = trainer.evaluate()["eval_loss"]
        print(f"rdpo tau_mode={mode:<10} held-out loss {before:.4f} -> {after:.4f}")
        if not after < before:
            raise SystemExit(f"tau_mode {mode!r}: the held-out rDPO loss did not fall ({before:.4f} -> {after:.4f})")


if __name__ == "__main__":
    main()
