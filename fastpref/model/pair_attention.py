"""sdpa over a tree stream one pair at a time: the same attention, without the blocks the mask hides between pairs.

A tree stream's 4D mask never lets one pair see another (:mod:`fastpref.model.tree_stream`). With pair i's rows
[s_i, e_i) of the stream and P cached prefix columns (seen by every row),

    attn(Q, K, V, M)[s_i:e_i] = attn(Q[s_i:e_i], K[C_i], V[C_i], M[s_i:e_i, C_i]),   C_i = [0, P) ∪ [P+s_i, P+e_i)

exactly: every dropped column is masked out (weight exp(−inf) = 0). sdpa computes every block of a dense mask, so
one call over L rows costs ∝ L·(P+L) and the per-pair calls ∝ Σ_i (e_i−s_i)·(P+e_i−s_i): for B pairs of equal
length about B times less attention work (flex_attention's ``BlockMask`` skips those blocks on its own).

:func:`pairwise_sdpa` installs, for the duration of one forward, a transformers attention function for "sdpa" that
does this when it is handed that forward's tree mask, and defers to transformers' own sdpa otherwise (another mask,
attention dropout, a position bias, unexpected lengths), so anything it does not recognise runs as before.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence

import torch

from fastpref.model.attention import attention_implementation
from fastpref.model.prefix_kv import _is_checkpointing


def _pair_masks(attention_mask: torch.Tensor, lengths: Sequence[int], prefix_length: int) -> list[torch.Tensor]:
    """Per pair, the rows and columns C_i of the 4D ``attention_mask`` (contiguous, built once per forward)."""
    masks, start = [], 0
    for length in lengths:
        rows = attention_mask[:, :, start:start + length]
        own = rows[..., prefix_length + start:prefix_length + start + length]
        masks.append(torch.cat([rows[..., :prefix_length], own], dim=-1) if prefix_length else own.contiguous())
        start += length
    return masks


def _pair_keys(states: torch.Tensor, lengths: Sequence[int], prefix_length: int) -> list[torch.Tensor]:
    """Per pair, the key (or value) states of columns C_i: the prefix's, then the pair's own."""
    own = states[:, :, prefix_length:].split(list(lengths), dim=2)
    if not prefix_length:
        return list(own)
    prefix = states[:, :, :prefix_length]
    return [torch.cat([prefix, part], dim=2) for part in own]


@contextlib.contextmanager
def pairwise_sdpa(model: torch.nn.Module, attention_mask, pair_lengths: Sequence[int],
                  prefix_length: int = 0) -> Iterator[None]:
    """Inside the block, sdpa attention of ``model`` handed ``attention_mask`` runs pair by pair (see module doc).

    Args:
        model: the transformers model (or its peft wrapper) about to run one forward over a tree stream.
        attention_mask: that forward's 4D boolean tree mask [1, 1, L, prefix_length + L].
        pair_lengths: the stream rows of each pair, in stream order (Python ints summing to L).
        prefix_length: cached prefix columns every row sees.

    A no-op unless the model's attention is transformers' own sdpa (not a registered replacement), the stream
    holds at least two pairs and the mask is a tensor of the expected shape; and under gradient checkpointing
    with grad enabled, whose recomputation in the backward runs after this block (dense there, so the saved
    tensors would not match). The registry is restored on exit.
    """
    from transformers.integrations.sdpa_attention import sdpa_attention_forward
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    lengths = [int(n) for n in pair_lengths]
    total = sum(lengths)
    if (len(lengths) < 2 or not isinstance(attention_mask, torch.Tensor)
            or tuple(attention_mask.shape[-2:]) != (total, prefix_length + total)
            or attention_implementation(model) != "sdpa"
            or ALL_ATTENTION_FUNCTIONS["sdpa"] is not sdpa_attention_forward
            or (torch.is_grad_enabled() and _is_checkpointing(model))):
        yield
        return
    masks = _pair_masks(attention_mask, lengths, prefix_length)

    def attention(module, query, key, value, mask, dropout=0.0, **kwargs):
        if (mask is not attention_mask or dropout or kwargs.get("position_bias") is not None
                or query.shape[2] != total or key.shape[2] != prefix_length + total):
            return sdpa_attention_forward(module, query, key, value, mask, dropout=dropout, **kwargs)
        pieces = zip(query.split(lengths, dim=2), _pair_keys(key, lengths, prefix_length),
                     _pair_keys(value, lengths, prefix_length), masks)
        outs = [sdpa_attention_forward(module, q, k, v, m, dropout=0.0, **kwargs)[0] for q, k, v, m in pieces]
        return torch.cat(outs, dim=1), None  # [1, L, heads, head_dim], as transformers' sdpa returns it

    ALL_ATTENTION_FUNCTIONS["sdpa"] = attention  # this instance's local entry, over the global one
    try:
        yield
    finally:
        del ALL_ATTENTION_FUNCTIONS["sdpa"]
