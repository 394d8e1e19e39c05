"""The TRL drop-in trains like TRL's own DPOTrainer: same tiny model, data, seed and order, same losses and metrics
to float32 noise over 20 steps; DPOConfig fields fastpref cannot honour are refused, never ignored."""

from __future__ import annotations

import copy
import math

import pytest
import torch

trl = pytest.importorskip("trl")
peft = pytest.importorskip("peft")

from fastpref.data import load_preference_dataset  # noqa: E402
from fastpref.data.tiny_models import build_model  # noqa: E402
from fastpref.data.tokenizer import build_tokenizer  # noqa: E402
from fastpref.integrations.trl import DPOTrainer, patch_trl, preference_config_from  # noqa: E402

STEPS = 20
BETA = 0.5
METRICS = ("loss", "rewards/chosen", "rewards/rejected", "rewards/margins", "rewards/accuracies", "logps/chosen",
           "logps/rejected", "entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy", "num_tokens")
# float32 noise: the log-probs (sums of ~30 token log-probs) agree to a relative 1e-5; rewards and margins are
# β·differences of such sums, so their noise scales with β·|logps|, not with their own size.
RELATIVE_NOISE = 3e-5
CASES = {  # name: (loss_type, loss_weights, label_smoothing, precompute_ref_log_probs)
    "sigmoid": (["sigmoid"], None, 0.0, True),
    "ipo": (["ipo"], None, 0.0, False),
    "hinge": (["hinge"], None, 0.0, True),
    "robust": (["robust"], None, 0.2, False),
    "sigmoid+sft": (["sigmoid", "sft"], [1.0, 0.5], 0.0, True),
}


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def pairs():
    data = load_preference_dataset("demo").select(range(48))
    return data.select_columns(["prompt", "chosen", "rejected"])


def _config(out, case: str, seed: int = 0):
    loss_type, loss_weights, eps, precompute = CASES[case]
    return trl.DPOConfig(output_dir=str(out), loss_type=loss_type, loss_weights=loss_weights, label_smoothing=eps,
                         precompute_ref_log_probs=precompute, beta=BETA, learning_rate=1e-3, max_steps=STEPS,
                         per_device_train_batch_size=4, logging_steps=1, seed=seed, bf16=False,
                         activation_checkpointing=False, report_to="none", use_cpu=True, save_strategy="no",
                         disable_tqdm=True, dataloader_num_workers=0, max_length=256)


def _policy(tokenizer, lora: bool):
    torch.manual_seed(0)
    model = build_model("tiny-llama", len(tokenizer))
    model.config.pad_token_id = tokenizer.pad_token_id
    if lora:
        # A pretrained-looking adapter (random A and B): the reference is then the initial adapter, not the base.
        config = peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], lora_dropout=0.0,
                                 init_lora_weights=False)
        model = peft.get_peft_model(model, config)
    return model


def _history(trainer) -> list[dict]:
    trainer.train()
    return [entry for entry in trainer.state.log_history if "loss" in entry]


@pytest.mark.slow
@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("case", list(CASES))
def test_dropin_matches_trl_dpo_trainer(case, lora, tokenizer, pairs, tmp_path):
    model = _policy(tokenizer, lora)
    live_reference = not CASES[case][3] and not lora  # TRL then needs the reference as an object
    reference = _policy(tokenizer, lora=False) if live_reference else None
    theirs = trl.DPOTrainer(copy.deepcopy(model), ref_model=copy.deepcopy(reference),
                            args=_config(tmp_path / "trl", case),
                            train_dataset=pairs, processing_class=tokenizer)
    ours = DPOTrainer(copy.deepcopy(model), ref_model=copy.deepcopy(reference), args=_config(tmp_path / "ours", case),
                      train_dataset=pairs, processing_class=tokenizer, ref_cache_dir=str(tmp_path / "cache"))
    want, got = _history(theirs), _history(ours)
    assert len(want) == len(got) == STEPS
    moved = abs(want[-1]["loss"] - want[0]["loss"])
    assert moved > 1e-3, "the run must train, or equal losses prove nothing"
    for step, (w, g) in enumerate(zip(want, got)):
        scale = BETA * max(abs(w["logps/chosen"]), abs(w["logps/rejected"]))
        for key in METRICS:
            noise = RELATIVE_NOISE * (scale if key.startswith("rewards/") else abs(w[key]))
            if key.startswith("logits/"):  # a mean of O(1) logits that nearly cancel: float32 noise is absolute
                noise = 1e-5
            assert abs(g[key] - w[key]) <= noise + 1e-6, (step, key, g[key], w[key])


def test_dpo_config_fields_are_carried_over_with_the_users_values(tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), beta=0.3, loss_type=["ipo"], max_length=77, ld_alpha=0.4,
                         precompute_ref_log_probs=False, learning_rate=2e-5, seed=11, bf16=False, use_cpu=True,
                         report_to="none", truncation_mode="keep_end")
    config = preference_config_from(args, refine_lambda=0.3, stream_layout="padded")
    assert (config.beta, config.loss_type, config.max_length, config.ld_alpha) == (0.3, ["ipo"], 77, 0.4)
    assert (config.precompute_ref_log_probs, config.learning_rate, config.seed) == (False, 2e-5, 11)
    assert (config.truncation_mode, config.refine_lambda, config.stream_layout) == ("keep_end", 0.3, "padded")


@pytest.mark.parametrize("field, value", [("sync_ref_model", True), ("activation_offloading", True)])
def test_dpo_config_settings_fastpref_lacks_are_refused(field, value, tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none", **{field: value})
    with pytest.raises(ValueError, match=field):
        preference_config_from(args)


def test_unknown_fastpref_fields_are_refused(tmp_path):
    args = trl.DPOConfig(output_dir=str(tmp_path), bf16=False, use_cpu=True, report_to="none")
    with pytest.raises(TypeError, match="refine_lamda"):
        preference_config_from(args, refine_lamda=0.3)


def test_patch_trl_swaps_the_class_and_undoes_it():
    original = trl.DPOTrainer
    undo = patch_trl()
    try:
        import trl.trainer.dpo_trainer as dpo_module

        assert trl.DPOTrainer is DPOTrainer and dpo_module.DPOTrainer is DPOTrainer
    finally:
        undo()
    assert trl.DPOTrainer is original


def test_dropin_runs_fastpref_loss_types_from_keyword_fields(tokenizer, pairs, tmp_path):
    args = _config(tmp_path / "sr", "sigmoid")
    args.max_steps = 2
    trainer = DPOTrainer(_policy(tokenizer, lora=False), args=args, train_dataset=pairs, processing_class=tokenizer,
                         loss_type=["sr_dpo"], refine_lambda=0.3, ref_cache_dir=str(tmp_path / "cache"))
    history = _history(trainer)
    assert trainer.args.loss_type == ["sr_dpo"] and len(history) == 2
    assert all(math.isfinite(entry["loss"]) for entry in history)
