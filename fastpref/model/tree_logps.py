"""Per-sequence chosen/rejected log-probs of a tree-packed stream, optionally after a cached shared prefix.

One forward of the causal LM over the tree stream (:mod:`fastpref.model.tree_stream`) with its 4D mask and explicit
position_ids (sdpa attention pair by pair, :mod:`fastpref.model.pair_attention`); the model's ``lm_head`` is
replaced for the call by :func:`fastpref.linear_logps` over the gathered rows ``tree.row_index`` (the prompt's
last row twice), so no [rows, vocab] logits exist and no transformer work is repeated:

    chosen_logps[i]   = Σ_j log p(y_w,i[j] | x_i, y_w,i[<j])
    rejected_logps[i] = Σ_j log p(y_l,i[j] | x_i, y_l,i[<j])

With ``prefix`` (a :class:`fastpref.model.prefix_kv.PrefixKV`), the stream continues that prefix: a fresh cache holds
its keys/values and the mask shows its columns to every row (the augmented Sr-DPO pass, see
:func:`augmented_tree_logps`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
from transformers import DynamicCache

from fastpref.model.head import KeptRows, stream_logps
from fastpref.model.pair_attention import pairwise_sdpa
from fastpref.model.prefix_kv import PrefixKV, check_cache_forward, frozen_forward
from fastpref.model.attention import check_attention_inputs
from fastpref.model.tree_stream import TreeBatch, attention_mask_for


class TreeLogps(NamedTuple):
    """Per-pair log-probs of a tree stream: each [B] (float32 sums, int64 scored-token counts)."""

    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor
    chosen_counts: torch.Tensor
    rejected_counts: torch.Tensor


def tree_logps(model: torch.nn.Module, tree: TreeBatch, *, prefix: PrefixKV | None = None, attention_mask=None,
               backend: str | None = None) -> TreeLogps:
    """Chosen and rejected log-probs of every pair of ``tree`` from one forward of ``model``.

    Args:
        model: a transformers causal LM (plain or peft-wrapped), attn_implementation sdpa, eager or
            flex_attention (flash attention cannot express the tree and is refused).
        tree: the micro-batch, on the model's device. With ``prefix``, built with
            ``position_offset=prefix.length``.
        prefix: cached keys/values of a shared prefix the stream continues; only without gradient (a gradient
            would miss the prefix's share), else ValueError.
        attention_mask: the tree mask when already built (e.g. a BlockMask made once); built here otherwise.
        backend: log-prob kernel backend (see :func:`fastpref.linear_logps`).

    Differentiable with respect to the model's parameters (through the hidden rows; a row gathered twice gets
    the sum of both gradients) unless called under inference mode.
    """
    attention_mask, past_key_values = tree_forward_inputs(model, tree, prefix=prefix, attention_mask=attention_mask)
    rows = KeptRows(index=tree.row_index, labels=tree.labels, cu_seqlens=tree.cu_seqlens)
    with pairwise_sdpa(model, attention_mask, tree.pair_lengths, tree.position_offset):
        out = stream_logps(model, tree.input_ids, rows, position_ids=tree.position_ids, attention_mask=attention_mask,
                           past_key_values=past_key_values, backend=backend)
    logps, counts = out.logps, out.counts
    b = tree.num_pairs
    return TreeLogps(chosen_logps=logps[:b], rejected_logps=logps[b:], chosen_counts=counts[:b],
                     rejected_counts=counts[b:])


def tree_forward_inputs(model: torch.nn.Module, tree: TreeBatch, *, prefix: PrefixKV | None = None,
                        attention_mask=None) -> tuple[object, DynamicCache | None]:
    """The ``attention_mask`` (the tree mask in the form ``model``'s attention reads) and ``past_key_values`` (a fresh
    cache holding ``prefix``, or None) of a forward over ``tree``, after refusing unsafe combinations by name
    (:func:`fastpref.model.attention.check_attention_inputs`; a cached prefix with gradient enabled is a ValueError).

    ``model`` is the transformers model itself (or its peft wrapper), whose ``config`` names the attention.
    """
    if prefix is not None and torch.is_grad_enabled():
        raise ValueError("a cached prefix carries no gradient, so a step through it would silently miss the prefix's "
                         "share; use augmented_tree_logps (or call under torch.no_grad())")
    prefix_length = 0 if prefix is None else prefix.length
    if tree.position_offset != prefix_length:
        raise ValueError(f"tree.position_offset={tree.position_offset} must equal the cached prefix length "
                         f"{prefix_length} (build_tree_batch(..., position_offset=prefix.length))")
    if attention_mask is None:
        attention_mask = attention_mask_for(model, tree, prefix_length=prefix_length)
    past_key_values = None if prefix is None else prefix.fresh_cache()
    check_attention_inputs(model, attention_mask=attention_mask, position_ids=tree.position_ids,
                           past_key_values=past_key_values, tree=tree)
    if past_key_values is not None:
        check_cache_forward(model)
    return attention_mask, past_key_values


def augmented_tree_logps(model: torch.nn.Module, aug_tree: TreeBatch, prefix: PrefixKV, *,
                         attention_mask=None, backend: str | None = None) -> TreeLogps:
    """The augmented (Sr-DPO) pass: ``aug_tree`` after the cached ``prefix``, eval + inference mode, no grad.

    ``prefix`` must come from the same weights and adapter state (the policy's once per optimizer step, the
    reference's once per precompute: wrap both calls in ``model.disable_adapter()`` for a peft reference).
    """
    with frozen_forward(model):
        out = tree_logps(model, aug_tree, prefix=prefix, attention_mask=attention_mask, backend=backend)
    return TreeLogps(*(t.clone() for t in out))  # [B]-sized copies that are not inference tensors
