"""Causal LMs built from a config with random weights (no hub): tiny ones for CPU tests and the demo, real
shapes for GPU benchmarks.

``build_model(name, vocab_size, **overrides)`` — ``overrides`` replace config fields (``num_hidden_layers=4``);
the weights are float32 (cast with ``.to(dtype)``) and come from torch's global RNG: call ``torch.manual_seed``
first for a reproducible model. Every model uses ``attn_implementation="sdpa"`` except
"tiny-gemma2" ("eager": transformers has no sdpa path for Gemma-2).
"""

from __future__ import annotations

from typing import Any

from transformers import AutoModelForCausalLM, PretrainedConfig, PreTrainedModel

_TINY_DECODER = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, max_position_embeddings=1024, tie_word_embeddings=False)

# name -> (transformers model_type, config fields)
_SPECS: dict[str, tuple[str, dict[str, Any]]] = {
    "tiny-llama": ("llama", dict(_TINY_DECODER)),
    "tiny-qwen2": ("qwen2", dict(_TINY_DECODER)),
    "tiny-mistral": ("mistral", dict(_TINY_DECODER, sliding_window=None)),
    # Gemma-2: final logit softcapping is what the fused head must reproduce. transformers has no sdpa path for
    # Gemma-2 (attention softcapping), so it runs "eager" (see _ATTENTION).
    "tiny-gemma2": ("gemma2", dict(_TINY_DECODER, head_dim=16, final_logit_softcapping=30.0,
                                   attn_logit_softcapping=50.0, sliding_window=512, tie_word_embeddings=True)),
    # GPT-2's config defaults to dropout 0.1 everywhere; the other families default to none.
    "tiny-gpt2": ("gpt2", dict(n_embd=64, n_layer=2, n_head=4, n_positions=1024, tie_word_embeddings=True,
                               resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=None,
                               eos_token_id=None)),
    "small-llama": ("llama", dict(hidden_size=1024, intermediate_size=2816, num_hidden_layers=8,
                                  num_attention_heads=16, num_key_value_heads=4, max_position_embeddings=4096,
                                  tie_word_embeddings=False)),
    "qwen2.5-0.5b-shape": ("qwen2", dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24,
                                         num_attention_heads=14, num_key_value_heads=2,
                                         max_position_embeddings=32768, rope_theta=1_000_000.0,
                                         rms_norm_eps=1e-6, tie_word_embeddings=True)),
    "llama-3.2-1b-shape": ("llama", dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16,
                                         num_attention_heads=32, num_key_value_heads=8, head_dim=64,
                                         max_position_embeddings=131072, rope_theta=500_000.0,
                                         rms_norm_eps=1e-5, tie_word_embeddings=True)),
}

# Attention implementation per name where "sdpa" is not available.
_ATTENTION = {"tiny-gemma2": "eager"}

#: Names accepted by :func:`build_model`.
MODEL_NAMES: tuple[str, ...] = tuple(_SPECS)


def build_config(name: str, vocab_size: int, **overrides: Any) -> PretrainedConfig:
    """The config of :func:`build_model` (``overrides`` replace its fields)."""
    from transformers import AutoConfig

    if name not in _SPECS:
        raise ValueError(f"unknown model name {name!r}; expected one of {', '.join(MODEL_NAMES)}")
    if not isinstance(vocab_size, int) or vocab_size < 2:
        raise ValueError(f"vocab_size must be an int >= 2, got {vocab_size!r}")
    model_type, fields = _SPECS[name]
    config = AutoConfig.for_model(model_type, vocab_size=vocab_size, **{**fields, **overrides})
    config._attn_implementation = _ATTENTION.get(name, "sdpa")
    return config


def build_model(name: str, vocab_size: int, **overrides: Any) -> PreTrainedModel:
    """A randomly initialized causal LM named ``name`` (one of :data:`MODEL_NAMES`) for ``vocab_size`` tokens.

    Run it on packed streams with ``attention_mask=None``, ``position_ids`` restarting at 0 per sequence and
    ``use_cache=False`` (transformers then keeps the packed sequences apart).
    """
    config = build_config(name, vocab_size, **overrides)
    return AutoModelForCausalLM.from_config(config, attn_implementation=_ATTENTION.get(name, "sdpa"))
