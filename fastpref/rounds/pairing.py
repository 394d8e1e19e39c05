"""Preference pairs from scored samples, the iLR-DPO length offset, and replay of earlier rounds' pairs.

Rules (per prompt, over its K sampled responses; duplicate texts count once, the first one's score kept):

- ``"best_vs_worst"``: the highest-scored response is chosen, the lowest-scored rejected (DICE, iLR-DPO); the
  pair is kept when s_best − s_worst > ``margin``.
- ``"all_pairs"``: every ordered pair (i, j) with s_i − s_j > ``margin`` (up to K(K−1)/2 pairs per prompt).

With ``margin=0`` ties are dropped (a tie carries no preference). Rows are TRL's format with scores:
``prompt``, ``chosen``, ``rejected``, ``score_chosen``, ``score_rejected``.

Length offset (iLR-DPO, arXiv 2406.11817, after R-DPO's length margin): ``offset`` = α·(|y_w| − |y_l|) in tokens;
the trainer subtracts it inside the sigmoid-family logit, −log σ(βh − α(|y_w| − |y_l|)).

Replay (DICE's experience replay, arXiv 2406.09760): with share ρ ∈ [0, 1), round(ρ/(1−ρ)·n_new) pairs drawn
without replacement from the pool of earlier rounds' pairs (and any offline pairs) join the n_new new ones, so
replayed pairs make up ρ of the training set (fewer when the pool is smaller).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence

import torch

PAIRING_RULES = ("best_vs_worst", "all_pairs")
TRAIN_COLUMNS = ("prompt", "chosen", "rejected", "score_chosen", "score_rejected", "offset")


def _unique(responses: Sequence[str], scores: Sequence[float]) -> tuple[list[str], list[float]]:
    seen: dict[str, float] = {}
    for response, score in zip(responses, scores):
        seen.setdefault(response, score)
    return list(seen), list(seen.values())


def _row(prompt, chosen: str, rejected: str, score_chosen: float, score_rejected: float) -> dict:
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected, "score_chosen": score_chosen,
            "score_rejected": score_rejected}


def build_pairs(prompts: Sequence, responses: Sequence[Sequence[str]], scores, *, rule: str = "best_vs_worst",
                margin: float = 0.0) -> list[dict]:
    """Pairs from ``responses[i]`` (the samples of ``prompts[i]``) and their ``scores`` (same nesting, or a
    [P, K] tensor) by ``rule`` (module docstring), in prompt order."""
    if rule not in PAIRING_RULES:
        raise ValueError(f"rule must be one of {PAIRING_RULES}, got {rule!r}")
    if not math.isfinite(margin) or margin < 0:
        raise ValueError(f"margin must be a finite number >= 0, got {margin!r}")
    if len(prompts) != len(responses) or len(scores) != len(responses):
        raise ValueError(f"prompts, responses and scores need one entry per prompt, got {len(prompts)}, "
                         f"{len(responses)} and {len(scores)}")
    rows = []
    for prompt, texts, values in zip(prompts, responses, scores):
        values = [float(v) for v in (values.tolist() if isinstance(values, torch.Tensor) else values)]
        if len(values) != len(texts):
            raise ValueError(f"prompt {prompt!r}: {len(texts)} responses but {len(values)} scores")
        if not all(math.isfinite(v) for v in values):
            raise ValueError(f"prompt {prompt!r}: non-finite score in {values}")
        texts, values = _unique(texts, values)
        if rule == "best_vs_worst" and texts:
            best = max(range(len(values)), key=values.__getitem__)
            worst = min(range(len(values)), key=values.__getitem__)
            candidates = [(best, worst)]
        else:
            candidates = [(i, j) for i in range(len(texts)) for j in range(len(texts)) if i != j]
        rows += [_row(prompt, texts[i], texts[j], values[i], values[j])
                 for i, j in candidates if values[i] - values[j] > margin]
    return rows


def add_length_offsets(rows: list[dict], alpha: float, length: Callable[[str], int]) -> list[dict]:
    """``rows`` with ``offset`` = α·(length(chosen) − length(rejected)) (iLR-DPO); rows are copied."""
    if not math.isfinite(alpha):
        raise ValueError(f"alpha must be finite, got {alpha!r}")
    return [{**row, "offset": alpha * (length(_text(row["chosen"])) - length(_text(row["rejected"])))}
            for row in rows]


def _text(completion) -> str:
    """A completion's text: a string, or the contents of its messages (conversational format)."""
    return completion if isinstance(completion, str) else "".join(m["content"] for m in completion)


def replay_count(new: int, pool: int, share: float) -> int:
    """How many pool pairs join ``new`` new pairs for a replay ``share`` ρ: min(pool, round(ρ/(1−ρ)·new))."""
    if not 0 <= share < 1:
        raise ValueError(f"replay_share must be in [0, 1), got {share!r}")
    return min(pool, round(share / (1 - share) * new))


def mix_replay(new_rows: list[dict], pool: list[dict], share: float, seed: int) -> list[dict]:
    """The replayed rows drawn from ``pool`` for ``new_rows`` (see :func:`replay_count`), deterministic in
    ``seed``, in pool order."""
    count = replay_count(len(new_rows), len(pool), share)
    picked = sorted(random.Random(seed).sample(range(len(pool)), count))
    return [pool[i] for i in picked]


def training_rows(rows: list[dict]) -> list[dict]:
    """``rows`` restricted to the columns of :data:`TRAIN_COLUMNS` that every row has (a dataset needs one
    schema)."""
    shared = [c for c in TRAIN_COLUMNS if all(c in row for row in rows)]
    for needed in ("prompt", "chosen", "rejected"):
        if needed not in shared:
            raise ValueError(f"every training pair needs a {needed!r} field")
    return [{c: row[c] for c in shared} for row in rows]
