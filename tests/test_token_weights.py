"""Per-token weights as data (``chosen_token_weights``/``rejected_token_weights``, ``chosen_segments``/
``rejected_segments``): tokenization (alignment, truncation, named errors), the collator's kept-row weights in
every layout (times LD-DPO's), the trainer's weighted log-probs of the policy, the reference and the Sr-DPO
augmented stream against a float64 computation from full logits, and the reference-cache fingerprint."""

from __future__ import annotations

import copy

import pytest
import torch
from datasets import Dataset
from trainer_helpers import TOKENIZER, config, demo_rows, tiny_model

from fastpref import PreferenceTrainer
from fastpref.data import response_tokens, tokenize_pair
from fastpref.logps import oracle as logps_oracle
from fastpref.trainer.collator import StepCollator, ld_token_weights

EXAMPLE = {"prompt": "Say milk, then add 6+0.", "chosen": " milk. 6+0=6.", "rejected": " moon. 6+0=8. Whatever."}


def _random_weights(rows, seed: int = 0):
    """``rows`` (text) with random non-uniform weights, one per response token as the trainer tokenizes it."""
    generator = torch.Generator().manual_seed(seed)

    def weights(example):
        tokens = response_tokens(example, TOKENIZER)
        return {f"{side}_token_weights": (torch.rand(len(tokens[side]), generator=generator) * 2 - 0.5).tolist()
                for side in ("chosen", "rejected")}

    return rows.map(weights)


def test_response_tokens_are_the_tokenized_responses_and_weights_follow_truncation():
    tokens = response_tokens(EXAMPLE, TOKENIZER)
    full = tokenize_pair(EXAMPLE, TOKENIZER, max_length=None)
    assert tokens == {"chosen": full["chosen_input_ids"], "rejected": full["rejected_input_ids"]}
    weights = {side: [0.1 * (i + 1) for i in range(len(tokens[side]))] for side in ("chosen", "rejected")}
    example = {**EXAMPLE, "chosen_token_weights": weights["chosen"], "rejected_token_weights": weights["rejected"]}
    room = len(full["prompt_input_ids"]) + 3
    cut = tokenize_pair(example, TOKENIZER, max_length=room, truncation_mode="keep_start")
    assert len(cut["chosen_input_ids"]) == 3 and cut["chosen_token_weights"] == weights["chosen"][:3]
    assert cut["rejected_token_weights"] == weights["rejected"][:3]
    with pytest.raises(ValueError, match="chosen_token_weights has 2 weights but the response has"):
        tokenize_pair({**EXAMPLE, "chosen_token_weights": [1.0, 2.0]}, TOKENIZER)


def test_a_length_mismatch_names_the_row_and_column(tmp_path):
    rows = _random_weights(demo_rows("train", 4))
    bad = rows.map(lambda example, i: {"rejected_token_weights": example["rejected_token_weights"][:-1] if i == 2
                                       else example["rejected_token_weights"]}, with_indices=True)
    with pytest.raises(ValueError, match="train row 2: rejected_token_weights has"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=bad, processing_class=TOKENIZER)


def test_segments_map_character_spans_to_tokens():
    """Each token takes the weight of the first span it shares a character with; uncovered tokens and eos weigh 1."""
    text = EXAMPLE["chosen"]
    start = text.index("6+0")
    out = tokenize_pair({**EXAMPLE, "chosen_segments": [[start, start + 3, 2.5], [0, 2, 0.0]]}, TOKENIZER,
                        max_length=None)
    encoding = TOKENIZER(EXAMPLE["prompt"] + text + TOKENIZER.eos_token, return_offsets_mapping=True)
    offset = len(EXAMPLE["prompt"])
    spans = [(s - offset, e - offset) for s, e in encoding["offset_mapping"][-len(out["chosen_input_ids"]):]]
    expected = [2.5 if s < start + 3 and start < e else 0.0 if s < 2 and 0 < e else 1.0 for s, e in spans]
    assert out["chosen_token_weights"] == expected and 2.5 in expected and 0.0 in expected
    assert expected[-1] == 1.0  # the eos token
    assert out["rejected_token_weights"] == [1.0] * len(out["rejected_input_ids"])
    with pytest.raises(ValueError, match="chosen_segments: segments overlap"):
        tokenize_pair({**EXAMPLE, "chosen_segments": [[0, 4, 2.0], [3, 6, 1.0]]}, TOKENIZER)
    with pytest.raises(ValueError, match="chosen_segments: segment"):
        tokenize_pair({**EXAMPLE, "chosen_segments": [[0, len(text) + 1, 2.0]]}, TOKENIZER)
    conversational = {"prompt": [{"role": "user", "content": "Hi"}],
                      "chosen": [{"role": "assistant", "content": "Hello"}],
                      "rejected": [{"role": "assistant", "content": "Go"}], "chosen_segments": [[0, 2, 2.0]]}
    with pytest.raises(ValueError, match="standard"):
        tokenize_pair(conversational, TOKENIZER)


@pytest.mark.parametrize("layout", ["padded", "packed", "tree"])
@pytest.mark.parametrize("ld_alpha", [None, 0.3])
def test_collator_kept_weights_follow_the_responses(layout, ld_alpha):
    rows = _random_weights(demo_rows("train", 3))
    features = [tokenize_pair(row, TOKENIZER) for row in rows]
    batch = StepCollator(TOKENIZER.pad_token_id, layout=layout, ld_alpha=ld_alpha)(features)
    expected = torch.tensor([w for side in ("chosen", "rejected") for f in features
                             for w in f[f"{side}_token_weights"]])
    if ld_alpha is not None:
        expected = expected * ld_token_weights(batch["kept_cu_seqlens"], ld_alpha)
    torch.testing.assert_close(batch["kept_token_weights"], expected, rtol=0, atol=0)
    unweighted = [{k: v for k, v in f.items() if "weights" not in k} for f in features]
    plain = StepCollator(TOKENIZER.pad_token_id, layout=layout)(unweighted)
    assert "kept_token_weights" not in plain


def _weighted_oracle(model, prompt: list[int], response: list[int], weights: list[float]) -> torch.Tensor:
    """Σ_t w_t log p(y_t | prompt, y_<t) in float64 from the model's full logits."""
    ids = torch.tensor([prompt + response])
    with torch.no_grad():
        logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    labels = ids[0, 1:].clone()
    labels[: len(prompt) - 1] = -100
    token_weights = torch.zeros(labels.shape, dtype=torch.float64)
    token_weights[len(prompt) - 1:] = torch.tensor(weights, dtype=torch.float64)
    return logps_oracle.logits_logps(logits.double(), labels, token_weights=token_weights).logps[0]


def _moved(model, seed: int = 1):
    moved = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in moved.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=generator))
    return moved


@pytest.mark.parametrize("layout", ["padded", "packed", "tree"])
def test_trainer_weights_policy_reference_and_augmented_logps(layout, tmp_path):
    """Sr-DPO (refinement prompt, so the augmented stream is scored too): the policy's log-probs of both streams
    and the cached reference log-probs of both are the weighted sums of a float64 computation from full logits."""
    initial = tiny_model()
    policy = _moved(initial)
    args = config(tmp_path, stream_layout=layout, loss_type="sr_dpo", refinement="prompt",
                  cache_refinement_prefix=False)
    trainer = PreferenceTrainer(policy, ref_model=initial, args=args, train_dataset=_random_weights(demo_rows("train", 5)),
                                processing_class=TOKENIZER)
    features = [trainer.train_dataset[i] for i in range(5)]
    batch = trainer.data_collator(features)
    for prefix in ("", "aug_"):
        prompt_key = f"{prefix}prompt_input_ids"
        expected = {model_name: torch.stack([
            _weighted_oracle(model, f[prompt_key], f[f"{side}_input_ids"], f[f"{side}_token_weights"])
            for side in ("chosen", "rejected") for f in features]) for model_name, model in
            (("policy", policy), ("reference", initial))}
        with torch.no_grad():
            got = trainer._stream_logps(trainer.model, batch, prefix).logps
        torch.testing.assert_close(got.double(), expected["policy"], rtol=1e-5, atol=1e-4)
        cached = torch.cat([batch[f"{prefix}ref_chosen_logps"], batch[f"{prefix}ref_rejected_logps"]])
        torch.testing.assert_close(cached.double(), expected["reference"], rtol=1e-5, atol=1e-4)
        unweighted = torch.stack([_weighted_oracle(initial, f[prompt_key], f[f"{side}_input_ids"],
                                                   [1.0] * len(f[f"{side}_input_ids"]))
                                  for side in ("chosen", "rejected") for f in features])
        assert (unweighted - expected["reference"]).abs().max() > 0.1  # the weights matter


def test_changed_token_weights_do_not_reuse_the_reference_cache(tmp_path):
    rows = demo_rows("train", 6)
    args = config(tmp_path)

    def passes(dataset):
        trainer = PreferenceTrainer(tiny_model(), args=args, train_dataset=dataset, processing_class=TOKENIZER)
        return trainer.reference_passes, trainer.train_dataset["ref_chosen_logps"]

    first, first_logps = passes(_random_weights(rows, seed=0))
    again, again_logps = passes(_random_weights(rows, seed=0))
    changed, changed_logps = passes(_random_weights(rows, seed=1))
    unweighted, _ = passes(rows)
    assert (first, again, changed, unweighted) == (1, 0, 1, 1)
    assert again_logps == first_logps and changed_logps != first_logps


def test_identical_tokens_under_different_weights_are_kept(tmp_path):
    """chosen == rejected tokens with different token weights (or segments) are not a no-op (the weighted log-probs
    differ): kept; the same tokens and the same weights (a side without weights weighs 1) are still dropped."""
    same = {"prompt": "Say milk.", "chosen": " milk, then more milk.", "rejected": " milk, then more milk."}
    n = len(response_tokens(same, TOKENIZER)["chosen"])
    ramp = [0.25 + 0.5 * i for i in range(n)]
    rows = [{**EXAMPLE, "chosen_token_weights": None, "rejected_token_weights": None},
            {**same, "chosen_token_weights": ramp, "rejected_token_weights": ramp[::-1]},  # kept: weights differ
            {**same, "chosen_token_weights": ramp, "rejected_token_weights": list(ramp)},  # dropped
            {**same, "chosen_token_weights": [1.0] * n, "rejected_token_weights": None},  # dropped: 1 = no weights
            {**same, "chosen_token_weights": None, "rejected_token_weights": ramp}]  # kept
    with pytest.warns(UserWarning, match=r"dropped 2 of 5 pairs with chosen == rejected \(rows 2, 3\)"):
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(rows),
                                    processing_class=TOKENIZER)
    assert trainer.train_dataset["rejected_token_weights"][1:] == [ramp[::-1], ramp]
    tokenized = [{"chosen_token_weights": None, "rejected_token_weights": None, **tokenize_pair(row, TOKENIZER)}
                 for row in rows]  # the tokenized path checks the same way (None: weight 1)
    with pytest.warns(UserWarning, match=r"dropped 2 of 5 pairs with chosen == rejected \(rows 2, 3\)"):
        PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(tokenized),
                          processing_class=TOKENIZER)
    segments = [{**same, "chosen_segments": [[1, 5, 2.0]], "rejected_segments": [[0, 3, 0.5]]},  # kept
                {**same, "chosen_segments": [[1, 5, 2.0]], "rejected_segments": [[1, 5, 2.0]]}]  # dropped
    with pytest.warns(UserWarning, match=r"dropped 1 of 2 pairs with chosen == rejected \(rows 1\)"):
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path), train_dataset=Dataset.from_list(segments),
                                    processing_class=TOKENIZER)
    assert len(trainer.train_dataset) == 1


MULTI_TURN = {"prompt": [{"role": "user", "content": "Plan a trip"}],
              "chosen": [{"role": "assistant", "content": "Where to?"}, {"role": "user", "content": "Rome, cheap"},
                         {"role": "assistant", "content": "Take the train."}],
              "rejected": [{"role": "assistant", "content": "No."}]}


def test_assistant_only_zeroes_the_non_assistant_turns_of_a_response():
    out = tokenize_pair({**MULTI_TURN, "chosen_token_weights": None}, TOKENIZER, max_length=None,
                        assistant_only=True)
    render = TOKENIZER.apply_chat_template
    turn_lengths = []
    for count in (1, 2, 3):
        text = render(MULTI_TURN["prompt"] + MULTI_TURN["chosen"][:count], tokenize=False)
        turn_lengths.append(len(TOKENIZER(text, add_special_tokens=False)["input_ids"]))
    prompt = len(out["prompt_input_ids"])
    expected = ([1.0] * (turn_lengths[0] - prompt) + [0.0] * (turn_lengths[1] - turn_lengths[0])
                + [1.0] * (turn_lengths[2] - turn_lengths[1]))
    assert out["chosen_token_weights"] == expected and 0.0 in expected
    assert out["rejected_token_weights"] == [1.0] * len(out["rejected_input_ids"])
    weights = [0.5] * len(out["chosen_input_ids"])
    times = tokenize_pair({**MULTI_TURN, "chosen_token_weights": weights}, TOKENIZER, max_length=None,
                          assistant_only=True)
    assert times["chosen_token_weights"] == [0.5 * w for w in expected]
    with pytest.raises(ValueError, match="assistant_only needs conversational data"):
        tokenize_pair(EXAMPLE, TOKENIZER, assistant_only=True)


def test_trainer_assistant_only_weights_the_reference(tmp_path):
    rows = Dataset.from_list([MULTI_TURN] * 3)
    logps = {}
    for flag in (False, True):
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path / str(flag), assistant_only=flag),
                                    train_dataset=rows, processing_class=TOKENIZER)
        logps[flag] = trainer.train_dataset["ref_chosen_logps"]
        assert ("chosen_token_weights" in trainer.train_dataset.column_names) == flag
    assert logps[True][0] > logps[False][0]  # the user turn's (negative) log-probs no longer count
