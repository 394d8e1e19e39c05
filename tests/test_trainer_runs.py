"""PreferenceTrainer runs: every loss type, the reference cache across runs, resume, DDP, config names."""

from __future__ import annotations

import logging
import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.losses import LOSS_TYPES
from fastpref.trainer.ref_store import StaleReferenceCacheError

REPO = Path(__file__).resolve().parent.parent


def test_every_loss_type_trains(tmp_path):
    """Each loss type of preference_loss is selectable and gives a finite loss with gradients on the weights."""
    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo", label_smoothing=0.1),
                                train_dataset=demo_rows("train", 8), processing_class=TOKENIZER)
    batch = trainer._prepare_inputs(trainer.data_collator([trainer.train_dataset[i] for i in range(4)]))
    for name in LOSS_TYPES:
        trainer.args.loss_type = [name]
        trainer.args.label_smoothing = 0.1 if name in ("exo_pair",) else 0.0
        trainer.model.zero_grad()
        loss = trainer.compute_loss(trainer.model, batch)
        loss.backward()
        assert torch.isfinite(loss), name
        grad = trainer.model.get_output_embeddings().weight.grad
        assert grad is not None and torch.isfinite(grad).all(), name


@pytest.mark.parametrize("options", [{"ld_alpha": 0.5}, {"use_weighting": True},
                                     {"loss_type": "sr_dpo", "refinement": "naive"},
                                     {"loss_type": "sigmoid", "precompute_ref_log_probs": False}])
def test_options_run_a_step(options, tmp_path):
    """LD-DPO weights, WPO weights, naive refinement and a live reference each run training steps."""
    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, max_steps=2, **options),
                                train_dataset=demo_rows("train", 8), processing_class=TOKENIZER)
    trainer.train()
    losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
    assert len(losses) == 2 and all(torch.isfinite(torch.tensor(losses)))
    assert trainer.reference_passes == (0 if options.get("precompute_ref_log_probs") is False else 1)


def test_lora_sr_dpo_with_a_live_reference(tmp_path):
    """LoRA + Sr-DPO without precompute: the live reference (adapters disabled, its own cached refinement prefix)
    equals the precomputed one, and training steps run."""
    from peft import LoraConfig

    rows = demo_rows("train", 8)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)
    live = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo", max_steps=2,
                                                       precompute_ref_log_probs=False),
                             train_dataset=rows, processing_class=TOKENIZER, peft_config=lora)
    cached = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo"), train_dataset=rows,
                               processing_class=TOKENIZER, peft_config=lora)
    features = [cached.train_dataset[i] for i in range(4)]
    batch = live._prepare_inputs(live.data_collator(features))
    batch = {k: v for k, v in batch.items() if "ref_" not in k}
    for prefix in ("", "aug_"):
        live_chosen, _ = live._reference_logps(batch, prefix)
        want = torch.tensor([f[f"{prefix}ref_chosen_logps"] for f in features])
        torch.testing.assert_close(live_chosen, want, rtol=1e-5, atol=1e-4)
    live.train()
    assert live.reference_passes == 0 and len(_losses(live)) == 2


def test_reference_cache_reused_across_runs(tmp_path, caplog):
    """A second trainer on the same model and data runs no reference pass and gets the same columns; another
    model recomputes (with a warning) or, when asked, raises."""
    rows = demo_rows("train", 12)
    first = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo"), train_dataset=rows,
                              processing_class=TOKENIZER)
    assert first.reference_passes == 2  # plain and refinement-prompt streams
    second = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo"), train_dataset=rows,
                               processing_class=TOKENIZER)
    assert second.reference_passes == 0
    for column in ("ref_chosen_logps", "aug_ref_rejected_logps"):
        assert second.train_dataset[column] == first.train_dataset[column]
    plain = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sigmoid"), train_dataset=rows,
                              processing_class=TOKENIZER)
    assert plain.reference_passes == 0  # DPO reuses the plain stream cached by the Sr-DPO run

    with caplog.at_level(logging.INFO, logger="fastpref"):
        other = PreferenceTrainer(tiny_model(seed=1), args=config(tmp_path), train_dataset=rows,
                                  processing_class=TOKENIZER)
    assert "different fingerprint" in caplog.text
    assert other.reference_passes == 1
    with pytest.raises(StaleReferenceCacheError):
        PreferenceTrainer(tiny_model(seed=2), args=config(tmp_path, ref_cache_on_mismatch="raise"),
                          train_dataset=rows, processing_class=TOKENIZER)


def _losses(trainer) -> dict[int, float]:
    return {entry["step"]: entry["loss"] for entry in trainer.state.log_history if "loss" in entry}


def test_resume_continues_the_same_loss_curve(tmp_path):
    rows = demo_rows("train", 16)
    args = dict(max_steps=6, save_strategy="steps", save_steps=3)
    full = PreferenceTrainer(tiny_model(), args=config(tmp_path, **args), train_dataset=rows,
                             processing_class=TOKENIZER)
    full.train()
    resumed = PreferenceTrainer(tiny_model(), args=config(tmp_path, output_dir=str(tmp_path / "resumed"), **args),
                                train_dataset=rows, processing_class=TOKENIZER)
    assert resumed.reference_passes == 0
    resumed.train(resume_from_checkpoint=str(tmp_path / "out" / "checkpoint-3"))
    expected, got = _losses(full), _losses(resumed)
    assert sorted(got) == [1, 2, 3, 4, 5, 6]  # steps 1-3 come from the checkpoint's state, 4-6 were trained
    for step in (4, 5, 6):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_config_names_and_legacy_names():
    args = PreferenceConfig(output_dir="unused", report_to=[])
    assert (args.beta, args.learning_rate, args.max_length, args.loss_type) == (0.1, 1e-6, 1024, ["sigmoid"])
    assert args.truncation_mode == "keep_start" and args.precompute_ref_log_probs and args.disable_dropout
    assert args.refinement == "prompt" and args.refinement_prompt.startswith("Please generate a response")
    assert PreferenceConfig(output_dir="unused", loss_type="ipo").loss_type == ["ipo"]
    with pytest.warns(FutureWarning, match="rpo_alpha"):
        rpo = PreferenceConfig(output_dir="unused", rpo_alpha=0.5)
    assert rpo.loss_type == ["sigmoid", "sft"] and rpo.loss_weights == [1.0, 0.5]
    with pytest.warns(FutureWarning, match="use_logits_to_keep"):
        PreferenceConfig(output_dir="unused", use_logits_to_keep=True)
    for bad, match in (({"beta": 0.0}, "beta"), ({"loss_weights": [1.0, 2.0]}, "loss_weights"),
                       ({"ld_alpha": 1.5}, "ld_alpha"), ({"refinement": "magic"}, "refinement"),
                       ({"truncation_mode": "middle"}, "truncation_mode")):
        with pytest.raises(ValueError, match=match):
            PreferenceConfig(output_dir="unused", **bad)


def test_unknown_loss_type_and_model_name_are_refused(tmp_path):
    with pytest.raises(ValueError, match="loss_type"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="kto"), train_dataset=demo_rows("train", 4),
                          processing_class=TOKENIZER)
    with pytest.raises(ValueError, match="built-in name"):
        PreferenceTrainer("no-such-model", args=config(tmp_path), processing_class=TOKENIZER)


_DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model
from pathlib import Path
from fastpref import PreferenceTrainer

tmp, batch = Path(sys.argv[1]), int(sys.argv[2])
args = config(tmp, loss_type="sr_dpo", per_device_train_batch_size=batch, max_steps=3,
              ddp_backend="gloo" if "WORLD_SIZE" in os.environ else None)
trainer = PreferenceTrainer(tiny_model(), args=args, train_dataset=demo_rows("train", 8), processing_class=TOKENIZER)
trainer.train()
if trainer.is_world_process_zero():
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    Path(sys.argv[3]).write_text(json.dumps({{"losses": losses, "world": trainer.accelerator.num_processes}}))
trainer.accelerator.wait_for_everyone()
trainer.accelerator.end_training()  # destroys the gloo group
# gloo's threads can abort the interpreter's teardown ("terminate called without an active exception", about one
# run in five here) after all work is done and written; leave without that teardown.
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.slow
def test_ddp_two_cpu_processes_match_single_process(tmp_path):
    """Two gloo processes with 4 pairs each give the single-process loss curve of 8-pair batches (each step sees
    the whole 8-pair set, so the sharding order cannot matter); the reference pass is sharded and gathered."""
    script = tmp_path / "ddp_train.py"
    script.write_text(_DDP_SCRIPT.format(tests=str(REPO / "tests")))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1"}
    ddp_out, single_out = tmp_path / "ddp.json", tmp_path / "single.json"
    ddp_dir, single_dir = tmp_path / "ddp", tmp_path / "single"
    ddp_dir.mkdir()
    single_dir.mkdir()
    subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
                    str(script), str(ddp_dir), "4", str(ddp_out)], check=True, env=env, cwd=tmp_path, timeout=300)
    subprocess.run([sys.executable, str(script), str(single_dir), "8", str(single_out)], check=True, env=env,
                   cwd=tmp_path, timeout=300)
    ddp, single = json.loads(ddp_out.read_text()), json.loads(single_out.read_text())
    assert ddp["world"] == 2 and single["world"] == 1
    assert len(ddp["losses"]) == 3
    assert ddp["losses"] == pytest.approx(single["losses"], rel=1e-4, abs=1e-5)


def test_precompute_then_train_emits_no_warnings_about_columns(tmp_path):
    """The trainer keeps its own columns through Trainer's unused-column filter (no silent drop of scores)."""
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="rdpo", max_steps=1),
                                    train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)
    batch = next(iter(trainer.get_train_dataloader()))
    assert {"score_chosen", "score_rejected", "ref_chosen_logps", "example_index"} <= set(batch)


def test_pairs_that_do_not_fit_max_length_are_dropped_with_a_warning(tmp_path):
    rows = demo_rows("train", 6).to_list()
    rows[2]["prompt"] = "Say " + "fox " * 60 + "and add 1+2."  # the prompt alone exceeds max_length
    from datasets import Dataset

    with pytest.warns(UserWarning, match="dropped 1 of 6 pairs"):
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, max_length=40),
                                    train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)
    assert len(trainer.train_dataset) == 5 and trainer.train_dataset["example_index"] == [0, 1, 2, 3, 4]


def test_metric_accumulator_averages_pairs_across_micro_batches():
    from fastpref.trainer.metrics import MetricAccumulator

    metrics = MetricAccumulator()
    metrics.update({"rewards/margins": torch.tensor([1.0, 2.0, 3.0])})
    metrics.update({"rewards/margins": torch.tensor([-6.0])})
    assert metrics.compute() == {"rewards/margins": 0.0}
    assert metrics.compute() == {}  # reset after each log
    metrics.update({"rewards/accuracies": torch.tensor([1.0, 0.0])})
    doubled = metrics.compute(reduce_sum=lambda t: 2 * t)  # as if a second process saw the same pairs
    assert doubled == {"rewards/accuracies": 0.5}
