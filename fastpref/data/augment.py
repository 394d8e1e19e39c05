"""Reward-augmented relabeling (Zhang et al., "Reward-Augmented Data Enhances Direct Preference Alignment of
LLMs", arXiv 2410.08067).

Each scored pair (x, y_w, y_l, s_w, s_l) becomes two pairs, trained with plain DPO on the doubled set:

* (g(s_w) ⊕ x, y_w, y_l) — conditioned on the chosen response's score, the pair as is;
* (g(s_l) ⊕ x, y_l, y_w) — conditioned on the rejected response's score, chosen and rejected swapped,

where g(s) is an instruction carrying the score: a system message for conversational data (prepended to an
existing system message), or, for chat templates without a system role (``system_role=False``), a first line of
the first user turn; a prefix line of the prompt for standard data. Pairs with tied scores (s_w = s_l) carry no
preference once conditioned on the score and are dropped with a warning giving their count. At inference the
model is conditioned on the top score (:func:`reward_conditioned_prompt`).
"""

from __future__ import annotations

import warnings
from typing import Any

from fastpref.data.prompts import REWARD_AUGMENT_TEMPLATE

# Columns whose values belong to the original prompt and no longer hold for a relabeled pair.
_DROPPED = ("offset", "ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")


def reward_conditioned_prompt(prompt: str | list[dict], score: float, *, template: str = REWARD_AUGMENT_TEMPLATE,
                              system_role: bool = True) -> str | list[dict]:
    """The prompt conditioned on ``score``: ``template.format(score=score)`` as a system message (conversational
    prompt), as a first line of the first user turn (conversational prompt, ``system_role=False``, for chat
    templates without a system role) or as a first line (string prompt)."""
    instruction = template.format(score=score)
    if isinstance(prompt, str):
        return instruction + "\n" + prompt
    messages = [dict(message) for message in prompt]
    if not system_role:
        return _prefix_first_user_turn(messages, instruction)
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = instruction + "\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": instruction}, *messages]


def _prefix_first_user_turn(messages: list[dict], instruction: str) -> list[dict]:
    for message in messages:
        if message.get("role") == "user":
            message["content"] = instruction + "\n" + message["content"]
            return messages
    raise ValueError(f"system_role=False puts the score into the first user turn, but the prompt has none "
                     f"(roles {[message.get('role') for message in messages]})")


def _check_fields(row: dict[str, Any]) -> None:
    for key in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"):
        if key not in row:
            raise ValueError(f"reward_augment needs a {key!r} field in every row; got fields {sorted(row)}")


def _relabel(row: dict[str, Any], template: str, system_role: bool) -> list[dict[str, Any]]:
    kept = {key: value for key, value in row.items() if key not in _DROPPED}

    def conditioned(score: float) -> str | list[dict]:
        return reward_conditioned_prompt(row["prompt"], score, template=template, system_role=system_role)

    as_is = {**kept, "prompt": conditioned(row["score_chosen"])}
    swapped = {
        **kept,
        "prompt": conditioned(row["score_rejected"]),
        "chosen": row["rejected"],
        "rejected": row["chosen"],
        "score_chosen": row["score_rejected"],
        "score_rejected": row["score_chosen"],
    }
    if "tau" in row:
        swapped["tau"] = 1.0 - row["tau"]
    return [as_is, swapped]


def reward_augment(dataset_or_rows, *, template: str = REWARD_AUGMENT_TEMPLATE, system_role: bool = True):
    """Relabel every scored pair into two reward-conditioned pairs (see the module docstring).

    ``dataset_or_rows``: a ``datasets.Dataset`` or a list of dict rows with an explicit ``prompt`` and
    ``score_chosen``/``score_rejected``; returns the same kind, each kept pair becoming two consecutive rows
    (as is, then swapped). Pairs with ``score_chosen == score_rejected`` are dropped, with a warning giving
    their count and rows. ``tau`` becomes 1 − τ on swapped rows; ``offset`` and reference log-prob columns are
    dropped (they were computed for the unconditioned prompt). ``template`` is formatted with ``score=``;
    ``system_role=False`` puts it into the first user turn of conversational prompts instead of a system
    message.
    """
    try:
        template.format(score=1.0)
    except (KeyError, IndexError, ValueError) as error:
        raise ValueError(f"template must format with score= only, got {template!r}: {error}") from None
    rows = dataset_or_rows if isinstance(dataset_or_rows, list) else None
    if rows is None:
        import datasets

        if not isinstance(dataset_or_rows, datasets.Dataset):
            raise TypeError(f"dataset_or_rows must be a datasets.Dataset or a list of dicts, "
                            f"got {type(dataset_or_rows).__name__}")
        rows = dataset_or_rows.to_list()
    for row in rows:
        _check_fields(row)
    tied = [i for i, row in enumerate(rows) if row["score_chosen"] == row["score_rejected"]]
    if tied:
        warnings.warn(f"reward_augment: dropped {len(tied)} of {len(rows)} pairs with tied scores "
                      f"(score_chosen == score_rejected; rows {tied[:10]}{' …' if len(tied) > 10 else ''})",
                      stacklevel=2)
    tied_rows = set(tied)
    relabeled = [new for i, row in enumerate(rows) if i not in tied_rows
                 for new in _relabel(row, template, system_role)]
    if dataset_or_rows is rows:
        return relabeled
    import datasets

    return datasets.Dataset.from_list(relabeled)

