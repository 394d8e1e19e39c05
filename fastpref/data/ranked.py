"""Preference pairs from ranked responses, ordered easy → hard: Curry-DPO's curriculum (Pattnaik et al. 2024,
arXiv 2403.07230).

A ranked row is ``{"prompt", "completions": [K responses], "scores": [K floats]}`` (higher is better; responses
are strings or message lists, passed through). :func:`pairs_from_ranked` turns each row into pairs (y_i, y_j) with
s_i > s_j and sorts all pairs of all rows by the score gap s_i − s_j, largest (easiest to tell apart) first. The
sort is stable: pairs with the same gap keep the order of their rows, and within a row the order in which the
strategy lists them. Train on the result with ``train_sampling_strategy="sequential"`` to keep that order.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

PAIR_STRATEGIES = ("best_vs_rest", "all_pairs")


def check_ranked_row(index: int, row) -> tuple[object, list, list[float]]:
    """(prompt, completions, scores) of ranked row ``index``; ValueError naming the row when malformed."""
    if not isinstance(row, Mapping) or any(key not in row for key in ("prompt", "completions", "scores")):
        raise ValueError(f"rows[{index}] must be a mapping with 'prompt', 'completions' and 'scores'")
    for key in ("completions", "scores"):
        if not isinstance(row[key], (list, tuple)):
            raise ValueError(f"rows[{index}] {key!r} must be a list, got {type(row[key]).__name__}")
    completions, scores = list(row["completions"]), list(row["scores"])
    if len(completions) != len(scores):
        raise ValueError(f"rows[{index}] has {len(completions)} completions but {len(scores)} scores (they must match)")
    for score in scores:
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise ValueError(f"rows[{index}] scores must be finite numbers, got {score!r}")
    return row["prompt"], completions, [float(s) for s in scores]


def _row_pairs(scores: list[float], strategy: str) -> list[tuple[int, int]]:
    """(winner, loser) column pairs with a strict score order; ties give no pair."""
    if strategy == "best_vs_rest":
        best = max(range(len(scores)), key=lambda k: scores[k])  # the first of tied best
        return [(best, k) for k in range(len(scores)) if scores[best] > scores[k]]
    return [(i, j) for i in range(len(scores)) for j in range(len(scores)) if scores[i] > scores[j]]


def pairs_from_ranked(rows: Iterable[Mapping], strategy: str = "best_vs_rest") -> list[dict]:
    """Pairs ``{prompt, chosen, rejected, score_chosen, score_rejected}`` from ranked rows, easy → hard.

    ``strategy``: ``"best_vs_rest"`` (the best response against each lower-scored one, Curry-DPO's pairs: K − 1 per
    row without ties) or ``"all_pairs"`` (every pair with s_i > s_j, K(K − 1)/2 without ties). Equal scores give no
    pair. The pairs are sorted by decreasing score gap (stable; see the module docstring). A row without the three
    keys, with a different number of scores and completions, or with a score that is not a finite number raises ValueError naming
    the row. The score columns are the trainer's ``score_chosen``/``score_rejected`` (rDPO's τ, ODPO's offset).
    """
    if strategy not in PAIR_STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; valid strategies are: {', '.join(PAIR_STRATEGIES)}")
    pairs = []
    for index, row in enumerate(rows):
        prompt, completions, scores = check_ranked_row(index, row)
        for winner, loser in _row_pairs(scores, strategy):
            pairs.append({"prompt": prompt, "chosen": completions[winner], "rejected": completions[loser],
                          "score_chosen": scores[winner], "score_rejected": scores[loser]})
    return sorted(pairs, key=lambda pair: pair["score_rejected"] - pair["score_chosen"])
