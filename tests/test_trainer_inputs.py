"""PreferenceTrainer: nothing silently ignored or stale — dataset columns used or refused, the reference cache keyed
by the token weights actually used, a user's reference model left as given, LoRA seeded by ``args.seed``, the
refinement prefix fixed by the tokenizer and p (not by the data), early errors for an unwritable cache and torn
checkpoints skipped on resume."""

from __future__ import annotations

import logging
import os

import pytest
from datasets import Dataset
import torch
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer
from fastpref.data.tiny_models import build_model
from fastpref.trainer.collator import StepCollator
from fastpref.trainer.columns import UnknownColumnError


def _batch(trainer, rows: int = 4):
    features = [trainer.train_dataset[i] for i in range(rows)]
    return trainer._prepare_inputs(trainer.data_collator(features))


# ---- columns (issue 10 item 12) -------------------------------------------------------------------------------

def test_weight_column_scales_each_pair(tmp_path):
    """A ``weight`` column is the per-pair loss weight: the loss is mean_i(w_i · ℓ_i) of the unweighted ℓ_i."""
    rows = demo_rows("train", 8)
    weights = [0.25, 2.0, 0.0, 1.5, 3.0, 0.5, 1.0, 0.75]
    plain = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=rows, processing_class=TOKENIZER)
    weighted = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=rows.add_column("weight", weights),
                                 processing_class=TOKENIZER)
    # Move the policy off its reference so that the per-pair losses differ.
    for trainer in (plain, weighted):
        with torch.no_grad():
            torch.manual_seed(3)
            for p in trainer.model.parameters():
                p.add_(0.05 * torch.randn_like(p))
    _, out = plain.compute_loss(plain.model, _batch(plain), return_outputs=True)
    loss = weighted.compute_loss(weighted.model, _batch(weighted))
    expected = (torch.tensor(weights[:4]) * out.losses.detach()).mean()
    assert not torch.allclose(expected, out.loss.detach())  # the weights do change the loss here
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("column,hint", [("weights", "'weight' column"), ("source", "remove_columns"),
                                         ("messages", "SFT")])
def test_unknown_columns_are_refused_by_name(tmp_path, column, hint):
    rows = demo_rows("train", 4)
    rows = rows.add_column(column, [1.0] * 4 if column == "weights" else ["x"] * 4)
    with pytest.raises(UnknownColumnError, match=f"'{column}'.*{hint}"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=rows, processing_class=TOKENIZER)
    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=demo_rows("train", 4),
                                processing_class=TOKENIZER)
    with pytest.raises(UnknownColumnError, match=f"eval dataset .*'{column}'"):
        trainer.evaluate(eval_dataset=rows)


# ---- the reference cache's fingerprint (item 13) ---------------------------------------------------------------

class _ScaledWeights:
    """A custom collator: fastpref's, with every kept row's token weight set to ``scale``."""

    def __init__(self, scale: float):
        self.inner = StepCollator(TOKENIZER.pad_token_id, layout="padded")
        self.scale = scale

    def __call__(self, features):
        batch = self.inner(features)
        batch["kept_token_weights"] = torch.full(batch["kept_labels"].shape, self.scale)
        return batch


def test_custom_collator_token_weights_key_the_reference_cache(tmp_path, caplog):
    """A second run whose collator supplies other token weights recomputes the reference log-probs (the cache is
    keyed by the weights used), and gets that collator's values; the same weights hit the cache."""
    rows = demo_rows("train", 8)

    def run(scale, cache):
        return PreferenceTrainer(tiny_model(), args=config(tmp_path, ref_cache_dir=str(tmp_path / cache),
                                                           padding_free=False),
                                 data_collator=_ScaledWeights(scale), train_dataset=rows, processing_class=TOKENIZER)

    first, again = run(1.0, "shared"), run(1.0, "shared")
    assert (first.reference_passes, again.reference_passes) == (1, 0)
    with caplog.at_level(logging.INFO, logger="fastpref"):
        second = run(0.5, "shared")
    assert "changed parts: token_weights" in caplog.text
    assert second.reference_passes == 1
    fresh = run(0.5, "fresh")
    torch.testing.assert_close(torch.tensor(second.train_dataset["ref_chosen_logps"]),
                               torch.tensor(fresh.train_dataset["ref_chosen_logps"]))
    torch.testing.assert_close(torch.tensor(second.train_dataset["ref_chosen_logps"]),
                               0.5 * torch.tensor(first.train_dataset["ref_chosen_logps"]), rtol=1e-5, atol=1e-5)


# ---- a user's reference model (item 14) -----------------------------------------------------------------------

def _dropout_model():
    torch.manual_seed(0)
    return build_model("tiny-gpt2", vocab_size=len(TOKENIZER), resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1)


@pytest.mark.parametrize("precompute", [True, False])
def test_ref_model_is_left_as_given(tmp_path, precompute):
    """The reference is not frozen, switched to eval or stripped of dropout in place: after the trainer used it, it
    can be the next stage's policy."""
    reference = _dropout_model().train()
    dropout = [m.p for m in reference.modules() if isinstance(m, torch.nn.Dropout)]
    trainer = PreferenceTrainer(_dropout_model(), ref_model=reference,
                                args=config(tmp_path, precompute_ref_log_probs=precompute),
                                train_dataset=demo_rows("train", 8), processing_class=TOKENIZER)
    trainer.compute_loss(trainer.model, _batch(trainer))
    assert all(p.requires_grad for p in reference.parameters())
    assert reference.training and all(m.training for m in reference.modules())
    assert [m.p for m in reference.modules() if isinstance(m, torch.nn.Dropout)] == dropout
    assert trainer.reference_passes == (1 if precompute else 0)

    before = reference.get_output_embeddings().weight.detach().clone()
    stage_two = PreferenceTrainer(reference, args=config(tmp_path / "two", max_steps=1),
                                  train_dataset=demo_rows("train", 8), processing_class=TOKENIZER)
    stage_two.train()
    assert stage_two.state.global_step == 1
    assert not torch.equal(reference.get_output_embeddings().weight.detach(), before)


# ---- LoRA seeding (item 15) -----------------------------------------------------------------------------------

def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")


def _adapter_weights(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in model.named_parameters() if "lora_" in name}


def test_lora_initialisation_follows_args_seed(tmp_path):
    """Adapters are initialised after ``set_seed(args.seed)``: the same seed gives the same adapters whatever the
    global RNG held before, and the very adapters TRL 1.16's DPOTrainer builds; another seed gives others."""
    trl = pytest.importorskip("trl")

    def adapters(seed, noise):
        model = tiny_model()
        torch.manual_seed(noise)  # whatever the caller's RNG holds
        trainer = PreferenceTrainer(model, args=config(tmp_path, seed=seed), train_dataset=demo_rows("train", 4),
                                    processing_class=TOKENIZER, peft_config=_lora())
        return _adapter_weights(trainer.model)

    first, second, other = adapters(0, noise=1), adapters(0, noise=2), adapters(1, noise=1)
    assert first.keys() == second.keys() and first
    assert all(torch.equal(first[k], second[k]) for k in first)
    assert not all(torch.equal(first[k], other[k]) for k in first)
    model = tiny_model()
    torch.manual_seed(3)
    reference = trl.DPOTrainer(model=model, args=trl.DPOConfig(output_dir=str(tmp_path / "trl"), seed=0, report_to=[],
                                                               use_cpu=True, max_length=64),
                               train_dataset=demo_rows("train", 4), processing_class=TOKENIZER, peft_config=_lora())
    theirs = _adapter_weights(reference.model)
    assert theirs.keys() == first.keys() and all(torch.equal(first[k], theirs[k]) for k in first)


# ---- the refinement prefix (item 16) --------------------------------------------------------------------------

def test_refinement_prefix_is_p_not_the_datas_common_start(tmp_path):
    """Training prompts that all start with "Question: " do not extend the cached prefix: it is the tokenizer's
    bos + p, so evaluate(eval_dataset=new) on other prompts runs, with the loss of the uncached augmented pass."""
    from datasets import Dataset

    from fastpref.data.tokenization import refinement_prefix_ids

    rows = [{**row, "prompt": "Question: " + row["prompt"]} for row in demo_rows("train", 8).to_list()]
    new = demo_rows("test", 6)

    def trainer(cache_prefix):
        return PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo",
                                                           cache_refinement_prefix=cache_prefix),
                                 train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)

    cached, whole = trainer(True), trainer(False)
    assert cached._aug_prefix == tuple(refinement_prefix_ids(TOKENIZER, cached.args.refinement_prompt))
    got, want = cached.evaluate(eval_dataset=new), whole.evaluate(eval_dataset=new)
    assert got["eval_loss"] == pytest.approx(want["eval_loss"], rel=1e-5, abs=1e-6)
    assert got["eval_refine/delta_mean"] == pytest.approx(want["eval_refine/delta_mean"], rel=1e-4, abs=1e-5)


def test_eval_data_that_moves_p_is_refused_with_the_cause(tmp_path):
    from datasets import Dataset

    trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, loss_type="sr_dpo"),
                                train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)
    chat = [{"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": row["prompt"]}],
             "chosen": [{"role": "assistant", "content": row["chosen"]}],
             "rejected": [{"role": "assistant", "content": row["rejected"]}]} for row in demo_rows("test", 3)]
    with pytest.raises(ValueError, match="cache_refinement_prefix=False"):
        trainer.evaluate(eval_dataset=Dataset.from_list(chat))


# ---- cache directory and checkpoints (item 17) ----------------------------------------------------------------

def test_unwritable_cache_dir_fails_before_the_reference_pass(tmp_path, monkeypatch):
    import fastpref.trainer.trainer as trainer_module

    passes = []
    original = trainer_module.compute_reference_logps
    monkeypatch.setattr(trainer_module, "compute_reference_logps",
                        lambda *args, **kwargs: passes.append(1) or original(*args, **kwargs))
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    with pytest.raises(OSError, match="ref_cache_dir .*a_file/cache.* is not writable"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path, ref_cache_dir=str(blocker / "cache")),
                          train_dataset=demo_rows("train", 4), processing_class=TOKENIZER)
    assert passes == []


@pytest.mark.parametrize("tear", ["trainer_state.json", "model.safetensors", "optimizer.pt"])
def test_resume_true_skips_a_torn_last_checkpoint(tmp_path, tear):
    """resume_from_checkpoint=True resumes from the last complete checkpoint (with a warning about the torn one),
    continuing the uninterrupted run's loss curve."""
    rows = demo_rows("train", 16)
    args = dict(max_steps=4, save_strategy="steps", save_steps=2)
    full = PreferenceTrainer(tiny_model(), args=config(tmp_path, **args), train_dataset=rows,
                             processing_class=TOKENIZER)
    full.train()
    expected = {e["step"]: e["loss"] for e in full.state.log_history if "loss" in e}
    torn = tmp_path / "out" / "checkpoint-4" / tear
    if tear == "model.safetensors":
        torn.write_bytes(torn.read_bytes()[:100])
    else:
        os.remove(torn)
    resumed = PreferenceTrainer(tiny_model(), args=config(tmp_path, **args), train_dataset=rows,
                                processing_class=TOKENIZER)
    with pytest.warns(UserWarning, match="skipping incomplete checkpoint .*checkpoint-4"):
        resumed.train(resume_from_checkpoint=True)
    got = {e["step"]: e["loss"] for e in resumed.state.log_history if "loss" in e}
    assert sorted(got) == [1, 2, 3, 4]
    for step in (3, 4):
        assert got[step] == pytest.approx(expected[step], rel=1e-5, abs=1e-6)


def test_every_pair_too_long_is_one_clear_error(tmp_path):
    """All prompts longer than max_length (keep_start): a ValueError naming max_length and truncation_mode before
    any reference pass, not torch.cat's 'expected a non-empty list' from the cache."""
    rows = [{"prompt": "a long question " * 40, "chosen": "yes", "rejected": "no"} for _ in range(3)]
    with pytest.raises(ValueError, match=r"no pairs left.*max_length=16.*truncation_mode='keep_start'"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path, max_length=16, truncation_mode="keep_start"),
                          train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)


def test_identical_pairs_dropped_and_empty_responses_warned(tmp_path):
    """chosen == rejected: dropped with one warning naming count and rows (kept with keep_identical_pairs); an
    empty chosen: kept, one warning; all pairs identical: the 'no pairs left' error."""
    rows = [{"prompt": f"question {i}", "chosen": f"yes {i}", "rejected": f"no {i}"} for i in range(6)]
    rows[1]["rejected"] = rows[1]["chosen"]
    rows[4]["rejected"] = rows[4]["chosen"]
    rows[2]["chosen"] = ""
    with pytest.warns(UserWarning) as record:
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows),
                                    processing_class=TOKENIZER)
    messages = [str(w.message) for w in record]
    assert [m for m in messages if "chosen == rejected" in m] == [
        "train: dropped 2 of 6 pairs with chosen == rejected (rows 1, 4): they carry no preference signal "
        "(keep_identical_pairs=True keeps them)"]
    assert len([m for m in messages if "empty chosen response (rows 2)" in m]) == 1
    assert trainer.train_dataset["example_index"] == list(range(4))
    assert len(trainer.train_dataset) == 4
    with pytest.warns(UserWarning, match=r"2 of 6 pairs have chosen == rejected \(rows 1, 4\); kept"):
        kept = PreferenceTrainer(tiny_model(), args=config(tmp_path, keep_identical_pairs=True),
                                 train_dataset=Dataset.from_list(rows), processing_class=TOKENIZER)
    assert len(kept.train_dataset) == 6
    long_first = [{"prompt": "a long question " * 40, "chosen": "yes", "rejected": "no"}, *rows]
    with pytest.warns(UserWarning, match=r"dropped 2 of 6 pairs with chosen == rejected \(rows 2, 5\)"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path, max_length=64), train_dataset=Dataset.from_list(
            long_first), processing_class=TOKENIZER)  # rows counted as given, the too-long row 0 included
    same = [{"prompt": "q", "chosen": "a", "rejected": "a"} for _ in range(3)]
    with pytest.raises(ValueError, match=r"no pairs left: all 3 train pairs have chosen == rejected"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(same),
                          processing_class=TOKENIZER)
