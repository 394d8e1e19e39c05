"""sdpa pair by pair over a tree stream (fastpref.model.pair_attention): the per-pair calls are what runs, they give
the dense mask's log-probs and gradients (plain and after a cached prefix), and anything else falls back to
transformers' sdpa with the registry left as it was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from fastpref.model.pair_attention import pairwise_sdpa
from fastpref.model.prefix_kv import compute_prefix_kv
from fastpref.model.tree_logps import augmented_tree_logps, tree_logps
from fastpref.model.tree_stream import attention_mask_for, build_branch_tree, build_tree_batch
from tree_oracle import assert_grads_close, parameter_grads, random_ids, tiny_model

BACKEND = "torch"


@pytest.fixture
def sdpa_queries(monkeypatch):
    """The query lengths of every F.scaled_dot_product_attention call."""
    seen, real = [], F.scaled_dot_product_attention

    def spy(query, *args, **kwargs):
        seen.append(query.shape[-2])
        return real(query, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    return seen


def _pairs(seed):
    g = torch.Generator().manual_seed(seed)
    return random_ids(g, [5, 1, 9]), random_ids(g, [4, 7, 2]), random_ids(g, [6, 3, 5]), g


def test_pair_lengths_of_both_layouts():
    assert build_tree_batch([[1, 2], [3]], [[4], [5, 6]], [[7, 8, 9], [1]]).pair_lengths == (6, 4)
    assert build_branch_tree([[1], [2, 3]], [[[4], [5, 6]], [[7]]]).pair_lengths == (4, 3)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_pairwise_equals_dense_and_is_what_runs(name, lora, sdpa_queries):
    model = tiny_model(name, lora=lora)
    prompts, chosen, rejected, g = _pairs(5)
    tree = build_tree_batch(prompts, chosen, rejected)
    upstream = torch.randn(2, 3, generator=g)
    results = {}
    for label, batch in (("pairwise", tree), ("dense", dataclasses.replace(tree, pair_lengths=()))):
        sdpa_queries.clear()
        model.zero_grad(set_to_none=True)
        out = tree_logps(model, batch, backend=BACKEND)
        (out.chosen_logps @ upstream[0] + out.rejected_logps @ upstream[1]).backward()
        results[label] = out, parameter_grads(model), list(sdpa_queries)
    layers = model.config.num_hidden_layers
    assert results["pairwise"][2] == list(tree.pair_lengths) * layers  # one call per pair and layer
    assert results["dense"][2] == [tree.length] * layers
    for field in ("chosen_logps", "rejected_logps"):
        torch.testing.assert_close(getattr(results["pairwise"][0], field), getattr(results["dense"][0], field),
                                   rtol=1e-5, atol=1e-5)
    assert_grads_close(results["pairwise"][1], results["dense"][1])
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_pairwise_after_a_cached_prefix_equals_dense(sdpa_queries):
    model = tiny_model("tiny-llama", lora=True)
    prompts, chosen, rejected, g = _pairs(8)
    prefix = compute_prefix_kv(model, random_ids(g, [7])[0])
    aug = build_tree_batch(prompts, chosen, rejected, position_offset=7)
    sdpa_queries.clear()
    fast = augmented_tree_logps(model, aug, prefix, backend=BACKEND)
    assert sdpa_queries == list(aug.pair_lengths) * model.config.num_hidden_layers
    slow = augmented_tree_logps(model, dataclasses.replace(aug, pair_lengths=()), prefix, backend=BACKEND)
    torch.testing.assert_close(fast.chosen_logps, slow.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(fast.rejected_logps, slow.rejected_logps, rtol=1e-5, atol=1e-5)


def test_other_masks_eager_and_one_pair_run_dense(sdpa_queries):
    model = tiny_model("tiny-llama")
    prompts, chosen, rejected, _ = _pairs(3)
    tree = build_tree_batch(prompts, chosen, rejected)
    mask = attention_mask_for(model, tree)
    with torch.no_grad(), pairwise_sdpa(model, mask, tree.pair_lengths):
        inside = model(input_ids=tree.input_ids, position_ids=tree.position_ids, attention_mask=mask.clone()).logits
    assert sdpa_queries == [tree.length] * model.config.num_hidden_layers  # not this forward's mask: dense
    with torch.no_grad():
        outside = model(input_ids=tree.input_ids, position_ids=tree.position_ids, attention_mask=mask).logits
    torch.testing.assert_close(inside, outside, rtol=0, atol=0)
    sdpa_queries.clear()
    one = build_tree_batch(prompts[:1], chosen[:1], rejected[:1])
    with torch.no_grad():
        tree_logps(model, one, backend=BACKEND)
    assert sdpa_queries == [one.length] * model.config.num_hidden_layers
    with pairwise_sdpa(tiny_model("tiny-gemma2"), mask, tree.pair_lengths):  # eager attention: untouched
        assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping


def test_gradient_checkpointing_in_train_mode_runs_dense(sdpa_queries):
    """The checkpointed recomputation runs in the backward, outside the block: pair by pair there would save
    other tensors than the forward did (torch's CheckpointError), so such forwards stay dense."""
    model = tiny_model("tiny-llama")
    model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    model.train()
    tree = build_tree_batch(*_pairs(6)[:3])
    out = tree_logps(model, tree, backend=BACKEND)
    (out.chosen_logps.sum() - out.rejected_logps.sum()).backward()
    assert set(sdpa_queries) == {tree.length}
    sdpa_queries.clear()
    with torch.no_grad():
        tree_logps(model, tree, backend=BACKEND)  # no gradient, no recomputation: pair by pair
    assert sdpa_queries == list(tree.pair_lengths) * model.config.num_hidden_layers


def test_registry_is_restored_after_an_error():
    model = tiny_model("tiny-llama")
    tree = build_tree_batch(*_pairs(4)[:3])
    with pytest.raises(RuntimeError, match="inside"), pairwise_sdpa(model, attention_mask_for(model, tree),
                                                                    tree.pair_lengths):
        assert "sdpa" in ALL_ATTENTION_FUNCTIONS._local_mapping
        raise RuntimeError("inside")
    assert "sdpa" not in ALL_ATTENTION_FUNCTIONS._local_mapping
