"""The cached refinement prefix: augmented log-probs equal the uncached computation, the fast Sr-DPO step equals
the straightforward one (loss and gradients), and the cache is neither modified nor silently dropped."""

from __future__ import annotations

import contextlib

import pytest
import torch
import torch.nn.functional as F

from fastpref import preference_loss
from fastpref.model.prefix_kv import CheckpointedCacheError, StepPrefixKV, compute_prefix_kv, frozen_forward
from fastpref.model.tree_logps import augmented_tree_logps, tree_logps
from fastpref.data.tokenization import shared_prefix_length, strip_prefix
from fastpref.model.tree_stream import build_tree_batch, tree_batches_from_features
from tree_oracle import assert_grads_close, parameter_grads, random_ids, separate_logps, tiny_model

BACKEND = "torch"


def _pairs(seed: int, b: int = 3):
    g = torch.Generator().manual_seed(seed)
    refinement = random_ids(g, [7])[0]
    prompts = random_ids(g, [4, 1, 6, 3][:b])
    chosen, rejected = random_ids(g, [5, 3, 1, 4][:b]), random_ids(g, [2, 6, 4, 1][:b])
    return refinement, prompts, chosen, rejected


def _reference_adapter(model):
    """The reference: the same model with its adapters off (peft) — or as it is (full fine-tune)."""
    return model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
@pytest.mark.parametrize("name", ["tiny-llama", "tiny-qwen2"])
def test_cached_prefix_logps_equal_uncached(name, lora):
    model = tiny_model(name, lora=lora)
    refinement, prompts, chosen, rejected = _pairs(11)
    aug_prompts = [refinement + x for x in prompts]
    results = []
    for adapters in (contextlib.nullcontext, lambda: _reference_adapter(model)):
        with adapters():
            prefix = compute_prefix_kv(model, refinement)
            aug_tree = build_tree_batch(strip_prefix(aug_prompts, prefix.prefix_ids), chosen, rejected,
                                        position_offset=prefix.length)
            out = augmented_tree_logps(model, aug_tree, prefix, backend=BACKEND)
            with torch.no_grad():
                slow_c = separate_logps(model, aug_prompts, chosen)
                slow_r = separate_logps(model, aug_prompts, rejected)
        assert out.chosen_logps.requires_grad is False
        torch.testing.assert_close(out.chosen_logps.double(), slow_c, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(out.rejected_logps.double(), slow_r, rtol=1e-5, atol=1e-5)
        results.append(slow_c)
    if lora:  # the adapters matter, so the reference check is not the policy check again
        assert (results[0] - results[1]).abs().max() > 1e-3


def test_prefix_is_not_modified_and_is_reused():
    model = tiny_model("tiny-llama")
    refinement, prompts, chosen, rejected = _pairs(12)
    prefix = compute_prefix_kv(model, refinement)
    stored = [(k.clone(), v.clone()) for k, v in prefix.key_values]
    aug_tree = build_tree_batch(prompts, chosen, rejected, position_offset=prefix.length)
    first = augmented_tree_logps(model, aug_tree, prefix, backend=BACKEND)
    second = augmented_tree_logps(model, aug_tree, prefix, backend=BACKEND)
    assert torch.equal(first.chosen_logps, second.chosen_logps)
    for (k, v), (k0, v0) in zip(prefix.key_values, stored):
        assert k.shape[-2] == len(refinement) and torch.equal(k, k0) and torch.equal(v, v0)


def test_frozen_forward_restores_modes_and_keeps_the_cache_under_checkpointing():
    model = tiny_model("tiny-llama")
    model.activation_checkpointing_enable()
    model.train()
    model.model.layers[0].eval()  # a mixed state must come back as it was
    modes = [m.training for m in model.modules()]
    refinement, prompts, chosen, rejected = _pairs(13)
    prefix = compute_prefix_kv(model, refinement)
    aug_tree = build_tree_batch(prompts, chosen, rejected, position_offset=prefix.length)
    out = augmented_tree_logps(model, aug_tree, prefix, backend=BACKEND)
    assert [m.training for m in model.modules()] == modes
    with torch.no_grad():
        slow = separate_logps(model.eval(), [refinement + x for x in prompts], chosen)
    torch.testing.assert_close(out.chosen_logps.double(), slow, rtol=1e-5, atol=1e-5)
    model.train()
    with torch.no_grad(), pytest.raises(CheckpointedCacheError):  # train mode + checkpointing would drop the cache
        tree_logps(model, aug_tree, prefix=prefix, backend=BACKEND)
    with pytest.raises(ValueError, match="carries no gradient"):
        tree_logps(model.eval(), aug_tree, prefix=prefix, backend=BACKEND)
    model.train()
    with frozen_forward(model):
        assert not model.training and torch.is_inference_mode_enabled()
    assert model.training and not torch.is_inference_mode_enabled()


@pytest.mark.parametrize("lora", [False, True], ids=["full", "lora"])
def test_fast_sr_dpo_step_equals_straightforward_step(lora):
    """Fast: tree stream with grad + cached-prefix augmented tree without; straightforward: four separate
    sequences per pair with full logits, no cache, the paper's formula written out."""
    beta, lam = 0.1, 0.5
    policy = tiny_model("tiny-qwen2", lora=lora, seed=1)
    reference = None if lora else tiny_model("tiny-qwen2", seed=2)
    refinement, prompts, chosen, rejected = _pairs(14, b=4)
    aug_prompts = [refinement + x for x in prompts]

    def ref_context():
        return _reference_adapter(policy) if lora else contextlib.nullcontext()

    ref_model = policy if lora else reference
    # Reference log-probs, once per precompute (plain and augmented), no grad.
    tree = build_tree_batch(prompts, chosen, rejected)
    with ref_context(), frozen_forward(ref_model):
        ref = tree_logps(ref_model, tree, backend=BACKEND)
        ref_prefix = compute_prefix_kv(ref_model, refinement)
        aug_tree = build_tree_batch(strip_prefix(aug_prompts, ref_prefix.prefix_ids), chosen, rejected,
                                    position_offset=ref_prefix.length)
        aug_ref = augmented_tree_logps(ref_model, aug_tree, ref_prefix, backend=BACKEND)
    # The fast step.
    policy_prefix = compute_prefix_kv(policy, refinement)
    aug = augmented_tree_logps(policy, aug_tree, policy_prefix, backend=BACKEND)
    pol = tree_logps(policy, tree, backend=BACKEND)
    fast = preference_loss(pol.chosen_logps, pol.rejected_logps, ref.chosen_logps.clone(), ref.rejected_logps.clone(),
                           loss_type="sr_dpo", beta=beta, refine_lambda=lam,
                           aug_chosen_logps=aug.chosen_logps, aug_rejected_logps=aug.rejected_logps,
                           aug_ref_chosen_logps=aug_ref.chosen_logps, aug_ref_rejected_logps=aug_ref.rejected_logps,
                           backend=BACKEND)
    fast.loss.backward()
    fast_grads = parameter_grads(policy)

    # The straightforward step.
    with torch.no_grad(), ref_context():
        s_ref_c, s_ref_r = separate_logps(ref_model, prompts, chosen), separate_logps(ref_model, prompts, rejected)
        s_aug_ref_c = separate_logps(ref_model, aug_prompts, chosen)
        s_aug_ref_r = separate_logps(ref_model, aug_prompts, rejected)
    with torch.no_grad():
        s_aug_c, s_aug_r = separate_logps(policy, aug_prompts, chosen), separate_logps(policy, aug_prompts, rejected)
    s_c, s_r = separate_logps(policy, prompts, chosen), separate_logps(policy, prompts, rejected)
    h = (s_c - s_ref_c) - (s_r - s_ref_r)
    delta = beta * ((s_aug_c - s_aug_ref_c) - (s_aug_r - s_aug_ref_r))
    slow_loss = -F.logsigmoid(beta * h - lam * delta).mean()
    slow_loss.backward()
    slow_grads = parameter_grads(policy)

    assert delta.abs().max() > 1e-3  # Δ is not trivially zero here
    torch.testing.assert_close(fast.loss.double(), slow_loss.detach(), rtol=1e-5, atol=1e-6)
    assert_grads_close(fast_grads, slow_grads)


def test_step_prefix_is_recomputed_when_the_step_changes():
    model = tiny_model("tiny-llama")
    refinement = _pairs(15)[0]
    prefixes = StepPrefixKV(refinement)
    first = prefixes.get(model, step=0)
    assert prefixes.get(model, step=0) is first
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    second = prefixes.get(model, step=1)
    assert second is not first and not torch.equal(second.key_values[0][0], first.key_values[0][0])


def test_prefix_helpers_validate():
    assert shared_prefix_length([[1, 2, 3, 4], [1, 2, 5], [1, 2]]) == 2
    assert shared_prefix_length([[7, 8], [7, 8, 9]]) == 2
    assert strip_prefix([[1, 2, 3], [1, 2, 4, 5]], [1, 2]) == [[3], [4, 5]]
    with pytest.raises(ValueError, match=r"aug_prompt_ids\[1\] does not start"):
        strip_prefix([[1, 2, 3], [2, 2, 4]], [1, 2])
    with pytest.raises(ValueError, match=r"aug_prompt_ids\[0\] has no token after"):
        strip_prefix([[1, 2]], [1, 2])
    model = tiny_model("tiny-llama")
    with pytest.raises(ValueError, match="prefix_ids is empty"):
        compute_prefix_kv(model, [])
    with pytest.raises(ValueError, match="prefix_ids must hold"):
        compute_prefix_kv(model, [1, -3])


def test_trees_from_tokenized_features_match_separate_sequences():
    """The data helper's tokenize_pair output → plain and augmented trees → log-probs of separate sequences."""
    from fastpref.data import SR_DPO_REFINEMENT_PROMPT, tokenize_pair
    from fastpref.data.synthetic import generate
    from fastpref.data.tokenizer import build_tokenizer

    tokenizer = build_tokenizer()
    features = [tokenize_pair(example, tokenizer, refinement_prompt=SR_DPO_REFINEMENT_PROMPT)
                for example in generate(3, seed=5)]
    aug_prompts = [f["aug_prompt_input_ids"] for f in features]
    prefix_ids = aug_prompts[0][:shared_prefix_length(aug_prompts)]
    assert len(prefix_ids) > 10  # the refinement prompt is shared
    tree, aug_tree = tree_batches_from_features(features, prefix_ids=prefix_ids)
    model = tiny_model("tiny-llama", vocab_size=len(tokenizer))
    prefix = compute_prefix_kv(model, prefix_ids)
    with torch.no_grad():
        plain = tree_logps(model, tree, backend=BACKEND)
        aug = augmented_tree_logps(model, aug_tree, prefix, backend=BACKEND)
        prompts = [f["prompt_input_ids"] for f in features]
        for key, fast_plain, fast_aug in (("chosen_input_ids", plain.chosen_logps, aug.chosen_logps),
                                          ("rejected_input_ids", plain.rejected_logps, aug.rejected_logps)):
            responses = [f[key] for f in features]
            torch.testing.assert_close(fast_plain.double(), separate_logps(model, prompts, responses),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast_aug.double(), separate_logps(model, aug_prompts, responses),
                                       rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="aug_prompt_input_ids"):
        tree_batches_from_features([{k: v for k, v in features[0].items() if k != "aug_prompt_input_ids"}],
                                   prefix_ids=prefix_ids)
