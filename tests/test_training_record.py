"""What a training run shows: ``trainer_state.json`` and ``training_curves.png`` at the top of ``output_dir`` (also
with ``save_strategy='no'``), an eval before training (``eval_on_start``) in both, the reference cache's reuse said
in one line, and a short CPU run (Python and CLI, also with activation checkpointing) free of warnings."""

from __future__ import annotations

import json
import logging
import sys
import warnings

import pytest
import torch

from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer, cli

# Third-party warnings fastpref cannot avoid; none of them is raised on the runs below today, each one listed
# here would need its reason.
UNAVOIDABLE: tuple[str, ...] = ()


def _own_warnings(record) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in record
            if not any(text in str(w.message) for text in UNAVOIDABLE)]


def _train(tmp_path, **overrides):
    args = config(tmp_path, max_steps=3, eval_strategy="steps", eval_steps=2, eval_on_start=True, **overrides)
    trainer = PreferenceTrainer(tiny_model(), args=args, train_dataset=demo_rows("train", 12),
                                eval_dataset=demo_rows("test", 6), processing_class=TOKENIZER)
    trainer.train()
    return trainer


def test_python_run_writes_state_and_curves_with_eval_on_start_and_no_warnings(tmp_path):
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        _train(tmp_path)
    assert _own_warnings(record) == []
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    assert [e["step"] for e in history if "eval_loss" in e] == [0, 2, 3]  # before training, every 2 steps, last
    assert [e["step"] for e in history if "loss" in e] == [1, 2, 3]
    assert all("eval_rewards/accuracies" in e for e in history if "eval_loss" in e)
    png = (tmp_path / "out" / "training_curves.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and 20_000 < len(png) < 2_000_000
    assert not list((tmp_path / "out").glob("checkpoint-*"))  # save_strategy='no' kept no checkpoint


def test_activation_checkpointing_run_has_no_warnings(tmp_path):
    """Checkpointing on under its current name (``gradient_checkpointing`` is transformers' deprecated alias, which
    warns): the layers checkpoint during training, and nothing warns."""
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = _train(tmp_path, activation_checkpointing=True)
    assert _own_warnings(record) == []
    assert any(getattr(module, "gradient_checkpointing", False) for module in trainer.model.modules())


def test_reference_cache_reuse_is_one_line_per_dataset(tmp_path, caplog):
    with caplog.at_level(logging.INFO, logger="fastpref"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=demo_rows("train", 8),
                          processing_class=TOKENIZER)
    assert caplog.text.count("reference log-probs (train): computed (8 pairs), cached in") == 1
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="fastpref"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=demo_rows("train", 8),
                          processing_class=TOKENIZER)
    assert caplog.text.count(f"reference log-probs (train): reused from {tmp_path / 'cache'} (8 pairs)") == 1
    assert "computed" not in caplog.text


def test_cli_lora_run_writes_state_and_curves_and_no_warnings(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = demo_rows("train", 6)
    path.write_text("".join(json.dumps({k: row[k] for k in ("prompt", "chosen", "rejected")}) + "\n" for row in rows))
    out = tmp_path / "run"
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        status = cli.main(["train", "--model", "tiny-llama", "--dataset", str(path), "--eval_dataset", str(path),
                           "--eval_on_start", "true", "--use_peft", "true", "--output_dir", str(out), "--max_steps", "2",
                           "--ref_cache_dir", str(tmp_path / "cache"), "--report_to", "none", "--use_cpu", "true",
                           "--save_strategy", "no", "--per_device_train_batch_size", "2", "--disable_tqdm", "true",
                           "--activation_checkpointing", "true"])
    assert status == 0
    assert _own_warnings(record) == []
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert history[0]["step"] == 0 and "eval_loss" in history[0]
    assert (out / "training_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_no_pin_memory_on_a_cpu_only_machine(tmp_path):
    """Without ``use_cpu`` transformers keeps dataloader_pin_memory=True, and torch warns at every DataLoader
    when there is no accelerator to pin for."""
    if torch.accelerator.is_available():
        pytest.skip("an accelerator is present: pinning memory is right")
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, use_cpu=False, max_steps=1),
                                    train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)
        trainer.train()
    assert trainer.args.dataloader_pin_memory is False
    assert _own_warnings(record) == []


def test_without_matplotlib_the_state_is_written_and_the_png_skipped_in_one_line(tmp_path, monkeypatch, caplog):
    from transformers import TrainerState

    from fastpref.trainer.curves import write_training_record

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib raises ImportError
    state = TrainerState(log_history=[{"loss": 0.69, "step": 1}, {"eval_loss": 0.6, "step": 1}])
    with caplog.at_level(logging.INFO, logger="fastpref"):
        write_training_record(state, str(tmp_path / "out"))
    assert json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"] == state.log_history
    assert not (tmp_path / "out" / "training_curves.png").exists()
    assert caplog.text.count("matplotlib is not installed, training_curves.png skipped") == 1
