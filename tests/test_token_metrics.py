"""TRL 1.16's per-token metrics (entropy, logits/chosen|rejected, mean_token_accuracy, num_tokens) from the fused
token statistics of the policy pass, against float64 from the model's full logits."""

from __future__ import annotations

import pytest
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer


def _oracle_rows(model, prompt: list[int], response: list[int]):
    """float64 per-row entropy, mean logit and top-1 flag of a response's rows."""
    ids = torch.tensor([prompt + response])
    logits = model(input_ids=ids, use_cache=False).logits[0, len(prompt) - 1: -1].double()
    log_p = torch.log_softmax(logits, dim=-1)
    entropy = -(log_p.exp() * log_p).sum(-1)
    return entropy, logits.mean(-1), (logits.argmax(-1) == torch.tensor(response)).double()


def _oracle(model, features):
    sums = {"entropy": [0.0, 0], "logits/chosen": [0.0, 0], "logits/rejected": [0.0, 0],
            "mean_token_accuracy": [0.0, 0]}
    for f in features:
        for side in ("chosen", "rejected"):
            entropy, mean_logit, top1 = _oracle_rows(model, list(f["prompt_input_ids"]), list(f[f"{side}_input_ids"]))
            for key, values in (("entropy", entropy), (f"logits/{side}", mean_logit)) + (
                    (("mean_token_accuracy", top1),) if side == "chosen" else ()):
                sums[key][0] += float(values.sum())
                sums[key][1] += values.numel()
    return {key: total / count for key, (total, count) in sums.items()}


def _make_a_common_token_top1(model, features) -> None:
    """Point the head row of the most common chosen token along the mean final hidden state (and shift every
    logit), so top-1 hits happen on some rows and not others and the mean logit is far from 0."""
    tokens = torch.cat([torch.tensor(f["chosen_input_ids"]) for f in features])
    common = int(tokens.bincount().argmax())
    with torch.no_grad():
        hidden = model.model(input_ids=torch.tensor([features[0]["prompt_input_ids"]])).last_hidden_state[0]
        direction = hidden.mean(0)
        model.lm_head.weight[common] = 30 * direction / direction.norm() ** 2
        model.lm_head.weight.add_(0.01 * direction / direction.norm())


@pytest.mark.parametrize("layout", ["padded", "packed", "tree"])
def test_token_metrics_equal_float64_from_full_logits(tmp_path, layout):
    model = tiny_model(seed=2)
    trainer = PreferenceTrainer(model, args=config(tmp_path, stream_layout=layout, ld_alpha=0.5),
                                train_dataset=demo_rows("train", 7), processing_class=TOKENIZER)
    features = [trainer.train_dataset[i] for i in range(7)]
    _make_a_common_token_top1(model, features)
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)
    logged = trainer._metrics["train"].compute()
    trainer.model.eval()
    with torch.no_grad():
        expected = _oracle(trainer.model, features)
    assert 0 < expected["mean_token_accuracy"] < 1 and abs(expected["logits/chosen"]) > 1e-3
    for key, value in expected.items():
        assert logged[key] == pytest.approx(value, rel=1e-5, abs=1e-6), key
    assert int(batch["num_tokens"]) == sum(2 * len(f["prompt_input_ids"]) + len(f["chosen_input_ids"])
                                           + len(f["rejected_input_ids"]) for f in features)


def test_num_tokens_is_the_running_total_of_training_tokens(tmp_path):
    rows = demo_rows("train", 8)
    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, max_steps=2, per_device_train_batch_size=4),
                                train_dataset=rows, processing_class=TOKENIZER)
    trainer.train()
    logs = [entry for entry in trainer.state.log_history if "loss" in entry]
    total = sum(2 * len(f["prompt_input_ids"]) + len(f["chosen_input_ids"]) + len(f["rejected_input_ids"])
                for f in trainer.train_dataset)
    assert logs[-1]["num_tokens"] == total and 0 < logs[0]["num_tokens"] < total
    for key in ("entropy", "logits/chosen", "logits/rejected", "mean_token_accuracy"):
        assert key in logs[-1]


def test_num_tokens_continues_from_the_checkpoint_on_resume(tmp_path):
    """2 steps, a checkpoint, 2 more steps resumed from it: num_tokens at steps 3 and 4 is the uninterrupted run's
    (the count is saved with the checkpoint, as transformers' num_input_tokens_seen is in its trainer state)."""
    rows = demo_rows("train", 16)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = PreferenceTrainer(tiny_model(), args=config(tmp_path, **args), train_dataset=rows,
                             processing_class=TOKENIZER)
    full.train()
    resumed = PreferenceTrainer(tiny_model(), args=config(tmp_path, output_dir=str(tmp_path / "resumed"), **args),
                                train_dataset=rows, processing_class=TOKENIZER)
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-2"))

    def tokens(trainer):
        return {entry["step"]: entry["num_tokens"] for entry in trainer.state.log_history if "loss" in entry}

    expected, got = tokens(full), tokens(resumed)
    assert expected[2] < expected[3] < expected[4]
    assert {step: got[step] for step in (3, 4)} == {step: expected[step] for step in (3, 4)}
