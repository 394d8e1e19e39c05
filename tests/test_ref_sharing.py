"""The reference cache is keyed by the effective reference weights: full fine-tuning and LoRA runs of the same base
share it, and any change of what the reference computes gives a new key."""

from __future__ import annotations

import copy

import torch
from peft import LoraConfig, get_peft_model
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer
from fastpref.trainer.models import REFERENCE_ADAPTER, add_reference_adapter, reference_fingerprint


def _lora(**overrides):
    return LoraConfig(**{"r": 4, "lora_alpha": 8, "target_modules": "all-linear", "task_type": "CAUSAL_LM",
                         **overrides})


def _trainer(tmp_path, model, **kwargs):
    return PreferenceTrainer(model, args=config(tmp_path), train_dataset=demo_rows("train", 6),
                             processing_class=TOKENIZER, **kwargs)


def test_full_and_lora_runs_of_one_base_share_the_reference_cache(tmp_path):
    full = _trainer(tmp_path, tiny_model(seed=3))
    assert full.reference_passes > 0
    lora = _trainer(tmp_path, tiny_model(seed=3), peft_config=_lora())
    assert lora.reference_passes == 0  # every stream found in the cache
    assert lora._reference_fp == full._reference_fp
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(lora.train_dataset[column]), torch.tensor(full.train_dataset[column]),
                                   rtol=0, atol=0)
    again = _trainer(tmp_path, tiny_model(seed=4), peft_config=_lora())  # other base weights
    assert again.reference_passes > 0


def _peft(seed=3, **lora):
    return get_peft_model(tiny_model(seed=seed), _lora(**lora))


def test_the_fingerprint_follows_the_effective_reference():
    base = reference_fingerprint(tiny_model(seed=3), None)
    assert reference_fingerprint(_peft(), None) == base  # adapters off: the base under its own names
    assert reference_fingerprint(tiny_model(seed=5), None) != base
    assert reference_fingerprint(tiny_model(seed=3).to(torch.bfloat16), None) != base
    assert reference_fingerprint(_peft().to(torch.bfloat16), None) != base
    assert reference_fingerprint(tiny_model(), tiny_model(seed=3)) == base  # a given ref_model is the reference


def _trained_adapter(seed=3, scale=0.01, **lora):
    model = _peft(seed, **lora)
    torch.manual_seed(11)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(scale * torch.randn_like(param))
    return model


def test_a_trained_adapter_as_reference_has_its_own_fingerprint():
    base = reference_fingerprint(tiny_model(seed=3), None)
    policy = _trained_adapter()
    add_reference_adapter(policy)  # what the trainer does with a policy that comes with adapters
    with_adapter = reference_fingerprint(policy, None)
    assert with_adapter != base
    other_values = _trained_adapter(scale=0.02)
    add_reference_adapter(other_values)
    assert reference_fingerprint(other_values, None) != with_adapter
    other_alpha = _trained_adapter(lora_alpha=16)  # same tensors, other scaling
    add_reference_adapter(other_alpha)
    assert reference_fingerprint(other_alpha, None) != with_adapter
    trained_further = copy.deepcopy(policy)  # the policy's own adapter moves; the frozen reference copy does not
    with torch.no_grad():
        for name, param in trained_further.named_parameters():
            if "lora_B.default." in name:
                param.add_(1.0)
    assert reference_fingerprint(trained_further, None) == with_adapter
    assert REFERENCE_ADAPTER in policy.peft_config
    as_ref_model = _trained_adapter()  # the same adapter given as ref_model (its active adapter on)
    assert reference_fingerprint(tiny_model(), as_ref_model) != base


def test_the_cache_follows_the_token_ids_not_the_tokenizer_class(tmp_path):
    """The key hashes every row's token ids (what the reference scores), not the tokenizer: the same vocabulary
    reloaded as another class (Qwen2Tokenizer, PreTrainedTokenizerFast) reuses the cache; another encoding (other
    merges) does not."""
    from transformers import PreTrainedTokenizerFast, Qwen2Tokenizer

    from fastpref.data.tokenizer import build_tokenizer

    TOKENIZER.save_pretrained(tmp_path / "tokenizer")
    reloaded = [cls.from_pretrained(tmp_path / "tokenizer") for cls in (Qwen2Tokenizer, PreTrainedTokenizerFast)]
    other = build_tokenizer(vocab_size=300)  # fewer merges: every row encodes to other ids
    assert len({type(t) for t in (TOKENIZER, *reloaded)}) > 1
    first = _trainer(tmp_path, tiny_model(seed=3))
    assert first.reference_passes > 0
    for tokenizer in reloaded:
        again = PreferenceTrainer(tiny_model(seed=3), args=config(tmp_path), train_dataset=demo_rows("train", 6),
                                  processing_class=tokenizer)
        assert again.reference_passes == 0
        assert list(again.train_dataset["ref_chosen_logps"]) == list(first.train_dataset["ref_chosen_logps"])
    changed = PreferenceTrainer(tiny_model(seed=3), args=config(tmp_path), train_dataset=demo_rows("train", 6),
                                processing_class=other)
    assert list(changed.train_dataset["chosen_input_ids"]) != list(first.train_dataset["chosen_input_ids"])
    assert changed.reference_passes > 0
