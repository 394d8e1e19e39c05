"""Shared pieces of the trainer tests: a tiny model/tokenizer/data factory and a float64 log-prob oracle."""

from __future__ import annotations

import torch

from fastpref.logps import oracle as logps_oracle
from fastpref.data import load_preference_dataset
from fastpref.data.tiny_models import build_model
from fastpref.data.tokenizer import build_tokenizer

TOKENIZER = build_tokenizer()


def tiny_model(name: str = "tiny-llama", seed: int = 0):
    torch.manual_seed(seed)
    return build_model(name, vocab_size=len(TOKENIZER))


def demo_rows(split: str, count: int):
    return load_preference_dataset("demo", split=split).select(range(count))


def config(tmp_path, **overrides):
    from fastpref import PreferenceConfig

    settings = dict(output_dir=str(tmp_path / "out"), ref_cache_dir=str(tmp_path / "cache"), report_to=[],
                    save_strategy="no", use_cpu=True, disable_tqdm=True, per_device_train_batch_size=4,
                    per_device_eval_batch_size=8, learning_rate=1e-3, logging_steps=1, seed=0)
    settings.update(overrides)
    return PreferenceConfig(**settings)


def oracle_logps(model, prompt: list[int], response: list[int]) -> torch.Tensor:
    """Σ log p(response | prompt) in float64 from the model's own full logits (softcap included)."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    labels = ids[0, 1:].clone()
    labels[: len(prompt) - 1] = -100
    return logps_oracle.logits_logps(logits, labels).logps[0]


def oracle_pair_logps(model, features: list[dict], prompt_key: str = "prompt_input_ids"):
    """[B] chosen and [B] rejected float64 log-probs of tokenized features."""
    chosen = torch.stack([oracle_logps(model, f[prompt_key], f["chosen_input_ids"]) for f in features])
    rejected = torch.stack([oracle_logps(model, f[prompt_key], f["rejected_input_ids"]) for f in features])
    return chosen, rejected
