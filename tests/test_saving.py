"""What ``train`` leaves in ``output_dir`` reloads as the trained model: a LoRA run on a built-in model (its base
saved beside the adapter, loaded offline) and a saved model with fastpref's tokenizer."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from peft import LoraConfig
from trainer_helpers import TOKENIZER, config, demo_rows

from fastpref import PreferenceTrainer

LOAD_OFFLINE = """
import sys, torch
from peft import AutoPeftModelForCausalLM
model = AutoPeftModelForCausalLM.from_pretrained(sys.argv[1])
ids = torch.tensor([[0, 5, 77, 300, 12, 9, 401]])
torch.save(model(input_ids=ids, use_cache=False).logits, sys.argv[2])
"""


def _lora_trainer(tmp_path, **overrides):
    lora = LoraConfig(r=4, lora_alpha=8, target_modules="all-linear", task_type="CAUSAL_LM")
    return PreferenceTrainer("tiny-llama", args=config(tmp_path, max_steps=2, **overrides),
                             train_dataset=demo_rows("train", 8), processing_class=TOKENIZER, peft_config=lora)


def test_lora_on_a_builtin_model_reloads_offline_as_the_trained_model(tmp_path):
    trainer = _lora_trainer(tmp_path, save_strategy="steps", save_steps=1)
    trainer.train()
    out = tmp_path / "out"
    trainer.save_model(str(out))
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == str((out / "base_model").resolve())
    for checkpoint in ("checkpoint-1", "checkpoint-2"):  # the checkpoints name the same base
        saved = json.loads((out / checkpoint / "adapter_config.json").read_text())
        assert saved["base_model_name_or_path"] == adapter_config["base_model_name_or_path"]
    base_files = set(os.listdir(out / "base_model"))
    assert {"config.json", "model.safetensors"} <= base_files
    logits_path = tmp_path / "logits.pt"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, "-c", LOAD_OFFLINE, str(out), str(logits_path)], env=env, check=True,
                   timeout=300)
    ids = torch.tensor([[0, 5, 77, 300, 12, 9, 401]])
    policy = trainer.model.eval()
    with torch.no_grad():
        trained = policy(input_ids=ids, use_cache=False).logits
        with policy.disable_adapter():
            base = policy(input_ids=ids, use_cache=False).logits
    assert not torch.allclose(trained, base, atol=1e-4)  # training moved the adapters: the check below can fail
    torch.testing.assert_close(torch.load(logits_path), trained, rtol=1e-5, atol=1e-5)


TEXTS = ["What is 12+345?", "Héllo  wörld\n\n  x1234 ﬁ  e\u0301", "it's   done\t!!", "", " 7 ", "<|user|>hi<|end|>"]


def test_a_saved_qwen2_run_reloads_its_tokenizer_and_trains_again(tmp_path):
    from transformers import AutoTokenizer

    from fastpref.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    first = PreferenceTrainer("tiny-qwen2", args=config(tmp_path, max_steps=1), train_dataset=demo_rows("train", 4),
                              processing_class=tokenizer)
    first.train()
    out = tmp_path / "out"
    first.save_model(str(out))
    reloaded = AutoTokenizer.from_pretrained(out)  # beside a qwen2 config.json: transformers builds Qwen2Tokenizer
    assert len(reloaded) == len(tokenizer) == first.model.get_output_embeddings().weight.shape[0]
    assert reloaded.get_vocab() == tokenizer.get_vocab()
    for text in TEXTS:
        assert reloaded(text).input_ids == tokenizer(text).input_ids, text
    chat = [{"role": "user", "content": "Add 2 and 3."}, {"role": "assistant", "content": "5"}]
    assert reloaded.apply_chat_template(chat) == tokenizer.apply_chat_template(chat)
    assert (reloaded.bos_token, reloaded.eos_token, reloaded.pad_token) == (tokenizer.bos_token, tokenizer.eos_token,
                                                                           tokenizer.pad_token)
    again = PreferenceTrainer(str(out), args=config(tmp_path / "again", max_steps=1),
                              train_dataset=demo_rows("train", 4))
    assert again.processing_class.get_vocab() == tokenizer.get_vocab()
    again.train()
    assert again.state.global_step == 1
