"""Tokenize one preference pair into a shared prompt and two responses (and the Sr-DPO augmented prompt).

Standard data: ``tokenizer(prompt + response)`` (the tokenizer's own special tokens, e.g. a bos), an eos token
appended to each response unless it already ends with one (as TRL does). Conversational data: the chat template,
the prompt rendered with ``add_generation_prompt=True``, the response = what the full conversation adds to it.
Like TRL, the prompt ends where the tokenized prompt and prompt+response diverge (tokens can merge across the
boundary), so prompt ⊕ response is exactly the tokenization of the whole text.

Sr-DPO's augmented prompt p ⊕ x: the refinement prompt p is placed before the query x — for standard data in
front of the prompt text; for conversational data at the start of the last user message (the query), inside
that user turn. The responses are the same token ids as in the plain pair.

Truncation, so that prompt + longer response ≤ ``max_length`` (the prompt is shared by both responses):

1. ``max_prompt_length`` (if given) cuts the prompt: ``keep_end`` keeps its last tokens, ``keep_start`` its first.
2. ``keep_end``: the prompt loses its start (the query next to the response survives); only if a response
   alone leaves no room for one prompt token are the responses cut (at their end) as well.
   ``keep_start``: the sequence start is kept — the responses are cut at their end; a prompt that fills
   ``max_length`` by itself leaves empty responses, which raises ``ValueError`` (TRL drops such rows).
3. The augmented prompt keeps p whole and keeps each prompt token that it shares with the plain prompt exactly
   when the plain prompt kept it, so both streams score the same responses after the same query tokens.
"""

from __future__ import annotations

from typing import Any

from fastpref.data.loading import extract_prompt, is_conversational

TRUNCATION_MODES = ("keep_end", "keep_start")


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _common_suffix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _augment_text(refinement_prompt: str, query: str) -> str:
    joiner = "" if refinement_prompt[-1:].isspace() or query[:1].isspace() else " "
    return refinement_prompt + joiner + query


def _augment_messages(refinement_prompt: str, messages: list[dict]) -> list[dict]:
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise ValueError("refinement_prompt: the conversational prompt has no user message to put it in")
    query = users[-1]
    augmented = [dict(message) for message in messages]
    augmented[query]["content"] = _augment_text(refinement_prompt, messages[query]["content"])
    return augmented


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _tokenize_texts(example: dict, tokenizer, refinement_prompt: str | None):
    """(prompt ids, prompt+chosen ids, prompt+rejected ids, augmented prompt ids or None), untruncated."""
    prompt, chosen, rejected = example["prompt"], example["chosen"], example["rejected"]
    if is_conversational(example):
        for key in ("prompt", "chosen", "rejected"):
            if not isinstance(example[key], list):
                raise ValueError(f"conversational example: {key!r} must be a list of messages like the others, "
                                 f"got {type(example[key]).__name__}")
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("conversational data needs a tokenizer with a chat template (tokenizer.chat_template)")
        ids = (_render(tokenizer, prompt, generation_prompt=True),
               _render(tokenizer, prompt + chosen, generation_prompt=False),
               _render(tokenizer, prompt + rejected, generation_prompt=False))
        aug = None
        if refinement_prompt is not None:
            aug = _render(tokenizer, _augment_messages(refinement_prompt, prompt), generation_prompt=True)
        return (*ids, aug)
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(example[key], str):
            raise ValueError(f"{key!r} must be a string or a list of messages, got {type(example[key]).__name__}")
    eos = tokenizer.eos_token or ""
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    ids = tuple(tokenizer(text)["input_ids"] for text in (prompt, prompt + chosen, prompt + rejected))
    aug = None if refinement_prompt is None else tokenizer(_augment_text(refinement_prompt, prompt))["input_ids"]
    return (*ids, aug)


def _truncate(prompt: list[int], chosen: list[int], rejected: list[int], max_length: int | None,
              max_prompt_length: int | None, mode: str) -> tuple[range, list[int], list[int]]:
    """The kept prompt positions and the (possibly cut) responses."""
    start, stop = 0, len(prompt)
    if max_prompt_length is not None and stop > max_prompt_length:
        start, stop = (stop - max_prompt_length, stop) if mode == "keep_end" else (0, max_prompt_length)
    longest = max(len(chosen), len(rejected))
    if max_length is not None and (stop - start) + longest > max_length:
        if mode == "keep_end":
            start = max(start, stop - max(max_length - longest, 1))
        else:
            stop = min(stop, start + max_length)
        room = max_length - (stop - start)
        chosen, rejected = chosen[:room], rejected[:room]
    return range(start, stop), chosen, rejected


def _augmented_kept(plain: list[int], aug: list[int], kept: range) -> list[int]:
    """The augmented prompt restricted like the plain one: the tokens it shares with the plain prompt at its
    start and end follow the plain prompt's truncation; the differing middle (holding p) is kept whole."""
    head = _common_prefix(plain, aug)
    tail = _common_suffix(plain, aug, min(len(plain), len(aug)) - head)
    shift = len(aug) - len(plain)
    kept_head = [aug[i] for i in range(head) if i in kept]
    middle = aug[head:len(aug) - tail]
    kept_tail = [aug[i + shift] for i in range(len(plain) - tail, len(plain)) if i in kept]
    return kept_head + middle + kept_tail


def tokenize_pair(example: dict[str, Any], tokenizer, *, refinement_prompt: str | None = None,
                  max_length: int | None = 1024, max_prompt_length: int | None = None,
                  truncation_mode: str = "keep_end") -> dict[str, list[int]]:
    """Tokenize a preference example (standard or conversational, explicit or implicit prompt).

    Returns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of int; the sequences are
    prompt ⊕ chosen and prompt ⊕ rejected), plus ``aug_prompt_input_ids`` (p ⊕ x) when ``refinement_prompt``
    is given. Truncation: see the module docstring. Raises ``ValueError`` naming the problem for an empty
    prompt or an empty response (before or after truncation) and for bad arguments.
    """
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    for name, value, least in (("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be None or an int >= {least}, got {value!r}")
    if refinement_prompt is not None and (not isinstance(refinement_prompt, str) or not refinement_prompt):
        raise ValueError(f"refinement_prompt must be None or a non-empty string, got {refinement_prompt!r}")
    example = extract_prompt(example)
    prompt_full, chosen_full, rejected_full, aug_full = _tokenize_texts(example, tokenizer, refinement_prompt)
    prompt_len = min(_common_prefix(prompt_full, chosen_full), _common_prefix(prompt_full, rejected_full))
    prompt, chosen, rejected = prompt_full[:prompt_len], chosen_full[prompt_len:], rejected_full[prompt_len:]
    if not prompt:
        raise ValueError("empty prompt: the first response token needs a prompt token to predict it "
                         "(give a prompt, or use a tokenizer that adds a bos token)")
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise ValueError(f"empty {name} response after tokenization")
    kept, chosen, rejected = _truncate(prompt, chosen, rejected, max_length, max_prompt_length, truncation_mode)
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise ValueError(f"empty {name} response after truncation: the prompt ({len(prompt)} tokens) fills "
                             f"max_length={max_length} with truncation_mode={truncation_mode!r}")
    out = {"prompt_input_ids": prompt[kept.start:kept.stop], "chosen_input_ids": chosen,
           "rejected_input_ids": rejected}
    if aug_full is not None:
        # Drop the same prompt tail that merged into the responses, then truncate like the plain prompt.
        aug = aug_full[:len(aug_full) - (len(prompt_full) - prompt_len)]
        out["aug_prompt_input_ids"] = _augmented_kept(prompt, aug, kept)
    return out
