"""PreferenceTrainer: its loss against float64 oracles, the peft reference, the augmented pass, learning."""

from __future__ import annotations

import copy

import pytest
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, oracle_pair_logps, tiny_model

from fastpref import PreferenceTrainer, preference_loss
from fastpref.model.head import sequence_logps


def _batch(trainer, rows: int = 5):
    features = [trainer.train_dataset[i] for i in range(rows)]
    return features, trainer._prepare_inputs(trainer.data_collator(features))


@pytest.mark.parametrize("model_name", ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma2", "tiny-gpt2"])
@pytest.mark.parametrize("padding_free", [True, False])
def test_stream_logps_match_float64_oracle(model_name, padding_free):
    """The fused head inside the model's forward gives the float64 full-logits log-probs (Gemma-2's softcap and
    GPT-2's tied head included), for the packed and the padded layout, with exact gradients."""
    from fastpref.data import tokenize_pair
    from fastpref.model.head import stream_logps
    from fastpref.trainer.collator import StepCollator, rows_from_batch

    model = tiny_model(model_name)
    features = [tokenize_pair(row, TOKENIZER) for row in demo_rows("train", 5)]
    batch = StepCollator(TOKENIZER.pad_token_id, padding_free=padding_free)(features)
    out = stream_logps(model, batch["input_ids"], rows_from_batch(batch), position_ids=batch.get("position_ids"),
                       attention_mask=batch.get("attention_mask"))
    chosen, rejected = oracle_pair_logps(model, features)
    expected = torch.cat([chosen, rejected])
    torch.testing.assert_close(out.logps.double(), expected, rtol=1e-5, atol=1e-4)
    # Non-uniform upstream gradient: parameters' gradients equal the oracle's.
    upstream = torch.linspace(-1.0, 2.0, expected.numel(), dtype=torch.float64)
    params = [p for p in model.parameters() if p.requires_grad]
    fused = torch.autograd.grad((out.logps.double() * upstream).sum(), params, allow_unused=True)
    truth = torch.autograd.grad((expected * upstream).sum(), params, allow_unused=True)
    for got, want in zip(fused, truth, strict=True):
        if want is not None:
            torch.testing.assert_close(got.double(), want.double(), rtol=1e-4, atol=1e-5)


def test_sequence_logps_contract_signature():
    """fastpref.model.head.sequence_logps on the collator's packed layout equals the oracle."""
    from fastpref.trainer.packing import PreferenceCollator
    from fastpref.data import tokenize_pair

    model = tiny_model()
    features = [tokenize_pair(row, TOKENIZER) for row in demo_rows("train", 3)]
    batch = PreferenceCollator()(features)
    out = sequence_logps(model, batch["input_ids"], batch["position_ids"], batch["labels"], batch["cu_seqlens"])
    chosen, rejected = oracle_pair_logps(model, features)
    torch.testing.assert_close(out.logps.double(), torch.cat([chosen, rejected]), rtol=1e-5, atol=1e-4)
    lengths = [len(f["chosen_input_ids"]) for f in features] + [len(f["rejected_input_ids"]) for f in features]
    assert out.counts.tolist() == lengths


@pytest.mark.parametrize("loss_type", ["sigmoid", "sr_dpo", ["ipo", "sft"], "rdpo", "sr_ipo-whole"])
def test_trainer_loss_equals_preference_loss_on_oracle_logps(loss_type, tmp_path):
    """compute_loss = preference_loss(float64 oracle log-probs of policy, reference and the refinement-prompt
    stream), for a policy that has moved away from its reference."""
    initial = tiny_model()
    policy = copy.deepcopy(initial)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.05 * torch.randn_like(p))
    whole = loss_type == "sr_ipo-whole"  # the augmented stream without the cached refinement prefix
    args = config(tmp_path, loss_type="sr_ipo" if whole else loss_type, cache_refinement_prefix=not whole,
                  loss_weights=[1.0, 0.3] if isinstance(loss_type, list) else None)
    trainer = PreferenceTrainer(policy, ref_model=initial, args=args, train_dataset=demo_rows("train", 8),
                                processing_class=TOKENIZER)
    features, batch = _batch(trainer)
    loss = trainer.compute_loss(trainer.model, batch)

    chosen, rejected = oracle_pair_logps(policy, features)
    ref_chosen, ref_rejected = oracle_pair_logps(initial, features)
    counts = {"chosen_counts": torch.tensor([len(f["chosen_input_ids"]) for f in features]),
              "rejected_counts": torch.tensor([len(f["rejected_input_ids"]) for f in features])}
    extra = {}
    if args.uses_augmented_stream:
        aug = oracle_pair_logps(policy, features, "aug_prompt_input_ids")
        aug_ref = oracle_pair_logps(initial, features, "aug_prompt_input_ids")
        extra = dict(aug_chosen_logps=aug[0], aug_rejected_logps=aug[1], aug_ref_chosen_logps=aug_ref[0],
                     aug_ref_rejected_logps=aug_ref[1])
    if "rdpo" in args.loss_type:
        from fastpref.losses import bt_tau

        scores = torch.tensor([[f["score_chosen"], f["score_rejected"]] for f in features], dtype=torch.float64)
        extra["tau"] = bt_tau(scores[:, 0], scores[:, 1])
    expected = preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type=args.loss_type,
                               loss_weights=args.loss_weights, beta=args.beta, backend="torch", **counts, **extra)
    torch.testing.assert_close(loss.double(), expected.loss.double(), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("cache_prefix", [True, False])
def test_augmented_pass_keeps_no_activations(cache_prefix, tmp_path):
    """Sr-DPO runs the model with grad for the plain stream only; the augmented stream (and the refinement
    prefix's keys/values, computed once per optimizer step) run without grad."""
    args = config(tmp_path, loss_type="sr_dpo", cache_refinement_prefix=cache_prefix)
    trainer = PreferenceTrainer(tiny_model(), args=args, train_dataset=demo_rows("train", 8),
                                processing_class=TOKENIZER)
    assert (trainer._aug_prefix is not None) == cache_prefix
    _, batch = _batch(trainer)
    grad_modes = []
    hook = trainer.model.register_forward_pre_hook(lambda module, args: grad_modes.append(torch.is_grad_enabled()))
    try:
        trainer.model.train()
        for _ in range(2):  # the second micro-batch of the same step reuses the prefix
            trainer.compute_loss(trainer.model, batch)
    finally:
        hook.remove()
    per_step = [True, False, False] if cache_prefix else [True, False]
    assert grad_modes == per_step + [True, False]


def test_lora_reference_is_base_model_with_adapters_disabled(tmp_path):
    """peft LoRA: the cached reference log-probs, and the live ones, are the base model's (no second copy)."""
    from peft import LoraConfig

    base = tiny_model()
    pristine = copy.deepcopy(base)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)  # random B: the adapted model differs from the base
    trainer = PreferenceTrainer(base, args=config(tmp_path), train_dataset=demo_rows("train", 8),
                                processing_class=TOKENIZER, peft_config=lora)
    assert trainer.ref_model is None
    features = [trainer.train_dataset[i] for i in range(4)]
    chosen, rejected = oracle_pair_logps(pristine, features)
    cached = torch.tensor([f["ref_chosen_logps"] for f in features], dtype=torch.float64)
    torch.testing.assert_close(cached, chosen, rtol=1e-5, atol=1e-4)

    _, batch = _batch(trainer, 4)
    batch = {k: v for k, v in batch.items() if "ref_" not in k}
    live_chosen, live_rejected = trainer._reference_logps(batch, "")
    torch.testing.assert_close(live_rejected.double(), rejected, rtol=1e-5, atol=1e-4)
    adapted = trainer._stream_logps(trainer.model, batch, "").logps[:4]
    assert (adapted.double() - chosen).abs().max() > 1e-3  # the adapters do change the policy


def test_dataset_reference_columns_are_used_as_given(tmp_path):
    rows = demo_rows("train", 8)
    rows = rows.add_column("ref_chosen_logps", [-1.0] * 8).add_column("ref_rejected_logps", [-2.0] * 8)
    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=rows, processing_class=TOKENIZER)
    assert trainer.reference_passes == 0
    _, batch = _batch(trainer, 2)
    assert batch["ref_chosen_logps"].tolist() == [-1.0, -1.0]


# Held-out accuracy threshold: 256 held-out pairs; under chance (p = 0.5) the count of correctly ranked pairs is
# Binomial(256, 0.5), sd 8, so accuracy >= 0.65 (>= 167 pairs) is 4.8 sd above the mean: P < 1e-6.
HELD_OUT = 256
ACCURACY_THRESHOLD = 0.65


@pytest.mark.slow
@pytest.mark.parametrize("loss_type", ["sigmoid", "sr_dpo"])
def test_training_raises_held_out_accuracy(loss_type, tmp_path):
    args = config(tmp_path, loss_type=loss_type, max_steps=60, per_device_train_batch_size=8,
                  per_device_eval_batch_size=32, logging_steps=20)
    trainer = PreferenceTrainer(tiny_model(), args=args, train_dataset=demo_rows("train", 480),
                                eval_dataset=demo_rows("test", HELD_OUT), processing_class=TOKENIZER)
    before = trainer.evaluate()
    trainer.train()
    after = trainer.evaluate()
    assert before["eval_rewards/accuracies"] == 0.0  # policy = reference: every reward is 0
    assert after["eval_rewards/accuracies"] >= ACCURACY_THRESHOLD
    assert after["eval_rewards/margins"] > 0


def test_vocabulary_smaller_than_the_tokenizer_is_refused(tmp_path):
    model = tiny_model()
    model.resize_token_embeddings(len(TOKENIZER) - 3)
    with pytest.raises(ValueError, match="resize_token_embeddings"):
        PreferenceTrainer(model, args=config(tmp_path), train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)


def test_training_step_reads_no_label_values(tmp_path, monkeypatch):
    """The trainer's own token ids are checked once at construction; its log-prob calls then skip the per-call
    value checks (a host sync each on CUDA)."""
    import fastpref.logps.inputs as logps_inputs

    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo", max_steps=1),
                                train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)
    calls = []
    original = logps_inputs._check_values

    def spy(*args, **kwargs):
        calls.append(logps_inputs.value_checks_enabled())
        return original(*args, **kwargs)

    monkeypatch.setattr(logps_inputs, "_check_values", spy)
    trainer.train()
    assert calls and not any(calls)
    assert logps_inputs.value_checks_enabled()
