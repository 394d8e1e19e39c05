"""The trainer's collator: D1's packed :class:`fastpref.trainer.packing.PreferenceCollator`, plus, per token stream, the
completion rows the fused head reads (found here on the CPU so the training step never syncs with the device).

Per stream (``""`` plain, ``"aug_"`` the refinement-prompt stream) the batch holds
``{s}input_ids`` and ``{s}position_ids`` [1, L] (packed) or ``{s}input_ids``/``{s}attention_mask`` [2B, T]
(``padding_free=False``), and ``{s}kept_index``, ``{s}kept_labels``, ``{s}kept_cu_seqlens`` (see
:class:`fastpref.model.head.KeptRows`), with ``{s}kept_token_weights`` [n] when the features carry
``chosen_token_weights``/``rejected_token_weights`` (:mod:`fastpref.data.token_weights`; None on a row: weight 1)
or LD-DPO's ``ld_alpha`` is set (both: their product). Every stream scores the same responses, so the weights
are the same in the plain and the augmented stream.
Per-pair columns (scores, τ, offsets, reference log-probs, ``example_index``) pass through unchanged.

With ``aug_prefix`` (the token ids every augmented prompt starts with: the refinement prompt p, whose keys and
values the trainer computes once, :mod:`fastpref.model.prefix_kv`), the augmented stream holds only what follows p:
padded ``aug_input_ids`` [2B, T], ``aug_position_ids`` = P + t, and ``aug_attention_mask`` [2B, P + T] whose
first P columns (the cached prefix) are visible to every row.

With ``layout="tree"`` each stream is one tree-packed row (:mod:`fastpref.model.tree_stream`: every pair as
[x, y_w, y_l], the prompt once): ``{s}input_ids``/``{s}position_ids`` [1, L], ``{s}tree_pair_ids`` and
``{s}tree_role_ids`` [L] (from which the trainer builds the 4D mask on the device), ``{s}tree_position_offset``
and ``{s}tree_max_position`` (Python ints), ``{s}tree_pair_lengths`` (a tuple of ints: each pair's rows, for
sdpa pair by pair, :mod:`fastpref.model.pair_attention`), and the kept rows (the prompt's last row twice). With
``aug_prefix`` the augmented tree holds what follows p, its positions starting at P.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from fastpref.data.token_weights import SIDES, TOKEN_WEIGHT_COLUMNS, checked_token_weights
from fastpref.data.tokenization import strip_prefix
from fastpref.logps.inputs import IGNORE_INDEX
from fastpref.model.head import KeptRows, kept_rows
from fastpref.model.tree_stream import TreeBatch, build_tree_batch
from fastpref.trainer.packing import PreferenceCollator, _token_list

STREAM_PREFIXES = ("", "aug_")
#: How a micro-batch reaches the model (``PreferenceConfig.stream_layout`` adds "auto").
STREAM_LAYOUTS = ("padded", "packed", "tree")
_PACKED_STREAM_KEYS = frozenset(f"{prefix}{key}" for prefix in STREAM_PREFIXES
                                for key in ("input_ids", "position_ids", "labels", "cu_seqlens"))


def ld_token_weights(cu_seqlens: torch.Tensor, ld_alpha: float) -> torch.Tensor:
    """LD-DPO (arXiv 2409.06411) weights of the kept rows: 1 on the first ``min(|y_w|, |y_l|)`` response tokens of
    both responses of a pair, ``ld_alpha`` on the longer response's tail. ``cu_seqlens`` [2B+1], chosen first."""
    counts = cu_seqlens[1:] - cu_seqlens[:-1]
    pairs = counts.numel() // 2
    shared = torch.minimum(counts[:pairs], counts[pairs:]).repeat(2)
    position = torch.arange(int(cu_seqlens[-1])) - torch.repeat_interleave(cu_seqlens[:-1], counts)
    in_tail = position >= torch.repeat_interleave(shared, counts)
    return torch.where(in_tail, torch.tensor(ld_alpha), torch.tensor(1.0)).float()


def column_token_weights(features: list[dict]) -> torch.Tensor | None:
    """The features' ``{side}_token_weights`` in kept-row order (every chosen response, then every rejected one)
    as float32 [n], or None when no feature has any; a ValueError naming the feature for a length mismatch."""
    if not any(f.get(column) is not None for f in features for column in TOKEN_WEIGHT_COLUMNS):
        return None
    weights: list[float] = []
    for side, column in zip(SIDES, TOKEN_WEIGHT_COLUMNS, strict=True):
        for i, feature in enumerate(features):
            length = len(_token_list(feature, f"{side}_input_ids", i))
            given = feature.get(column)
            try:
                weights += [1.0] * length if given is None else checked_token_weights(given, length, column)
            except ValueError as error:
                raise ValueError(f"feature {i}: {error}") from error
    return torch.tensor(weights, dtype=torch.float32)


def _padded(input_ids: torch.Tensor, labels: torch.Tensor, cu_seqlens: torch.Tensor, pad_token_id: int,
            multiple: int | None = None):
    """Unpack a [1, L] stream into right-padded [S, T] input_ids, attention_mask and labels (T rounded up to a
    multiple of ``multiple`` when given)."""
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).tolist()
    width = max(lengths)
    if multiple is not None:
        width = -(-width // multiple) * multiple
    pieces = zip(input_ids[0].split(lengths), labels[0].split(lengths), strict=True)
    ids, mask, labs = [], [], []
    for seq_ids, seq_labels in pieces:
        pad = width - seq_ids.numel()
        ids.append(F.pad(seq_ids, (0, pad), value=pad_token_id))
        mask.append(F.pad(torch.ones_like(seq_ids), (0, pad)))
        labs.append(F.pad(seq_labels, (0, pad), value=IGNORE_INDEX))
    return torch.stack(ids), torch.stack(mask), torch.stack(labs)


class StepCollator:
    """Collate tokenized pairs into the trainer's batch (module docstring). Picklable for dataloader workers."""

    def __init__(self, pad_token_id: int, *, with_augmented: bool = False, padding_free: bool = True,
                 ld_alpha: float | None = None, aug_prefix: tuple[int, ...] | None = None, layout: str | None = None,
                 pad_to_multiple_of: int | None = None):
        """``layout``: "padded", "packed" or "tree"; None: "packed" if ``padding_free`` else "padded".
        ``pad_to_multiple_of``: padded streams' width rounded up to a multiple of it (TRL's field)."""
        layout = layout or ("packed" if padding_free else "padded")
        if layout not in STREAM_LAYOUTS:
            raise ValueError(f"layout must be one of {STREAM_LAYOUTS}, got {layout!r}")
        if not isinstance(pad_token_id, int) or isinstance(pad_token_id, bool):
            raise TypeError(f"pad_token_id must be an int, got {type(pad_token_id).__name__}")
        # The tree layout takes only the per-pair columns from the packer.
        self.packer = PreferenceCollator(with_augmented=with_augmented and layout != "tree")
        self.pad_token_id = pad_token_id
        self.with_augmented = with_augmented
        self.layout = layout
        self.padding_free = layout != "padded"
        self.ld_alpha = ld_alpha
        self.aug_prefix = tuple(aug_prefix) if aug_prefix else None
        if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int or None, got {pad_to_multiple_of!r}")
        self.pad_to_multiple_of = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, torch.Tensor]:
        if self.with_augmented and self.aug_prefix is not None:
            stripped = strip_prefix([f["aug_prompt_input_ids"] for f in features], self.aug_prefix)
            features = [{**f, "aug_prompt_input_ids": aug} for f, aug in zip(features, stripped, strict=True)]
        packed = self.packer(features)
        column_weights = column_token_weights(features)
        batch = {key: value for key, value in packed.items() if key not in _PACKED_STREAM_KEYS}
        batch["num_tokens"] = torch.tensor(sum(2 * len(f["prompt_input_ids"]) + len(f["chosen_input_ids"])
                                               + len(f["rejected_input_ids"]) for f in features))
        for prefix in STREAM_PREFIXES[: 2 if self.with_augmented else 1]:
            batch.update(self._tree_stream(prefix, features, column_weights) if self.layout == "tree"
                         else self._stream(prefix, packed, column_weights))
        return batch

    def _token_weights(self, rows: KeptRows, column_weights: torch.Tensor | None) -> torch.Tensor | None:
        """The kept rows' token weights: the dataset's, times LD-DPO's; None when neither is given."""
        if column_weights is not None and column_weights.numel() != rows.labels.numel():
            raise ValueError(f"token weights: {column_weights.numel()} for {rows.labels.numel()} scored tokens")
        if self.ld_alpha is None:
            return column_weights
        ld_weights = ld_token_weights(rows.cu_seqlens, self.ld_alpha)
        return ld_weights if column_weights is None else ld_weights * column_weights

    def _tree_stream(self, prefix: str, features: list[dict], column_weights: torch.Tensor | None) -> dict:
        offset = len(self.aug_prefix) if prefix == "aug_" and self.aug_prefix is not None else 0
        tree = build_tree_batch(*([_token_list(f, key, i) for i, f in enumerate(features)]
                                  for key in (f"{prefix}prompt_input_ids", "chosen_input_ids", "rejected_input_ids")),
                                position_offset=offset)
        out = {f"{prefix}input_ids": tree.input_ids, f"{prefix}position_ids": tree.position_ids,
               f"{prefix}tree_pair_ids": tree.pair_ids, f"{prefix}tree_role_ids": tree.role_ids,
               f"{prefix}tree_position_offset": tree.position_offset,
               f"{prefix}tree_max_position": tree.max_position,
               f"{prefix}tree_pair_lengths": tree.pair_lengths}
        rows = KeptRows(index=tree.row_index, labels=tree.labels, cu_seqlens=tree.cu_seqlens)
        out.update(_rows_dict(prefix, rows))
        weights = self._token_weights(rows, column_weights)
        if weights is not None:
            out[f"{prefix}kept_token_weights"] = weights
        return out

    def _stream(self, prefix: str, packed: dict, column_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
        input_ids, labels = packed[f"{prefix}input_ids"], packed[f"{prefix}labels"]
        cu_seqlens = packed[f"{prefix}cu_seqlens"]
        if prefix == "aug_" and self.aug_prefix is not None:
            # After a cached prefix of P tokens: padded rows at positions P.., the mask shows the prefix to all.
            ids, mask, padded_labels = _padded(input_ids, labels, cu_seqlens, self.pad_token_id,
                                               self.pad_to_multiple_of)
            rows, length = kept_rows(padded_labels), len(self.aug_prefix)
            out = {"aug_input_ids": ids,
                   "aug_attention_mask": torch.cat([torch.ones(ids.shape[0], length, dtype=mask.dtype), mask], 1),
                   "aug_position_ids": (torch.arange(ids.shape[1]) + length).expand_as(ids).contiguous()}
        elif self.padding_free:
            rows = kept_rows(labels, cu_seqlens)
            out = {f"{prefix}input_ids": input_ids, f"{prefix}position_ids": packed[f"{prefix}position_ids"]}
        else:
            ids, mask, padded_labels = _padded(input_ids, labels, cu_seqlens, self.pad_token_id,
                                               self.pad_to_multiple_of)
            rows = kept_rows(padded_labels)
            out = {f"{prefix}input_ids": ids, f"{prefix}attention_mask": mask}
        out.update(_rows_dict(prefix, rows))
        weights = self._token_weights(rows, column_weights)
        if weights is not None:
            out[f"{prefix}kept_token_weights"] = weights
        return out


def _rows_dict(prefix: str, rows: KeptRows) -> dict[str, torch.Tensor]:
    return {f"{prefix}kept_index": rows.index, f"{prefix}kept_labels": rows.labels,
            f"{prefix}kept_cu_seqlens": rows.cu_seqlens}


def rows_from_batch(batch: dict, prefix: str = "") -> KeptRows:
    """The :class:`KeptRows` of stream ``prefix`` stored in a collated batch."""
    return KeptRows(index=batch[f"{prefix}kept_index"], labels=batch[f"{prefix}kept_labels"],
                    cu_seqlens=batch[f"{prefix}kept_cu_seqlens"])


def tree_from_batch(batch: dict, prefix: str = "") -> TreeBatch:
    """The :class:`fastpref.model.tree_stream.TreeBatch` of stream ``prefix`` stored in a collated tree-layout batch."""
    cu_seqlens = batch[f"{prefix}kept_cu_seqlens"]
    return TreeBatch(input_ids=batch[f"{prefix}input_ids"], position_ids=batch[f"{prefix}position_ids"],
                     pair_ids=batch[f"{prefix}tree_pair_ids"], role_ids=batch[f"{prefix}tree_role_ids"],
                     row_index=batch[f"{prefix}kept_index"], labels=batch[f"{prefix}kept_labels"],
                     cu_seqlens=cu_seqlens, num_pairs=(cu_seqlens.shape[0] - 1) // 2,
                     position_offset=batch[f"{prefix}tree_position_offset"],
                     max_position=batch[f"{prefix}tree_max_position"],
                     pair_lengths=tuple(batch.get(f"{prefix}tree_pair_lengths", ())))
