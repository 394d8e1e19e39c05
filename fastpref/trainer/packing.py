"""Padding-free packed preference batches.

A batch of B tokenized pairs (the output of :func:`fastpref.data.tokenize_pair`) becomes one stream of 2B
sequences packed back to back, no padding: sequence s < B is pair s's prompt ⊕ chosen, sequence s ≥ B is
pair (s − B)'s prompt ⊕ rejected.

* ``input_ids`` [1, L]; ``position_ids`` [1, L] restart at 0 for each sequence; ``cu_seqlens`` [2B + 1] are the
  sequence boundaries (``cu_seqlens[0] = 0``, ``cu_seqlens[-1] = L``).
* ``labels`` [1, L] are already shifted: ``labels[t] = input_ids[t + 1]`` when token t + 1 is a response token
  of the same sequence, else −100. Row t thus scores the next token, prompt rows and each sequence's last row
  score nothing, and row |x| − 1 (the prompt's last) scores the first response token.

Run the model with ``attention_mask=None``, the ``position_ids`` and ``use_cache=False``: transformers then
detects the packed sequences from the restarting positions and keeps them apart. With ``with_augmented`` the
same four tensors, prefixed ``aug_``, hold the Sr-DPO streams (p ⊕ x, y_w) and (p ⊕ x, y_l).

Per-pair columns (:data:`fastpref.trainer.columns.PAIR_FLOAT_COLUMNS`: scores, ``tau``, ``offset``, ``weight``,
reference log-probs) come along as float32 [B] tensors and ``example_index`` as int64 [B]; a column that some
features of the batch lack (or hold None) is refused, never dropped.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from fastpref.logps.inputs import IGNORE_INDEX
from fastpref.trainer.columns import INDEX_COLUMN, PAIR_FLOAT_COLUMNS


def _token_list(feature: dict[str, Any], key: str, index: int) -> list[int]:
    if key not in feature:
        raise ValueError(f"feature {index} has no {key!r} (tokenize it with fastpref.data.tokenize_pair"
                         f"{', refinement_prompt=...' if key.startswith('aug_') else ''})")
    ids = feature[key]
    ids = ids.tolist() if isinstance(ids, torch.Tensor) else list(ids)
    if not ids:
        raise ValueError(f"feature {index}: {key!r} is empty")
    return ids


def pack_sequences(prompts: Sequence[list[int]], responses: Sequence[list[int]]) -> dict[str, torch.Tensor]:
    """Pack sequences prompts[s] ⊕ responses[s] into one stream: ``input_ids``, ``position_ids``, ``labels``
    ([1, L] int64) and ``cu_seqlens`` ([S + 1] int64), labels shifted as described in the module docstring."""
    input_ids: list[int] = []
    position_ids: list[int] = []
    labels: list[int] = []
    cu_seqlens = [0]
    for prompt, response in zip(prompts, responses, strict=True):
        length = len(prompt) + len(response)
        input_ids += prompt + response
        position_ids += range(length)
        labels += [IGNORE_INDEX] * (len(prompt) - 1) + response + [IGNORE_INDEX]
        cu_seqlens.append(cu_seqlens[-1] + length)
    return {
        "input_ids": torch.tensor([input_ids], dtype=torch.long),
        "position_ids": torch.tensor([position_ids], dtype=torch.long),
        "labels": torch.tensor([labels], dtype=torch.long),
        "cu_seqlens": torch.tensor(cu_seqlens, dtype=torch.long),
    }


def pair_columns(features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
    """The per-pair columns of a batch as [B] tensors; a column present in some features only is a ValueError."""
    out = {}
    for column in (*PAIR_FLOAT_COLUMNS, INDEX_COLUMN):
        present = [f.get(column) is not None for f in features]
        if not any(present):
            continue
        if not all(present):
            raise ValueError(f"column {column!r} is missing (or None) in feature {present.index(False)} of the batch "
                             "but given in others: give it for every pair, or for none")
        dtype = torch.long if column == INDEX_COLUMN else torch.float32
        out[column] = torch.tensor([f[column] for f in features], dtype=dtype)
    return out


class PreferenceCollator:
    """Collate tokenized preference pairs into padding-free packed streams (see the module docstring).

    ``with_augmented`` adds the Sr-DPO streams built from each feature's ``aug_prompt_input_ids``.
    """

    def __init__(self, *, with_augmented: bool = False):
        self.with_augmented = with_augmented

    def __call__(self, features: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        if not features:
            raise ValueError("features is empty: a batch needs at least one preference pair")
        prompts = [_token_list(f, "prompt_input_ids", i) for i, f in enumerate(features)]
        chosen = [_token_list(f, "chosen_input_ids", i) for i, f in enumerate(features)]
        rejected = [_token_list(f, "rejected_input_ids", i) for i, f in enumerate(features)]
        batch = pack_sequences(prompts + prompts, chosen + rejected)
        if self.with_augmented:
            aug_prompts = [_token_list(f, "aug_prompt_input_ids", i) for i, f in enumerate(features)]
            augmented = pack_sequences(aug_prompts + aug_prompts, chosen + rejected)
            batch.update({f"aug_{key}": value for key, value in augmented.items()})
        batch.update(pair_columns(features))
        return batch
