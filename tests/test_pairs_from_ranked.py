"""fastpref.data.pairs_from_ranked (Curry-DPO's easy → hard pairs) and the trainer keeping their order."""

from __future__ import annotations

import pytest
from datasets import Dataset
from trainer_helpers import TOKENIZER, config, tiny_model

from fastpref import PreferenceTrainer
from fastpref.data import pairs_from_ranked

ROWS = [
    {"prompt": "p0", "completions": ["a", "b", "c", "d"], "scores": [2.0, 5.0, 1.0, 2.0]},
    {"prompt": "p1", "completions": ["e", "f", "g"], "scores": [0.0, 3.0, 3.0]},
]


def test_best_vs_rest_sorted_by_gap_stably():
    pairs = pairs_from_ranked(ROWS, strategy="best_vs_rest")
    got = [(p["prompt"], p["chosen"], p["rejected"], p["score_chosen"] - p["score_rejected"]) for p in pairs]
    # p1's best is the first of the tied 3.0s ("f"); the tie f/g gives no pair; gap 3 ties keep row then column order.
    assert got == [("p0", "b", "c", 4.0), ("p0", "b", "a", 3.0), ("p0", "b", "d", 3.0), ("p1", "f", "e", 3.0)]


def test_all_pairs_lists_every_strict_pair():
    pairs = pairs_from_ranked(ROWS, strategy="all_pairs")
    gaps = [p["score_chosen"] - p["score_rejected"] for p in pairs]
    assert gaps == sorted(gaps, reverse=True) and min(gaps) > 0
    # p0: 6 pairs minus the tie a/d; p1: 3 pairs minus the tie f/g.
    assert len(pairs) == 5 + 2
    assert {(p["chosen"], p["rejected"]) for p in pairs if p["prompt"] == "p0"} == {
        ("b", "a"), ("b", "c"), ("b", "d"), ("a", "c"), ("d", "c")}


@pytest.mark.parametrize("row, strategy, match", [
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0]}, "all_pairs", r"rows\[1\].*2 completions"),
    ({"prompt": "p", "completions": ["a", "b"]}, "all_pairs", r"rows\[1\]"),
    ({"prompt": "p", "completions": ["a", "b"], "scores": [1.0, float("nan")]}, "all_pairs", r"rows\[1\].*finite"),
    (ROWS[0], "worst_vs_rest", "strategy"),
])
def test_bad_rows_raise_naming_the_row(row, strategy, match):
    with pytest.raises(ValueError, match=match):
        pairs_from_ranked([ROWS[0], row], strategy=strategy)


def test_trainer_sequential_keeps_curriculum_order(tmp_path):
    """With train_sampling_strategy="sequential" the batches follow the curriculum; the default shuffles."""
    rows = [{"prompt": f"Question {i}:", "completions": [f" yes {i}", f" no {i}", f" maybe {i}"],
             "scores": [float(i % 5), 2.5 + i / 100, -1.0]} for i in range(12)]
    dataset = Dataset.from_list(pairs_from_ranked(rows, strategy="best_vs_rest"))
    order = {}
    for strategy in ("sequential", "random"):
        trainer = PreferenceTrainer(tiny_model(), args=config(tmp_path, train_sampling_strategy=strategy, seed=3),
                                    train_dataset=dataset, processing_class=TOKENIZER)
        order[strategy] = [int(i) for batch in trainer.get_train_dataloader() for i in batch["example_index"]]
    assert order["sequential"] == list(range(len(dataset)))
    assert sorted(order["random"]) == order["sequential"] != order["random"]
