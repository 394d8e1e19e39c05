"""The refinement prefix whose keys/values the trainer caches: exactly p's tokens and the fixed template tokens
before them (:func:`fastpref.data.tokenization.refinement_prefix_ids`), computed from the tokenizer and the
refinement prompt, never from the data — so a dataset passed later (``evaluate(eval_dataset=...)``) fits it too.
The data only picks the format (standard or conversational) and is checked to start with the prefix.
"""

from __future__ import annotations

import warnings

from fastpref.data.tokenization import refinement_prefix_ids
from fastpref.model.attention import UnsafeAttentionError
from fastpref.model.head import unwrap_causal_lm
from fastpref.model.prefix_kv import compute_prefix_kv
from fastpref.trainer.config import PreferenceConfig


def _aug_prompts(datasets) -> list[list[int]]:
    parts = [part for d in datasets if d is not None for part in (d.values() if isinstance(d, dict) else [d])]
    return [ids for part in parts for ids in part["aug_prompt_input_ids"]]


def _fits(prompts: list[list[int]], prefix: list[int]) -> bool:
    return all(len(ids) > len(prefix) and list(ids[:len(prefix)]) == prefix for ids in prompts)


def refinement_prefix(model, tokenizer, args: PreferenceConfig, *datasets) -> tuple[int, ...] | None:
    """The cached refinement prefix for ``model`` and the tokenized ``datasets``, or None (with a warning when
    caching was asked for but cannot work: the augmented stream then runs whole)."""
    if not (args.uses_augmented_stream and args.cache_refinement_prefix):
        return None
    prompts = _aug_prompts(datasets)
    if not prompts:
        return None
    formats = [(False, "user")]
    if getattr(tokenizer, "chat_template", None):
        formats.append((True, "user"))
        if args.refinement_position == "before_conversation":
            formats.append((True, "system"))
    candidates = [refinement_prefix_ids(tokenizer, args.refinement_prompt, conversational=c, first_role=role)
                  for c, role in formats]
    prefix = next((c for c in candidates if c and _fits(prompts, c)), None)
    if prefix is None:
        warnings.warn("refinement prefix not cached: not every augmented prompt starts with the refinement prompt's "
                      "tokens (a system message or earlier turns before the query?); the augmented stream runs "
                      "whole", stacklevel=3)
        return None
    try:
        compute_prefix_kv(unwrap_causal_lm(model), prefix[:1])
    except (ValueError, UnsafeAttentionError) as error:
        warnings.warn(f"refinement prefix not cached ({error}); the augmented stream runs whole", stacklevel=3)
        return None
    return tuple(prefix)


def check_refinement_prefix(dataset, prefix: tuple[int, ...] | None, name: str) -> None:
    """Raise ValueError if a tokenized ``dataset``'s augmented prompts do not all continue the cached ``prefix``."""
    if prefix is None or dataset is None:
        return
    if not _fits(_aug_prompts([dataset]), list(prefix)):
        raise ValueError(f"the {name} dataset has augmented prompts that do not start with the cached refinement "
                         f"prefix ({len(prefix)} tokens: the template and the refinement prompt; a system message or "
                         "earlier turns before the query move it) or have nothing after it; build the trainer with "
                         "cache_refinement_prefix=False to run such data")
