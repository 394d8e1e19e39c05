"""Reward-augmented relabeling (Zhang et al., "Reward-Augmented Data Enhances Direct Preference Alignment of
LLMs", arXiv 2410.08067).

Each scored pair (x, y_w, y_l, s_w, s_l) becomes two pairs, trained with plain DPO on the doubled set:

* (g(s_w) ⊕ x, y_w, y_l) — conditioned on the chosen response's score, the pair as is;
* (g(s_l) ⊕ x, y_l, y_w) — conditioned on the rejected response's score, chosen and rejected swapped,

where g(s) is an instruction carrying the score: a system message for conversational data (prepended to an
existing system message), a prefix line of the prompt for standard data. At inference the model is conditioned
on the top score (:func:`reward_conditioned_prompt`).
"""

from __future__ import annotations

from typing import Any

from fastpref.data.prompts import REWARD_AUGMENT_TEMPLATE

# Columns whose values belong to the original prompt and no longer hold for a relabeled pair.
_DROPPED = ("offset", "ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")


def reward_conditioned_prompt(prompt: str | list[dict], score: float, *,
                              template: str = REWARD_AUGMENT_TEMPLATE) -> str | list[dict]:
    """The prompt conditioned on ``score``: ``template.format(score=score)`` as a system message (conversational
    prompt) or as a first line (string prompt)."""
    instruction = template.format(score=score)
    if isinstance(prompt, str):
        return instruction + "\n" + prompt
    messages = [dict(message) for message in prompt]
    if messages and messages[0].get("role") == "system":
        messages[0]["content"] = instruction + "\n" + messages[0]["content"]
        return messages
    return [{"role": "system", "content": instruction}, *messages]


def _relabel(row: dict[str, Any], template: str) -> list[dict[str, Any]]:
    for key in ("prompt", "chosen", "rejected", "score_chosen", "score_rejected"):
        if key not in row:
            raise ValueError(f"reward_augment needs a {key!r} field in every row; got fields {sorted(row)}")
    kept = {key: value for key, value in row.items() if key not in _DROPPED}
    as_is = {**kept, "prompt": reward_conditioned_prompt(row["prompt"], row["score_chosen"], template=template)}
    swapped = {
        **kept,
        "prompt": reward_conditioned_prompt(row["prompt"], row["score_rejected"], template=template),
        "chosen": row["rejected"],
        "rejected": row["chosen"],
        "score_chosen": row["score_rejected"],
        "score_rejected": row["score_chosen"],
    }
    if "tau" in row:
        swapped["tau"] = 1.0 - row["tau"]
    return [as_is, swapped]


def reward_augment(dataset_or_rows, *, template: str = REWARD_AUGMENT_TEMPLATE):
    """Relabel every scored pair into two reward-conditioned pairs (see the module docstring).

    ``dataset_or_rows``: a ``datasets.Dataset`` or a list of dict rows with an explicit ``prompt`` and
    ``score_chosen``/``score_rejected``; returns the same kind, row i becoming rows 2i (as is) and 2i+1
    (swapped). ``tau`` becomes 1 − τ on swapped rows; ``offset`` and reference log-prob columns are dropped
    (they were computed for the unconditioned prompt). ``template`` is formatted with ``score=``.
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
    relabeled = [new for row in rows for new in _relabel(row, template)]
    if dataset_or_rows is rows:
        return relabeled
    import datasets

    return datasets.Dataset.from_list(relabeled)

