"""Tree-packed streams: layout, masks, log-probs and gradients equal to separate sequences, refused combinations."""

from __future__ import annotations

import pytest
import torch

from fastpref.model.tree_logps import tree_logps
from fastpref.model.attention import (EagerBooleanMaskError, FlashAttentionTreeError, PackedCacheError,
                                      SlidingWindowTreeError, TreeWithoutMaskError, check_attention_inputs,
                                      positions_are_packed, positions_are_tree)
from fastpref.model.tree_stream import (CHOSEN, PROMPT, REJECTED, attention_mask_for, build_branch_tree,
                                        build_tree_batch, tree_additive_mask, tree_attention_mask, tree_block_mask)
from tree_oracle import assert_grads_close, parameter_grads, random_ids, separate_logps, tiny_model

BACKEND = "torch"  # the log-prob kernels have their own tests; here the model plumbing is under test


def test_layout_positions_roles_and_gather_index():
    tree = build_tree_batch([[11, 12], [21]], [[13, 14, 15], [22, 23]], [[16], [24, 25, 26]], position_offset=3)
    assert tree.input_ids.tolist() == [[11, 12, 13, 14, 15, 16, 21, 22, 23, 24, 25, 26]]
    assert tree.position_ids.tolist() == [[3, 4, 5, 6, 7, 5, 3, 4, 5, 4, 5, 6]]
    assert tree.pair_ids.tolist() == [0] * 6 + [1] * 6
    assert tree.role_ids.tolist() == [PROMPT, PROMPT, CHOSEN, CHOSEN, CHOSEN, REJECTED,
                                      PROMPT, CHOSEN, CHOSEN, REJECTED, REJECTED, REJECTED]
    # chosen of pair 0: rows 1 (x's last), 2, 3; chosen of pair 1: rows 6, 7; then the rejected ones.
    assert tree.row_index.tolist() == [1, 2, 3, 6, 7, 1, 6, 9, 10]
    assert tree.labels.tolist() == [13, 14, 15, 22, 23, 16, 24, 25, 26]
    assert tree.cu_seqlens.tolist() == [0, 3, 5, 6, 9]
    assert tree.num_pairs == 2 and tree.max_position == 8


def _brute_force_visibility(tree, prefix_length):
    length = tree.length
    expected = torch.zeros(length, prefix_length + length, dtype=torch.bool)
    expected[:, :prefix_length] = True
    for q in range(length):
        for k in range(q + 1):
            same_pair = tree.pair_ids[q] == tree.pair_ids[k]
            hidden = tree.role_ids[q] == REJECTED and tree.role_ids[k] == CHOSEN
            expected[q, prefix_length + k] = bool(same_pair and not hidden)
    return expected


@pytest.mark.parametrize("prefix_length", [0, 5])
def test_masks_match_the_rule(prefix_length):
    g = torch.Generator().manual_seed(3)
    tree = build_tree_batch(random_ids(g, [3, 1, 4]), random_ids(g, [2, 5, 1]), random_ids(g, [4, 2, 3]),
                            position_offset=prefix_length)
    expected = _brute_force_visibility(tree, prefix_length)
    boolean = tree_attention_mask(tree, prefix_length=prefix_length)
    assert boolean.shape == (1, 1, tree.length, prefix_length + tree.length) and boolean.dtype == torch.bool
    assert torch.equal(boolean[0, 0], expected)
    additive = tree_additive_mask(tree, torch.float32, prefix_length=prefix_length)[0, 0]
    assert torch.equal(additive == 0, expected) and (additive[~expected] == torch.finfo(torch.float32).min).all()
    block = tree_block_mask(tree, prefix_length=prefix_length, block_size=4)
    q = torch.arange(tree.length)[:, None]
    kv = torch.arange(prefix_length + tree.length)[None, :]
    assert torch.equal(block.mask_mod(0, 0, q, kv), expected)
    assert block.shape[-2:] == (tree.length, prefix_length + tree.length)


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_tree_logps_and_grads_equal_separate_sequences(name, lora):
    model = tiny_model(name, lora=lora)
    g = torch.Generator().manual_seed(7)
    prompts = random_ids(g, [5, 1, 9, 3])
    chosen, rejected = random_ids(g, [4, 7, 1, 6]), random_ids(g, [6, 2, 5, 1])
    upstream_c = torch.randn(4, generator=g, dtype=torch.float64)  # non-uniform upstream gradients
    upstream_r = torch.randn(4, generator=g, dtype=torch.float64)

    out = tree_logps(model, build_tree_batch(prompts, chosen, rejected), backend=BACKEND)
    (out.chosen_logps.double() @ upstream_c + out.rejected_logps.double() @ upstream_r).backward()
    fast_grads = parameter_grads(model)

    slow_c, slow_r = separate_logps(model, prompts, chosen), separate_logps(model, prompts, rejected)
    (slow_c @ upstream_c + slow_r @ upstream_r).backward()
    slow_grads = parameter_grads(model)

    torch.testing.assert_close(out.chosen_logps.double(), slow_c.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(out.rejected_logps.double(), slow_r.detach(), rtol=1e-5, atol=1e-5)
    assert out.chosen_counts.tolist() == [4, 7, 1, 6] and out.rejected_counts.tolist() == [6, 2, 5, 1]
    assert_grads_close(fast_grads, slow_grads)
    if lora:
        assert all("lora_" in name for name in fast_grads)


@pytest.mark.parametrize("name", ["tiny-mistral", "tiny-gpt2", "tiny-gemma2"])
def test_other_architectures_plain_and_cached_prefix(name):
    """Mistral, GPT-2 (tied head, learned positions) and Gemma-2 (eager attention with softcaps, sliding layers,
    final logit softcap): the tree and the cached-prefix tree reproduce separate sequences."""
    from fastpref.model.prefix_kv import compute_prefix_kv
    from fastpref.model.tree_logps import augmented_tree_logps

    model = tiny_model(name)
    g = torch.Generator().manual_seed(12)
    prefix_ids, prompts = random_ids(g, [6])[0], random_ids(g, [5, 1, 9])
    chosen, rejected = random_ids(g, [4, 7, 1]), random_ids(g, [6, 2, 5])
    prefix = compute_prefix_kv(model, prefix_ids)
    aug = augmented_tree_logps(model, build_tree_batch(prompts, chosen, rejected, position_offset=6), prefix,
                               backend=BACKEND)
    with torch.no_grad():
        plain = tree_logps(model, build_tree_batch(prompts, chosen, rejected), backend=BACKEND)
        for fast, responses in ((plain.chosen_logps, chosen), (plain.rejected_logps, rejected)):
            torch.testing.assert_close(fast.double(), separate_logps(model, prompts, responses), rtol=1e-5, atol=1e-5)
        aug_prompts = [prefix_ids + x for x in prompts]
        for fast, responses in ((aug.chosen_logps, chosen), (aug.rejected_logps, rejected)):
            torch.testing.assert_close(fast.double(), separate_logps(model, aug_prompts, responses),
                                       rtol=1e-5, atol=1e-5)


def test_eager_attention_gets_an_additive_mask_and_matches():
    model = tiny_model("tiny-llama")
    model.config._attn_implementation = "eager"
    g = torch.Generator().manual_seed(8)
    prompts, chosen, rejected = random_ids(g, [4, 2]), random_ids(g, [3, 5]), random_ids(g, [6, 1])
    tree = build_tree_batch(prompts, chosen, rejected)
    assert attention_mask_for(model, tree).dtype == model.dtype
    with torch.no_grad():
        out = tree_logps(model, tree, backend=BACKEND)
        torch.testing.assert_close(out.chosen_logps.double(), separate_logps(model, prompts, chosen),
                                   rtol=1e-5, atol=1e-5)


def _tree_and_model():
    model = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(9)
    tree = build_tree_batch(random_ids(g, [4, 3]), random_ids(g, [3, 5]), random_ids(g, [5, 2]))
    return model, tree


def test_eager_with_boolean_mask_is_wrong_and_refused():
    model, tree = _tree_and_model()
    mask = tree_attention_mask(tree)
    with torch.no_grad():
        right = model(input_ids=tree.input_ids, position_ids=tree.position_ids, attention_mask=mask).logits
        model.config._attn_implementation = "eager"
        wrong = model(input_ids=tree.input_ids, position_ids=tree.position_ids, attention_mask=mask).logits
    assert (right - wrong).abs().max() > 1e-2  # transformers runs it, silently wrong
    with pytest.raises(EagerBooleanMaskError):
        tree_logps(model, tree, attention_mask=mask, backend=BACKEND)


def test_tree_by_position_ids_alone_is_wrong_and_refused():
    model, tree = _tree_and_model()
    with torch.no_grad():
        right = model(input_ids=tree.input_ids, position_ids=tree.position_ids,
                      attention_mask=tree_attention_mask(tree)).logits
        wrong = model(input_ids=tree.input_ids, position_ids=tree.position_ids).logits
    assert (right - wrong).abs().max() > 1e-2
    assert positions_are_tree(tree.position_ids) and positions_are_packed(tree.position_ids)
    with pytest.raises(TreeWithoutMaskError):
        check_attention_inputs(model, attention_mask=None, position_ids=tree.position_ids)
    with pytest.raises(TreeWithoutMaskError):
        check_attention_inputs(model, attention_mask=None, position_ids=tree.position_ids.clone(), tree=tree)
    plain_packing = torch.tensor([[0, 1, 2, 0, 1, 0, 1, 2, 3]])
    assert not positions_are_tree(plain_packing)
    check_attention_inputs(model, attention_mask=None, position_ids=plain_packing)  # plain packing is fine


def test_flash_attention_with_a_tree_is_refused():
    model, tree = _tree_and_model()
    model.config._attn_implementation = "flash_attention_2"
    with pytest.raises(FlashAttentionTreeError):
        attention_mask_for(model, tree)
    with pytest.raises(FlashAttentionTreeError):
        tree_logps(model, tree, attention_mask=tree_attention_mask(tree), backend=BACKEND)


def test_packing_by_position_ids_with_a_cache_is_wrong_and_refused():
    from fastpref.model.prefix_kv import compute_prefix_kv

    model = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(10)
    prefix_ids, (a, b) = random_ids(g, [4])[0], random_ids(g, [5, 6])
    prefix = compute_prefix_kv(model, prefix_ids)
    positions = torch.tensor([list(range(4, 9)) + list(range(4, 10))])
    with torch.no_grad():
        packed = model(input_ids=torch.tensor([a + b]), position_ids=positions,
                       past_key_values=prefix.fresh_cache()).logits[0, 5:]
        alone = model(input_ids=torch.tensor([b]), position_ids=positions[:, 5:],
                      past_key_values=prefix.fresh_cache()).logits[0]
    assert (packed - alone).abs().max() > 1e-2  # b attended to a: packing was ignored
    with pytest.raises(PackedCacheError):
        check_attention_inputs(model, attention_mask=None, position_ids=positions, past_key_values=prefix.fresh_cache())


def test_sliding_window_shorter_than_the_tree_is_refused():
    model, tree = _tree_and_model()
    model.config.sliding_window = 4
    model.config.layer_types = ["sliding_attention"] * model.config.num_hidden_layers
    with pytest.raises(SlidingWindowTreeError):
        tree_logps(model, tree, backend=BACKEND)


@pytest.mark.parametrize("bad, message", [
    (dict(prompt_ids=[[1], []]), "prompt_ids\\[1\\] is empty"),
    (dict(chosen_ids=[[1]]), "chosen_ids has 1 entries"),
    (dict(rejected_ids=[[1], [-2]]), "rejected_ids\\[1\\]"),
    (dict(position_offset=-1), "position_offset"),
    (dict(prompt_ids=[], chosen_ids=[], rejected_ids=[]), "at least one pair"),
])
def test_bad_input_raises_naming_the_argument(bad, message):
    args = dict(prompt_ids=[[1, 2], [3]], chosen_ids=[[4], [5]], rejected_ids=[[6], [7]])
    position_offset = bad.pop("position_offset", 0)
    args.update(bad)
    with pytest.raises(ValueError, match=message):
        build_tree_batch(args["prompt_ids"], args["chosen_ids"], args["rejected_ids"],
                         position_offset=position_offset)


def test_position_offset_must_match_the_prefix():
    model, tree = _tree_and_model()
    shifted = build_tree_batch([[1, 2]], [[3]], [[4]], position_offset=2)
    with pytest.raises(ValueError, match="position_offset"):
        tree_logps(model, shifted, backend=BACKEND)


@pytest.mark.slow
def test_flex_attention_block_mask_forward_matches_sdpa():
    """flex_attention on CPU compiles (about a minute here) and has no backward: forward only."""
    model, tree = _tree_and_model()
    with torch.no_grad():
        sdpa = tree_logps(model, tree, backend=BACKEND)
        model.config._attn_implementation = "flex_attention"
        flex = tree_logps(model, tree, backend=BACKEND)
    torch.testing.assert_close(flex.chosen_logps, sdpa.chosen_logps, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(flex.rejected_logps, sdpa.rejected_logps, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("attn", ["sdpa", "flex_attention"])
def test_cuda_tree_and_cached_prefix_match_separate_sequences(attn):
    """On CUDA (fp32, TF32 off): the tree (with backward) and the cached-prefix tree through sdpa's boolean mask
    and flex_attention's BlockMask reproduce separate sequences."""
    from fastpref.model.prefix_kv import compute_prefix_kv
    from fastpref.model.tree_logps import augmented_tree_logps

    torch.backends.cuda.matmul.allow_tf32 = False
    model = tiny_model("tiny-llama").cuda()
    g = torch.Generator().manual_seed(21)
    prefix_ids, prompts = random_ids(g, [9])[0], random_ids(g, [5, 1, 40, 3])
    chosen, rejected = random_ids(g, [30, 7, 1, 150]), random_ids(g, [6, 120, 5, 1])
    upstream = torch.randn(8, generator=g, dtype=torch.float64).cuda()

    def separate(prompt_lists, responses):
        out = []
        for x, y in zip(prompt_lists, responses):
            logits = model(input_ids=torch.tensor([x + y], device="cuda")).logits[0]
            out.append(torch.log_softmax(logits[len(x) - 1:len(x) + len(y) - 1].double(), -1)
                       .gather(-1, torch.tensor(y, device="cuda")[:, None]).sum())
        return torch.stack(out)

    slow = torch.cat([separate(prompts, chosen), separate(prompts, rejected)])
    (slow @ upstream).backward()
    slow_grads = parameter_grads(model)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    tree = build_tree_batch(prompts, chosen, rejected).to("cuda")
    fast = tree_logps(model, tree)
    both = torch.cat([fast.chosen_logps, fast.rejected_logps]).double()
    (both @ upstream).backward()
    torch.testing.assert_close(both.detach(), slow.detach(), rtol=1e-5, atol=1e-4)
    assert_grads_close(parameter_grads(model), slow_grads)

    prefix = compute_prefix_kv(model, prefix_ids)
    aug_tree = build_tree_batch(prompts, chosen, rejected, position_offset=len(prefix_ids)).to("cuda")
    aug = augmented_tree_logps(model, aug_tree, prefix)
    model.set_attn_implementation("sdpa")
    with torch.no_grad():
        aug_prompts = [prefix_ids + x for x in prompts]
        aug_slow = torch.cat([separate(aug_prompts, chosen), separate(aug_prompts, rejected)])
    torch.testing.assert_close(torch.cat([aug.chosen_logps, aug.rejected_logps]).double(), aug_slow,
                               rtol=1e-5, atol=1e-4)


# ---- K branches per prompt (listwise data) ---------------------------------------------------------------------

def test_branch_tree_with_two_branches_has_the_pair_layout():
    g = torch.Generator().manual_seed(3)
    prompts, chosen, rejected = random_ids(g, [3, 5]), random_ids(g, [2, 4]), random_ids(g, [5, 1])
    pair = build_tree_batch(prompts, chosen, rejected)
    branches = build_branch_tree(prompts, [[c, r] for c, r in zip(chosen, rejected)])
    for name in ("input_ids", "position_ids", "pair_ids", "role_ids"):
        assert torch.equal(getattr(pair, name), getattr(branches, name)), name
    assert torch.equal(tree_attention_mask(pair), tree_attention_mask(branches))


def test_branch_tree_logps_and_grads_equal_separate_sequences():
    from fastpref.model.head import KeptRows, stream_logps
    from fastpref.model.tree_logps import tree_forward_inputs

    model = tiny_model("tiny-llama")
    g = torch.Generator().manual_seed(11)
    prompts = random_ids(g, [4, 1, 6])
    branch_ids = [random_ids(g, [3, 1, 5]), random_ids(g, [2]), random_ids(g, [4, 2, 1, 3])]
    tree = build_branch_tree(prompts, branch_ids)
    # No response row may see a sibling: the brute-force rule with "same role or prompt" as the condition.
    visible = tree_attention_mask(tree)[0, 0]
    for q in range(tree.length):
        for k in range(tree.length):
            same_prompt = tree.pair_ids[q] == tree.pair_ids[k]
            allowed = same_prompt and k <= q and (tree.role_ids[k] == PROMPT or tree.role_ids[k] == tree.role_ids[q])
            assert bool(visible[q, k]) == bool(allowed), (q, k)
    attention_mask, cache = tree_forward_inputs(model, tree)
    out = stream_logps(model, tree.input_ids, KeptRows(index=tree.row_index, labels=tree.labels, cu_seqlens=tree.cu_seqlens),
                       position_ids=tree.position_ids, attention_mask=attention_mask, past_key_values=cache,
                       backend=BACKEND)
    flat_prompts = [p for p, branches in zip(prompts, branch_ids) for _ in branches]
    flat_branches = [y for branches in branch_ids for y in branches]
    upstream = torch.randn(len(flat_branches), generator=g, dtype=torch.float64)
    (out.logps.double() @ upstream).backward()
    fast_grads = parameter_grads(model)
    slow = separate_logps(model, flat_prompts, flat_branches)
    (slow @ upstream).backward()
    torch.testing.assert_close(out.logps.double(), slow.detach(), rtol=1e-5, atol=1e-5)
    assert out.counts.tolist() == [len(y) for y in flat_branches]
    assert_grads_close(fast_grads, parameter_grads(model))
