"""Attention setups that transformers runs without error but computes wrongly, refused by name.

:func:`check_attention_inputs` raises an :class:`UnsafeAttentionError` subclass (each class says what would go
wrong) for a forward whose mask, position_ids, cache and attention implementation would mix sequences;
:func:`attention_implementation` names a model's attention; :func:`positions_are_tree` /
:func:`positions_are_packed` read CPU position ids.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from fastpref.model.tree_stream import TreeBatch


class UnsafeAttentionError(ValueError):
    """A forward configuration that transformers would run silently and wrongly."""


class EagerBooleanMaskError(UnsafeAttentionError):
    """Eager attention ADDS the 4D mask to the scores: a boolean mask adds 1/0 instead of masking (no error)."""


class TreeWithoutMaskError(UnsafeAttentionError):
    """A tree stream passed with position_ids alone: transformers only splits sequences where positions restart
    at 0, so y_l (positions continuing from x) would attend to y_w."""


class FlashAttentionTreeError(UnsafeAttentionError):
    """flash_attention_2/3 ignore a custom 4D mask (they derive sequences from position_ids or a 2D padding
    mask), so a tree cannot be expressed with stock flash attention."""


class PackedCacheError(UnsafeAttentionError):
    """Packing by position_ids with a KV cache: transformers turns packed-sequence detection off when a cache
    is given, so the packed sequences would attend to each other."""


class SlidingWindowTreeError(UnsafeAttentionError):
    """A custom 4D mask replaces the sliding-window mask on every layer; sequences longer than the window would
    see too far back."""


def attention_implementation(model: torch.nn.Module) -> str:
    """The attention implementation name of a (possibly peft-wrapped) transformers model."""
    config = getattr(model, "config", None)
    name = getattr(config, "_attn_implementation", None)
    if name is None:
        raise TypeError(f"{type(model).__name__} has no config._attn_implementation: not a transformers model")
    return name


def positions_are_tree(position_ids: torch.Tensor) -> bool:
    """Whether packed ``position_ids`` [1, L] jump to a non-zero value somewhere (a tree, not plain packing).

    Reads tensor values: call it on CPU tensors (in the collator), not in the training step.
    """
    flat = position_ids.reshape(-1)
    jumps = flat[1:] != flat[:-1] + 1
    return bool((jumps & (flat[1:] != 0)).any())


def positions_are_packed(position_ids: torch.Tensor) -> bool:
    """Whether ``position_ids`` [1, L] restart somewhere (several sequences in one row). CPU-side, like above."""
    flat = position_ids.reshape(-1)
    return bool((flat[1:] != flat[:-1] + 1).any())


def _sliding_window(config) -> int | None:
    window = getattr(config, "sliding_window", None)
    if window is None:
        return None
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None and "sliding_attention" not in layer_types:
        return None
    if getattr(config, "use_sliding_window", True) is False:
        return None
    return int(window)


def check_attention_inputs(model: torch.nn.Module, *, attention_mask, position_ids: torch.Tensor | None,
                           past_key_values=None, tree: TreeBatch | None = None) -> None:
    """Refuse, by a named :class:`UnsafeAttentionError`, forwards that transformers 5.23 would get silently wrong.

    ``tree`` is the :class:`TreeBatch` the inputs come from (None for a plain stream). Values of
    ``position_ids`` are only read when they live on the CPU (no host sync on an accelerator).
    """
    name = attention_implementation(model)
    is_4d = attention_mask is not None and len(attention_mask.shape) == 4
    if name == "eager" and is_4d and isinstance(attention_mask, torch.Tensor) and attention_mask.dtype == torch.bool:
        raise EagerBooleanMaskError(
            "eager attention adds the 4D attention_mask to the scores, so a boolean mask is silently wrong; pass "
            "an additive float mask (tree_additive_mask) or use attn_implementation='sdpa'")
    if (past_key_values is not None and attention_mask is None and position_ids is not None
            and (tree is not None or (position_ids.device.type == "cpu" and positions_are_packed(position_ids)))):
        raise PackedCacheError(
            "position_ids packing is ignored when a KV cache is given (the packed sequences would see each "
            "other); pass a 4D attention_mask")
    is_tree = tree is not None or (attention_mask is None and position_ids is not None
                                   and position_ids.device.type == "cpu" and positions_are_tree(position_ids))
    if is_tree and "flash" in name:
        raise FlashAttentionTreeError(
            f"attn_implementation={name!r} cannot express a tree (stock flash attention ignores custom 4D masks)")
    if is_tree and attention_mask is None:
        raise TreeWithoutMaskError(
            "a tree stream needs its 4D attention_mask (attention_mask_for): position_ids alone only separate "
            "sequences that restart at 0, so y_l would attend to y_w")
    if tree is not None:
        window = _sliding_window(getattr(model, "config", None))
        if window is not None and tree.max_position > window:
            raise SlidingWindowTreeError(
                f"the model attends through a sliding window of {window} tokens, and a custom 4D mask replaces "
                f"it; this stream reaches position {tree.max_position - 1}")
