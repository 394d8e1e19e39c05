"""The trainer's listwise path: ranked rows → K padded rows per prompt → fastpref.listwise_loss, against float64 from
full logits; the reference cache; config validation; the CLI on a listwise JSONL."""

from __future__ import annotations

import json

import pytest
import torch
from datasets import Dataset
from trainer_helpers import TOKENIZER, config, oracle_logps, tiny_model

from fastpref import PreferenceConfig, PreferenceTrainer, cli
from fastpref.losses.listwise_oracle import listwise_loss_reference

ROWS = [{"prompt": f"Question {i}:", "completions": [f" yes {i}", " no", f" maybe so {i}", " x y"][: 2 + i % 3],
         "scores": [float(i % 3), 1.0, 0.5, -1.0][: 2 + i % 3]} for i in range(6)]


def _trainer(tmp_path, loss_type="plackett_luce", rows=ROWS, **overrides):
    return PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type=loss_type, **overrides),
                             train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)


@pytest.mark.parametrize("loss_type, layout", [("plackett_luce", "padded"), ("lambda_rank", "padded"),
                                               ("plackett_luce", "tree")])
def test_loss_matches_float64_from_full_logits(tmp_path, loss_type, layout):
    trainer = _trainer(tmp_path, loss_type, beta=0.5, stream_layout=layout)
    assert trainer.stream_layout == layout
    reference = tiny_model()  # the initial policy is the reference
    with torch.no_grad():  # move the policy off the reference so the rewards are not all zero
        for parameter in trainer.model.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    features = [trainer.train_dataset[i] for i in range(len(ROWS))]
    batch = trainer._prepare_inputs(trainer.data_collator(features))
    loss = trainer.compute_loss(trainer.model, batch)
    k_max = max(len(r["completions"]) for r in ROWS)
    policy = torch.zeros(len(ROWS), k_max, dtype=torch.float64)
    ref = torch.zeros_like(policy)
    scores = torch.zeros_like(policy)
    mask = torch.zeros(len(ROWS), k_max, dtype=torch.bool)
    for b, feature in enumerate(features):
        for k, response in enumerate(feature["completions_input_ids"]):
            with torch.no_grad():
                policy[b, k] = oracle_logps(trainer.model.double(), feature["prompt_input_ids"], response)
                ref[b, k] = oracle_logps(reference.double(), feature["prompt_input_ids"], response)
            trainer.model.float()
            scores[b, k], mask[b, k] = ROWS[b]["scores"][k], True
    expected, _ = listwise_loss_reference(policy, ref, scores, loss_type, 0.5, mask)
    torch.testing.assert_close(loss.double(), expected, rtol=2e-4, atol=2e-5)
    torch.testing.assert_close(batch["ref_completions_logps"].double(), ref.float().double(), rtol=1e-4, atol=1e-4)


def test_reference_cache_reused_and_keyed_by_the_completions(tmp_path):
    assert _trainer(tmp_path).reference_passes == 1
    assert _trainer(tmp_path, "lambda_rank").reference_passes == 0  # same tokens, same reference: reused
    changed = [dict(ROWS[0], completions=[" other", " no"]), *ROWS[1:]]
    assert _trainer(tmp_path, rows=changed).reference_passes == 1


def test_training_runs_and_lowers_the_loss(tmp_path):
    trainer = _trainer(tmp_path, "lambda_rank", max_steps=6, per_device_train_batch_size=6, learning_rate=5e-3)
    trainer.train()
    losses = [log["loss"] for log in trainer.state.log_history if "loss" in log]
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("overrides, match", [
    (dict(loss_type=["plackett_luce", "sigmoid"]), "cannot be combined"),
    (dict(loss_type="lambda_rank", stream_layout="packed"), "padded or the tree layout"),
    (dict(loss_type="lambda_rank", ld_alpha=0.5), "ld_alpha"),
    (dict(loss_type="plackett_luce", use_weighting=True), "use_weighting"),
])
def test_config_refuses_what_the_listwise_path_lacks(tmp_path, overrides, match):
    with pytest.raises(ValueError, match=match):
        config(tmp_path, **overrides)


def test_data_and_loss_type_must_agree(tmp_path):
    with pytest.raises(ValueError, match="listwise type"):
        _trainer(tmp_path, "sigmoid")
    pairs = [{"prompt": "Q:", "chosen": " a", "rejected": " b"}]
    with pytest.raises(ValueError, match="pairwise one"):
        _trainer(tmp_path, "plackett_luce", rows=pairs)


def test_bad_ranked_row_is_named(tmp_path):
    with pytest.raises(ValueError, match="train row 1: a ranked row needs K >= 2"):
        _trainer(tmp_path, rows=[ROWS[0], dict(ROWS[1], scores=[1.0])])


def test_long_ranked_rows_follow_the_pairs_truncation(tmp_path):
    """keep_end: every completion cut as in a pair with the longest one, one prompt per row (this raised: the
    prompt was cut per completion). keep_start with a prompt that fills max_length: the row is dropped with one
    counted warning, as a pair is; every row so: the 'no … left' error."""
    trainer = _trainer(tmp_path, max_length=7, truncation_mode="keep_end")
    assert len(trainer.train_dataset) == len(ROWS)
    for row in trainer.train_dataset:
        assert len(row["prompt_input_ids"]) + max(len(y) for y in row["completions_input_ids"]) <= 7
    long = [dict(ROWS[0], prompt="a long question " * 40), *ROWS[1:]]
    with pytest.warns(UserWarning, match=r"dropped 1 of 6 ranked rows that do not fit max_length=24 "
                                         r"\(truncation_mode='keep_start'\); first: empty completions\[0\]"):
        trainer = _trainer(tmp_path, rows=long, max_length=24, truncation_mode="keep_start")
    assert trainer.train_dataset["scores"] == [row["scores"] for row in ROWS[1:]]
    assert trainer.train_dataset["example_index"] == list(range(5))
    with pytest.raises(ValueError, match=r"no ranked rows left: all 1 ranked rows are longer than max_length=24"):
        _trainer(tmp_path, rows=long[:1], max_length=24, truncation_mode="keep_start")


def test_cli_train_on_listwise_jsonl(tmp_path, capsys):
    path = tmp_path / "ranked.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in ROWS))
    status = cli.main(["train", "--model", "tiny-llama", "--dataset", str(path), "--output_dir", str(tmp_path / "run"),
                       "--max_steps", "2", "--loss_type", "plackett_luce", "--ref_cache_dir", str(tmp_path / "c"),
                       "--report_to", "none", "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true",
                       "--per_device_train_batch_size", "3"])
    assert status == 0 and "saved to" in capsys.readouterr().out
