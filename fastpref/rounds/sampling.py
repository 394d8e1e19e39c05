"""Sampling K responses per prompt from a causal LM: batched ``model.generate`` on left-padded prompts.

Prompts are encoded the way :func:`fastpref.data.tokenize_pair` encodes them for training — a string through the
tokenizer with its special tokens (fastpref's local tokenizer adds ``<|bos|>``), a list of ``{"role", "content"}``
messages through the chat template with the generation prompt — so a sampled response is scored and trained after
exactly the prompt tokens it was generated from. Prompts of one batch are padded on the left (the new tokens of
every row then start at the same column) with an attention mask; a response ends at the first eos token and is
decoded without special tokens.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from fastpref.data import is_conversational

Prompt = str | list[dict]


@dataclass(frozen=True)
class SamplingConfig:
    """How responses are drawn: ``samples_per_prompt`` (K) per prompt, at most ``max_new_tokens`` new tokens,
    ``temperature`` (0 = greedy), nucleus ``top_p`` (1 = off), ``top_k`` (0 = off), ``batch_size`` prompts per
    ``generate`` call."""

    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    batch_size: int = 16

    def __post_init__(self):
        for name in ("samples_per_prompt", "max_new_tokens", "batch_size"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be an int >= 1, got {value!r}")
        if not isinstance(self.top_k, int) or self.top_k < 0:
            raise ValueError(f"top_k must be an int >= 0, got {self.top_k!r}")
        if not (math.isfinite(self.temperature) and self.temperature >= 0):
            raise ValueError(f"temperature must be a finite number >= 0, got {self.temperature!r}")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p!r}")

    def generate_kwargs(self) -> dict:
        """Keyword arguments of ``model.generate`` for these options."""
        if self.temperature == 0:
            return dict(do_sample=False, max_new_tokens=self.max_new_tokens)
        return dict(do_sample=True, temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                    max_new_tokens=self.max_new_tokens)


def encode_prompt(tokenizer, prompt: Prompt) -> list[int]:
    """Token ids of ``prompt`` as training sees them (see the module docstring)."""
    if isinstance(prompt, str):
        if not prompt:
            raise ValueError("prompts must be non-empty strings or message lists, got ''")
        return tokenizer(prompt)["input_ids"]
    if isinstance(prompt, list) and is_conversational({"prompt": prompt}):
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational prompts need a tokenizer with a chat template")
        text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    raise ValueError(f"a prompt must be a string or a list of {{'role', 'content'}} messages, got {prompt!r}")


def left_pad(sequences: Sequence[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` [B, T] with every sequence right-aligned (padded on the left)."""
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for row, ids in enumerate(sequences):
        input_ids[row, width - len(ids):] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids):] = 1
    return input_ids, attention_mask


def _decode(tokenizer, new_tokens: torch.Tensor, eos_ids: set[int]) -> str:
    ids = new_tokens.tolist()
    for position, token in enumerate(ids):
        if token in eos_ids:
            ids = ids[:position]
            break
    return tokenizer.decode(ids, skip_special_tokens=True)


def _eos_ids(model, tokenizer) -> set[int]:
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids = set(configured if isinstance(configured, list) else [configured]) | {tokenizer.eos_token_id}
    return {i for i in ids if i is not None}


@torch.no_grad()
def sample_responses(model, tokenizer, prompts: Sequence[Prompt], config: SamplingConfig, *,
                     seed: int = 0) -> list[list[str]]:
    """``config.samples_per_prompt`` responses (strings) for each prompt, in prompt order.

    With ``temperature=0`` (greedy) each prompt is decoded once and its response repeated K times. Sampling
    draws from a forked torch RNG seeded with ``seed`` (the global RNG is left as it was), so the same
    model, prompts, options and seed give the same responses.
    """
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token: set tokenizer.pad_token before sampling")
    if not prompts:
        return []
    encoded = [encode_prompt(tokenizer, prompt) for prompt in prompts]
    device = next(model.parameters()).device
    eos_ids = _eos_ids(model, tokenizer)
    was_training = model.training
    model.eval()
    responses: list[list[str]] = []
    k = config.samples_per_prompt
    per_call = 1 if config.temperature == 0 else k  # greedy: one decode per prompt, repeated K times
    try:
        with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            for start in range(0, len(encoded), config.batch_size):
                input_ids, attention_mask = left_pad(encoded[start:start + config.batch_size],
                                                     tokenizer.pad_token_id)
                out = model.generate(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device),
                                     num_return_sequences=per_call, pad_token_id=tokenizer.pad_token_id,
                                     eos_token_id=sorted(eos_ids), **config.generate_kwargs())
                new = out[:, input_ids.shape[1]:].cpu()
                texts = [_decode(tokenizer, row, eos_ids) for row in new]
                responses += [texts[i:i + per_call] * (k // per_call) for i in range(0, len(texts), per_call)]
    finally:
        model.train(was_training)
    return responses
