"""fastpref.trainer.packing: packed padding-free preference streams (plain and Sr-DPO augmented)."""

from __future__ import annotations

import random

import pytest
import torch

from fastpref.logps import oracle as logps_oracle
from fastpref.logps import IGNORE_INDEX
from fastpref.trainer.collator import StepCollator
from fastpref.trainer.packing import PreferenceCollator, pack_sequences
from fastpref.data import SR_DPO_REFINEMENT_PROMPT, load_preference_dataset, tokenize_pair
from fastpref.data.tiny_models import build_model
from fastpref.data.tokenizer import build_tokenizer

TINY_MODELS = ["tiny-llama", "tiny-qwen2", "tiny-mistral", "tiny-gemma2", "tiny-gpt2"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def demo_features(tokenizer):
    rows = load_preference_dataset("demo", split="test").select(range(5))
    return [{**tokenize_pair(row, tokenizer, refinement_prompt=SR_DPO_REFINEMENT_PROMPT), **row} for row in rows]


def _random_features(rng: random.Random, count: int) -> list[dict]:
    def ids(low, high):
        return [rng.randrange(3, 300) for _ in range(rng.randint(low, high))]

    return [{"prompt_input_ids": ids(1, 9), "chosen_input_ids": ids(1, 7), "rejected_input_ids": ids(1, 7),
             "aug_prompt_input_ids": ids(2, 13)} for _ in range(count)]


def test_labels_shifted_and_masked_by_hand():
    features = [{"prompt_input_ids": [5, 6, 7], "chosen_input_ids": [8, 9], "rejected_input_ids": [10]},
                {"prompt_input_ids": [11], "chosen_input_ids": [12, 13, 14], "rejected_input_ids": [15, 16]}]
    batch = PreferenceCollator()(features)
    x = IGNORE_INDEX
    assert batch["input_ids"].tolist() == [[5, 6, 7, 8, 9, 11, 12, 13, 14, 5, 6, 7, 10, 11, 15, 16]]
    assert batch["position_ids"].tolist() == [[0, 1, 2, 3, 4, 0, 1, 2, 3, 0, 1, 2, 3, 0, 1, 2]]
    assert batch["labels"].tolist() == [[x, x, 8, 9, x, 12, 13, 14, x, x, x, 10, x, 15, 16, x]]
    assert batch["cu_seqlens"].tolist() == [0, 5, 9, 13, 16]
    for key in ("input_ids", "position_ids", "labels", "cu_seqlens"):
        assert batch[key].dtype == torch.long


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_streams_follow_the_features(seed):
    rng = random.Random(seed)
    features = _random_features(rng, rng.randint(1, 6))
    batch = PreferenceCollator(with_augmented=True)(features)
    pairs = len(features)
    for prefix, prompt_key in (("", "prompt_input_ids"), ("aug_", "aug_prompt_input_ids")):
        ids, pos, labels = (batch[prefix + k][0].tolist() for k in ("input_ids", "position_ids", "labels"))
        bounds = batch[prefix + "cu_seqlens"].tolist()
        assert len(bounds) == 2 * pairs + 1 and bounds[0] == 0 and bounds[-1] == len(ids) == len(pos) == len(labels)
        for s in range(2 * pairs):
            feature = features[s % pairs]
            response = feature["chosen_input_ids" if s < pairs else "rejected_input_ids"]
            prompt = feature[prompt_key]
            lo, hi = bounds[s], bounds[s + 1]
            assert ids[lo:hi] == prompt + response
            assert pos[lo:hi] == list(range(hi - lo))
            assert labels[lo:hi] == [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]


def test_augmented_stream_puts_p_before_the_query(tokenizer, demo_features):
    batch = PreferenceCollator(with_augmented=True)(demo_features)
    bounds = batch["aug_cu_seqlens"].tolist()
    pairs = len(demo_features)
    for s in range(2 * pairs):
        row = demo_features[s % pairs]
        sequence = batch["aug_input_ids"][0, bounds[s]:bounds[s + 1]].tolist()
        response = row["chosen" if s < pairs else "rejected"]
        expected = tokenizer.bos_token + SR_DPO_REFINEMENT_PROMPT + " " + row["prompt"] + response + tokenizer.eos_token
        assert tokenizer.decode(sequence) == expected
    # The augmented stream scores exactly the plain stream's response tokens.
    plain, aug = batch["labels"][0], batch["aug_labels"][0]
    assert plain[plain != IGNORE_INDEX].tolist() == aug[aug != IGNORE_INDEX].tolist()


def test_per_pair_columns(demo_features):
    features = [{**f, "example_index": 10 + i, "tau": 0.25 * i, "weight": 1.5 - 0.5 * i}
                for i, f in enumerate(demo_features[:4])]
    batch = PreferenceCollator()(features)
    assert batch["score_chosen"].dtype == torch.float32
    assert batch["score_chosen"].tolist() == pytest.approx([f["score_chosen"] for f in features])
    assert batch["tau"].tolist() == [0.0, 0.25, 0.5, 0.75]
    assert batch["weight"].tolist() == [1.5, 1.0, 0.5, 0.0]
    assert batch["example_index"].tolist() == [10, 11, 12, 13] and batch["example_index"].dtype == torch.long
    assert "aug_input_ids" not in batch


@pytest.mark.parametrize("column", ["score_rejected", "weight"])
def test_a_column_missing_from_some_features_is_refused(demo_features, column):
    """A per-pair column given for some pairs of a batch only is an error, not silently left out of the batch."""
    features = [{**f, "weight": 2.0} for f in demo_features[:4]]
    features[2] = {**features[2], column: None}
    with pytest.raises(ValueError, match=f"column '{column}' is missing .* in feature 2"):
        PreferenceCollator()(features)


def test_bad_features_raise_named_errors():
    collator = PreferenceCollator(with_augmented=True)
    with pytest.raises(ValueError, match="features is empty"):
        collator([])
    with pytest.raises(ValueError, match="aug_prompt_input_ids"):
        collator([{"prompt_input_ids": [1], "chosen_input_ids": [2], "rejected_input_ids": [3]}])
    with pytest.raises(ValueError, match="'chosen_input_ids' is empty"):
        collator([{"prompt_input_ids": [1], "chosen_input_ids": [], "rejected_input_ids": [3]}])
    with pytest.raises(TypeError, match="pad_token_id"):
        StepCollator(None)


def _alone_logps(model, sequence: list[int], prompt_len: int) -> float:
    """log p(response | prompt) of one sequence run alone, labels built here independently of the collator."""
    ids = torch.tensor([sequence])
    logits = model(input_ids=ids, use_cache=False).logits[0, :-1]
    labels = torch.tensor(sequence[1:])
    labels[: prompt_len - 1] = IGNORE_INDEX
    return logps_oracle.logits_logps(logits, labels).logps.item()


@pytest.mark.parametrize("name", TINY_MODELS)
def test_packed_logps_equal_unpacked(name, tokenizer, demo_features):
    torch.manual_seed(0)
    model = build_model(name, len(tokenizer)).eval()
    features = demo_features[:3]
    batch = PreferenceCollator(with_augmented=True)(features)
    with torch.no_grad():
        for prefix, prompt_key in (("", "prompt_input_ids"), ("aug_", "aug_prompt_input_ids")):
            logits = model(input_ids=batch[prefix + "input_ids"], position_ids=batch[prefix + "position_ids"],
                           attention_mask=None, use_cache=False).logits[0]
            packed = logps_oracle.logits_logps(logits, batch[prefix + "labels"][0],
                                            cu_seqlens=batch[prefix + "cu_seqlens"])
            alone = []
            for key in ("chosen_input_ids", "rejected_input_ids"):
                for feature in features:
                    prompt = feature[prompt_key]
                    alone.append(_alone_logps(model, prompt + feature[key], len(prompt)))
            torch.testing.assert_close(packed.logps, torch.tensor(alone, dtype=torch.float64), rtol=1e-6, atol=1e-5)
            lengths = [len(f[k]) for k in ("chosen_input_ids", "rejected_input_ids") for f in features]
            assert packed.counts.tolist() == lengths


def test_pack_sequences_needs_matching_lists():
    with pytest.raises(ValueError):
        pack_sequences([[1, 2]], [[3], [4]])
