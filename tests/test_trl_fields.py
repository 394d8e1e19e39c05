"""TRL 1.16 DPOConfig fields with TRL's meaning: pad_token, trust_remote_code, pad_to_multiple_of."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer
from fastpref.trainer import models


def _trainer(tmp_path, tokenizer=TOKENIZER, model=None, **overrides):
    return PreferenceTrainer(tiny_model() if model is None else model, args=config(tmp_path, **overrides),
                             train_dataset=demo_rows("train", 6), processing_class=tokenizer)


def test_pad_to_multiple_of_pads_the_padded_layout_and_changes_no_value(tmp_path):
    plain = _trainer(tmp_path / "a", stream_layout="padded")
    padded = _trainer(tmp_path / "b", stream_layout="padded", pad_to_multiple_of=16)
    assert plain.args.pad_to_multiple_of is None  # "auto" off Neuron
    features = [plain.train_dataset[i] for i in range(5)]
    width = plain.data_collator(features)["input_ids"].shape[1]
    batch = padded.data_collator(features)
    assert batch["input_ids"].shape[1] == -(-width // 16) * 16 and batch["input_ids"].shape[1] % 16 == 0
    assert width % 16 != 0  # the check above can fail
    for column in ("ref_chosen_logps", "ref_rejected_logps"):
        torch.testing.assert_close(torch.tensor(padded.train_dataset[column]),
                                   torch.tensor(plain.train_dataset[column]), rtol=1e-6, atol=1e-6)


def test_pad_to_multiple_of_refuses_a_padding_free_layout_and_bad_values(tmp_path):
    with pytest.raises(ValueError, match="pad_to_multiple_of=8 pads the padded layout"):
        _trainer(tmp_path, stream_layout="packed", pad_to_multiple_of=8)
    for bad in (0, -4, "eight"):
        with pytest.raises(ValueError, match="pad_to_multiple_of must be"):
            config(tmp_path, pad_to_multiple_of=bad)
    assert config(tmp_path, pad_to_multiple_of="none").pad_to_multiple_of is None
    assert config(tmp_path, pad_to_multiple_of="32").pad_to_multiple_of == 32


def test_pad_token_picks_the_padding_id_and_falls_back_to_eos(tmp_path):
    with pytest.warns(FutureWarning, match="pad_token is deprecated"):
        trainer = _trainer(tmp_path / "a", pad_token="<|assistant|>", stream_layout="padded")
    pad_id = TOKENIZER.convert_tokens_to_ids("<|assistant|>")
    assert trainer.data_collator.pad_token_id == pad_id != TOKENIZER.pad_token_id
    features = [trainer.train_dataset[i] for i in range(4)]
    batch = trainer.data_collator(features)
    assert (batch["input_ids"][batch["attention_mask"] == 0] == pad_id).all()
    no_pad = copy.deepcopy(TOKENIZER)
    no_pad.pad_token = None
    assert _trainer(tmp_path / "b", tokenizer=no_pad).data_collator.pad_token_id == TOKENIZER.eos_token_id
    with pytest.warns(FutureWarning), pytest.raises(ValueError, match="pad_token '<nope>' is not in the tokenizer"):
        _trainer(tmp_path / "c", pad_token="<nope>")


def test_trust_remote_code_reaches_model_and_tokenizer_loading(tmp_path, monkeypatch):
    directory = tmp_path / "saved"
    tiny_model().save_pretrained(directory)
    TOKENIZER.save_pretrained(directory)
    seen = []
    for owner in (models.AutoModelForCausalLM, models.AutoTokenizer):
        load = owner.from_pretrained

        def spy(*args, _load=load, _owner=owner, **kwargs):
            seen.append((_owner.__name__, kwargs.get("trust_remote_code")))
            return _load(*args, **kwargs)

        monkeypatch.setattr(owner, "from_pretrained", spy)
    PreferenceTrainer(str(directory), args=config(tmp_path, trust_remote_code=True),
                      train_dataset=demo_rows("train", 4))
    assert sorted(seen) == [("AutoModelForCausalLM", True), ("AutoTokenizer", True)]
    seen.clear()
    PreferenceTrainer(str(directory), args=config(tmp_path, model_init_kwargs={"trust_remote_code": False},
                                                  trust_remote_code=True),
                      train_dataset=demo_rows("train", 4))
    assert ("AutoModelForCausalLM", False) in seen  # model_init_kwargs wins, as in TRL
