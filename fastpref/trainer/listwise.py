"""The trainer's listwise path: K ranked responses per prompt (TPO, LiPO; :func:`fastpref.listwise_loss`).

Format: ``prompt``, ``completions`` (K responses, strings or message lists, K ≥ 2, K may vary by row), ``scores``
(K floats, higher is better). Tokenization (:func:`fastpref.data.tokenization.tokenize_ranked`) splits each
(prompt, y_k) as :func:`fastpref.data.tokenize_pair` does into ``prompt_input_ids`` and ``completions_input_ids``
(K token lists) and truncates the row as a pair: prompt + the longest y_k ≤ ``max_length``, every y_k cut the
same way; every y_k must leave the same prompt tokens. The collator lays the K·B sequences prompt ⊕ y_k out as
padded rows, or (``stream_layout="tree"``) as one tree stream with each prompt once and K branches, and gives
``completions_mask`` [B, K_max] for ragged K, ``scores`` [B, K_max] and, when cached, ``ref_completions_logps``
[B, K_max]. The reference log-probs are cached like the pairs' under a fingerprint of the reference, the prompt
and completion token ids and the format (stream ``"listwise"``).

A row that does not fit ``max_length`` after truncation (``keep_start`` with a prompt that fills it) is dropped,
as pairs are, with one warning that counts them. Limits: the packed layout (``"auto"`` picks padded or tree),
token weights (``ld_alpha``) and WPO weighting are refused by :class:`fastpref.PreferenceConfig`.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from fastpref.data.tokenization import tokenize_ranked
from fastpref.logps.inputs import IGNORE_INDEX
from fastpref.model.head import kept_rows
from fastpref.model.tree_stream import build_branch_tree
from fastpref.trainer.tokenize import map_fitting_rows

LISTWISE_TEXT_COLUMNS = ("prompt", "completions", "scores")
LISTWISE_TOKEN_COLUMN = "completions_input_ids"
LISTWISE_REF_COLUMN = "ref_completions_logps"
LISTWISE_BATCH_COLUMNS = ("prompt_input_ids", LISTWISE_TOKEN_COLUMN, "scores", LISTWISE_REF_COLUMN,
                          "completions_mask", "example_index")


def is_listwise(column_names) -> bool:
    return column_names is not None and ("completions" in column_names or LISTWISE_TOKEN_COLUMN in column_names)


def tokenize_ranked_row(example: dict, tokenizer, args) -> dict:
    """(prompt, completions, scores) → prompt_input_ids, completions_input_ids, scores
    (:func:`fastpref.data.tokenization.tokenize_ranked`: the pairs' truncation); ValueError for a bad row."""
    completions, scores = list(example["completions"]), list(example["scores"])
    if len(completions) < 2 or len(completions) != len(scores):
        raise ValueError(f"a ranked row needs K >= 2 completions and one score each, got {len(completions)} "
                         f"completions and {len(scores)} scores")
    if not all(isinstance(s, (int, float)) and math.isfinite(s) for s in scores):
        raise ValueError(f"a ranked row's scores must be finite numbers, got {scores}")
    out = tokenize_ranked(example, tokenizer, max_length=args.max_length, max_prompt_length=args.max_prompt_length,
                          truncation_mode=args.truncation_mode)
    return {**out, "scores": [float(s) for s in scores]}


def tokenize_listwise_dataset(dataset, tokenizer, args, name: str):
    """A ranked dataset → token columns and ``example_index``; tokenized datasets pass through. Rows that do not
    fit ``max_length`` after truncation are dropped with one warning, as pairs are."""
    unknown = [c for c in dataset.column_names if c not in (*LISTWISE_TEXT_COLUMNS, *LISTWISE_BATCH_COLUMNS)]
    if unknown:
        from fastpref.trainer.columns import UnknownColumnError

        raise UnknownColumnError(f"the {name} dataset is listwise and has columns the trainer does not read: "
                                 f"{unknown}. Listwise columns: {', '.join(LISTWISE_TEXT_COLUMNS)}")
    if "completions" in dataset.column_names:
        empty = {"prompt_input_ids": [], LISTWISE_TOKEN_COLUMN: [], "scores": []}
        dataset, _ = map_fitting_rows(dataset, lambda example, row: tokenize_ranked_row(example, tokenizer, args),
                                      empty, args, name, "ranked rows", desc="Tokenizing ranked rows",
                                      remove_columns=["prompt", "completions"])
    if "example_index" not in dataset.column_names:
        dataset = dataset.add_column("example_index", list(range(len(dataset))))
    return dataset


class ListwiseCollator:
    """Ranked rows → padded [Σ K_b, T] rows (prompt ⊕ y_k, row b's K_b responses in order), or with
    ``layout="tree"`` one tree stream [x, y_1, …, y_K] per prompt (:func:`fastpref.model.tree_stream.build_branch_tree`,
    the same sequence order), plus the [B, K_max] columns."""

    def __init__(self, pad_token_id: int, layout: str = "padded"):
        if layout not in ("padded", "tree"):
            raise ValueError(f"layout must be 'padded' or 'tree' for listwise data, got {layout!r}")
        self.pad_token_id = pad_token_id
        self.layout = layout

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        batch = self._tree(features) if self.layout == "tree" else self._padded(features)
        counts = [len(f[LISTWISE_TOKEN_COLUMN]) for f in features]
        mask = torch.arange(max(counts)).unsqueeze(0) < torch.tensor(counts).unsqueeze(1)
        batch.update({"completions_mask": mask, "scores": _ragged(features, "scores", mask),
                      "example_index": torch.tensor([f["example_index"] for f in features], dtype=torch.long)})
        if LISTWISE_REF_COLUMN in features[0]:
            batch[LISTWISE_REF_COLUMN] = _ragged(features, LISTWISE_REF_COLUMN, mask)
        return batch

    @staticmethod
    def _tree(features: list[dict]) -> dict:
        tree = build_branch_tree([list(f["prompt_input_ids"]) for f in features],
                                 [[list(y) for y in f[LISTWISE_TOKEN_COLUMN]] for f in features])
        return {"input_ids": tree.input_ids, "position_ids": tree.position_ids, "tree_pair_ids": tree.pair_ids,
                "tree_role_ids": tree.role_ids, "tree_position_offset": tree.position_offset,
                "tree_max_position": tree.max_position, "tree_pair_lengths": tree.pair_lengths,
                "kept_index": tree.row_index, "kept_labels": tree.labels, "kept_cu_seqlens": tree.cu_seqlens}

    def _padded(self, features: list[dict]) -> dict:
        sequences = [(list(f["prompt_input_ids"]), list(y)) for f in features for y in f[LISTWISE_TOKEN_COLUMN]]
        width = max(len(p) + len(y) for p, y in sequences)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(sequences), width), IGNORE_INDEX, dtype=torch.long)
        for row, (prompt, response) in enumerate(sequences):
            ids[row, :len(prompt) + len(response)] = torch.tensor(prompt + response)
            labels[row, len(prompt):len(prompt) + len(response)] = torch.tensor(response)
        # Labels of position t are the token t + 1 (the model predicts the next token): shift like kept_rows expects.
        shifted = F.pad(labels[:, 1:], (0, 1), value=IGNORE_INDEX)
        rows = kept_rows(shifted)
        lengths = torch.tensor([len(p) + len(y) for p, y in sequences])
        return {"input_ids": ids, "attention_mask": (torch.arange(width) < lengths.unsqueeze(1)).long(),
                "kept_index": rows.index, "kept_labels": rows.labels, "kept_cu_seqlens": rows.cu_seqlens}


def _ragged(features: list[dict], key: str, mask: torch.Tensor) -> torch.Tensor:
    """[B, K_max] float32 of a per-response column (0 where ``mask`` is False)."""
    out = torch.zeros(mask.shape, dtype=torch.float32)
    for row, feature in enumerate(features):
        values = list(feature[key])[: int(mask[row].sum())]
        out[row, :len(values)] = torch.tensor(values, dtype=torch.float32)
    return out


def scatter_rows(logps: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-sequence [Σ K_b] values → [B, K_max] (0 where ``mask`` is False), differentiable."""
    out = logps.new_zeros(mask.shape)
    return out.masked_scatter(mask.to(logps.device), logps)
