"""Shared by the tree-stream and prefix-cache tests: tiny models and the straightforward computation.

The straightforward computation runs every (prompt, response) as a sequence of its own, with no mask, no
position_ids, no cache and full logits, and scores the response with the float64 oracle
:func:`fastpref.logps_oracle.logits_logps`; the tree/prefix paths must reproduce it.
"""

from __future__ import annotations

import torch

from fastpref.logps import oracle as logps_oracle
from fastpref.data.tiny_models import build_model

VOCAB = 89  # odd on purpose


def tiny_model(name: str, *, lora: bool = False, seed: int = 0, vocab_size: int = VOCAB) -> torch.nn.Module:
    """A float32 tiny causal LM ("tiny-llama" / "tiny-qwen2"), optionally with random, non-zero LoRA adapters."""
    torch.manual_seed(seed)
    model = build_model(name, vocab_size).float()
    if lora:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "up_proj"],
                            init_lora_weights=False, lora_dropout=0.0)
        model = get_peft_model(model, config)
    return model


def random_ids(generator: torch.Generator, lengths: list[int]) -> list[list[int]]:
    return [torch.randint(0, VOCAB, (n,), generator=generator).tolist() for n in lengths]


def separate_logps(model: torch.nn.Module, prompts: list[list[int]], responses: list[list[int]]) -> torch.Tensor:
    """[B] float64 Σ_j log p(y[j] | x, y[<j]), each [x, y] its own forward with full logits (differentiable)."""
    out = []
    for x, y in zip(prompts, responses):
        logits = model(input_ids=torch.tensor([x + y])).logits[0]
        rows = logits[len(x) - 1: len(x) + len(y) - 1]
        out.append(logps_oracle.logits_logps(rows, torch.tensor(y)).logps[0])
    return torch.stack(out)


def parameter_grads(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Gradients of the trainable parameters, detached and cloned; then zeroes them."""
    grads = {name: p.grad.detach().clone() for name, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads


def assert_grads_close(fast: dict[str, torch.Tensor], slow: dict[str, torch.Tensor], *, rtol: float = 1e-4) -> None:
    """Same parameters; each gradient within ``rtol`` × its largest entry (fp32 roundoff, not a loose bound)."""
    assert fast.keys() == slow.keys() and len(fast) > 0
    for name in fast:
        scale = slow[name].abs().max().item() + 1e-12
        err = (fast[name] - slow[name]).abs().max().item()
        assert err <= rtol * scale, f"{name}: max error {err:.3g} vs scale {scale:.3g}"
