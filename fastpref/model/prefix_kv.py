"""The shared refinement prefix p, its keys/values computed once and reused by every augmented stream.

Sr-DPO's augmented sequences are [p ⊕ x, y] with the same p for every pair. p's keys and values depend only on
the weights, so they are computed once per optimizer step for the policy (and once per precompute for the
reference), with no activations kept:

    prefix = compute_prefix_kv(model, prefix_ids)               # eval + inference mode, adapters as they are
    for micro_batch in step:                                     # each augmented tree stream
        tree_logps(model, aug_tree, prefix=prefix)               # a fresh DynamicCache per call (prefix.fresh_cache)

The augmented tree is the plain tree of the pairs' remaining prompt tokens, positions shifted by |p|
(``build_tree_batch(..., position_offset=prefix.length)``), batch 1, with the 4D mask whose first |p| columns are
visible to every row. A fresh cache per call matters: transformers appends the new keys to the cache it is given.

transformers 5.23 facts this relies on (verified by tests/test_prefix_kv.py and tests/test_tree_stream.py): a
4D mask is used as given when a cache is passed (packing by position_ids is not:
:class:`fastpref.model.attention.PackedCacheError`); a ``DynamicCache`` built from stored tensors concatenates rather
than writes in place, so the stored prefix is never modified; gradient checkpointing in train mode drops the
cache with only a warning (what follows depends on the model: Llama then fails on the mask's shape), so the
cached passes run in eval mode (:func:`frozen_forward`) and a train-mode checkpointed model with a cache is
refused (:class:`CheckpointedCacheError`).

Sharded weights: under FSDP2 (``fully_shard``) pass the sharded module itself (what accelerate's
``unwrap_model`` returns, FSDP2 wraps in place): its forward hooks unshard each block. DeepSpeed ZeRO-3
partitions every parameter (each carries a ``ds_id``); :func:`compute_prefix_kv` then gathers them for the
prefix pass (:func:`gathered_parameters`), outside inference mode, before its forward; and
:func:`frozen_forward` uses ``torch.no_grad`` for such models (ZeRO-3's hooks rewrite ``param.data``, which
inference mode would turn into inference tensors that DeepSpeed's backward hooks cannot use).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache
from transformers.cache_utils import DynamicLayer, DynamicSlidingWindowLayer

from fastpref.model.attention import UnsafeAttentionError


class CheckpointedCacheError(UnsafeAttentionError):
    """Gradient checkpointing in train mode replaces past_key_values by None in every layer (with a warning
    only): the prefix is ignored, and what follows depends on the model (Llama fails on the mask's shape)."""


def _is_checkpointing(model: torch.nn.Module) -> bool:
    return any(getattr(module, "gradient_checkpointing", False) and module.training for module in model.modules())


def check_cache_forward(model: torch.nn.Module) -> None:
    """Raise :class:`CheckpointedCacheError` if a forward of ``model`` with a KV cache would drop the cache."""
    if _is_checkpointing(model):
        raise CheckpointedCacheError(
            "gradient checkpointing in train mode drops past_key_values; run cached passes under "
            "fastpref.model.prefix_kv.frozen_forward(model) (eval + inference mode)")


def _zero3_partitioned(model: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters DeepSpeed ZeRO-3 partitioned (it tags each with ``ds_id``)."""
    return [p for p in model.parameters() if hasattr(p, "ds_id")]


def gathered_parameters(model: torch.nn.Module) -> contextlib.AbstractContextManager:
    """Whole ZeRO-3-partitioned parameters of ``model`` inside the block (read-only), else a no-op.

    DeepSpeed marks partitioned parameters with ``ds_id``; ``deepspeed.zero.GatheredParameters`` all-gathers
    them (every rank holds the full weights for the block) and frees the copies on exit."""
    partitioned = _zero3_partitioned(model)
    if not partitioned:
        return contextlib.nullcontext()
    import deepspeed

    return deepspeed.zero.GatheredParameters(partitioned, modifier_rank=None)


@contextlib.contextmanager
def frozen_forward(model: torch.nn.Module) -> Iterator[None]:
    """Eval mode (each module's previous training flag restored on exit) and ``torch.inference_mode``.

    For passes that need no gradient: no dropout, no activations kept, and gradient checkpointing (which only
    acts in train mode) leaves a KV cache alone. ``torch.no_grad`` instead of inference mode for ZeRO-3
    partitioned models. peft adapters stay as they are: wrap in
    ``model.disable_adapter()`` for the reference.
    """
    previous = [(module, module.training) for module in model.modules()]
    model.eval()
    # ZeRO-3 hooks assign each parameter's gathered and released data inside the forward: under inference mode
    # those become inference tensors, and DeepSpeed's backward hooks then fail on them (no grad_fn).
    no_grad = torch.no_grad() if _zero3_partitioned(model) else torch.inference_mode()
    try:
        with no_grad:
            yield
    finally:
        for module, training in previous:
            module.training = training


@dataclass(frozen=True)
class PrefixKV:
    """Keys and values of a shared prefix, per layer [1, kv_heads, |p|, head_dim], computed without grad.

    prefix_ids: the prefix's token ids (so a stream can check it was built for this prefix).
    """

    key_values: tuple[tuple[torch.Tensor, torch.Tensor], ...]
    prefix_ids: tuple[int, ...]

    @property
    def length(self) -> int:
        return len(self.prefix_ids)

    def fresh_cache(self) -> DynamicCache:
        """A new ``DynamicCache`` holding the prefix; the model's forward extends it without touching this object."""
        return DynamicCache(ddp_cache_data=self.key_values)


def compute_prefix_kv(model: torch.nn.Module, prefix_ids: Sequence[int]) -> PrefixKV:
    """Run ``model`` once over the prefix (eval + inference mode) and keep its keys/values.

    Works for plain and peft-wrapped models (adapters as they are). Models whose cache would not hold the whole
    prefix (a sliding window shorter than it, recurrent or non-attention layers) are refused. ZeRO-3
    partitioned weights are gathered for the pass; FSDP2 modules unshard through their own hooks.
    """
    ids = tuple(prefix_ids)
    if len(ids) == 0:
        raise ValueError("prefix_ids is empty: nothing to cache")
    if any(not isinstance(t, int) or isinstance(t, bool) or t < 0 for t in ids):
        raise ValueError("prefix_ids must hold non-negative Python ints (token ids)")
    device = next(model.parameters()).device
    input_ids = torch.tensor([ids], dtype=torch.long, device=device)
    with gathered_parameters(model), frozen_forward(model):
        cache = DynamicCache(config=model.config)
        model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
    # Sliding-window layers hold the whole prefix while it is shorter than the window; the streams after it are
    # bounded by the window too (SlidingWindowTreeError), so plain growing layers then reproduce them exactly.
    kinds = {type(layer) for layer in cache.layers}
    if not kinds <= {DynamicLayer, DynamicSlidingWindowLayer} or any(
            layer.keys.shape[-2] != len(ids) for layer in cache.layers):
        names = sorted(kind.__name__ for kind in kinds)
        raise ValueError(f"prefix caching needs attention layers that keep the whole prefix ({len(ids)} tokens); "
                         f"this model's cache has {names}")
    return PrefixKV(key_values=tuple((layer.keys, layer.values) for layer in cache.layers), prefix_ids=ids)


class StepPrefixKV:
    """The policy's prefix keys/values, recomputed once per optimizer step and reused by its micro-batches.

        prefixes = StepPrefixKV(prefix_ids)
        prefix = prefixes.get(model, state.global_step)   # in every micro-batch; recomputes when the step changes
    """

    def __init__(self, prefix_ids: Sequence[int]):
        self.prefix_ids = tuple(prefix_ids)
        self._step: int | None = None
        self._prefix: PrefixKV | None = None

    def get(self, model: torch.nn.Module, step: int) -> PrefixKV:
        if self._prefix is None or step != self._step:
            self._prefix = compute_prefix_kv(model, self.prefix_ids)
            self._step = step
        return self._prefix
