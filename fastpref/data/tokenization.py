"""Tokenize one preference pair into a shared prompt and two responses (and the Sr-DPO augmented prompt).

Standard data: ``tokenizer(prompt + response)`` (the tokenizer's own special tokens, e.g. a bos), an eos token
appended to each response unless it already ends with one (as TRL does). Conversational data: the chat template,
the prompt rendered with ``add_generation_prompt=True``, the response = what the full conversation adds to it.
Like TRL, the prompt ends where the tokenized prompt and prompt+response diverge (tokens can merge across the
boundary), so prompt ⊕ response is exactly the tokenization of the whole text.

Sr-DPO's augmented prompt p ⊕ x: the refinement prompt p is placed before the query x — for standard data in
front of the prompt text; for conversational data, per ``refinement_position``, at the start of the last user
message (``"last_user_turn"``: the query, inside that user turn) or at the start of the first message
(``"before_conversation"``: before the whole multi-turn conversation, as the paper does for multi-turn text).
The responses are the same token ids as in the plain pair.

Truncation, so that prompt + longer response ≤ ``max_length`` (the prompt is shared by both responses; a ranked
row's K completions, :func:`tokenize_ranked`, share it the same way: prompt + the longest ≤ ``max_length``):

1. ``max_prompt_length`` (if given) cuts the prompt: ``keep_end`` keeps its last tokens, ``keep_start`` its first.
2. ``keep_end``: the prompt loses its start (the query next to the response survives); only if a response
   alone leaves no room for one prompt token are the responses cut (at their end) as well.
   ``keep_start``: the sequence start is kept — the responses are cut at their end; a prompt that fills
   ``max_length`` by itself leaves empty responses, which raises ``ValueError`` (TRL drops such rows).
3. The augmented prompt keeps everything before the query tokens it shares with the plain prompt whole (the
   template tokens before p, p, and any token merged across the joint) and keeps each shared query token exactly
   when the plain prompt kept it, so both streams score the same responses after the same query tokens, and
   every augmented prompt starts with :func:`refinement_prefix_ids` (the prefix whose keys/values the trainer
   caches).

:func:`shared_prefix_length` and :func:`strip_prefix` are the token-list helpers of that shared prefix.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, NamedTuple

from fastpref.data.loading import extract_prompt, is_conversational
from fastpref.data.token_weights import (SEGMENT_COLUMNS, SIDES, TOKEN_WEIGHT_COLUMNS, checked_token_weights,
                                         segment_token_weights)

#: Truncation modes of :func:`tokenize_pair` and ``PreferenceConfig.truncation_mode``; the first is TRL 1.16's
#: ``DPOConfig`` default.
TRUNCATION_MODES = ("keep_start", "keep_end")
#: Where Sr-DPO's refinement prompt goes in a conversational prompt (``PreferenceConfig.refinement_position``).
REFINEMENT_POSITIONS = ("last_user_turn", "before_conversation")
# Queries that differ in their first character: the tokens their augmented prompts share are p's and the
# template's (a token that merges p's end with the query differs between them).
_PROBE_QUERIES = ("0", "a", "Z", "?", "(", " x", "\n", "\u00e9")


def shared_prefix_length(sequences: Sequence[Sequence[int]]) -> int:
    """Length of the longest common token prefix of ``sequences`` (e.g. the pairs' augmented prompts)."""
    if len(sequences) == 0:
        raise ValueError("sequences is empty")
    first = sequences[0]
    length = min(len(s) for s in sequences)
    for i in range(length):
        if any(s[i] != first[i] for s in sequences):
            return i
    return length


def strip_prefix(aug_prompt_ids: Sequence[Sequence[int]], prefix_ids: Sequence[int]) -> list[list[int]]:
    """The pairs' augmented prompts without the shared prefix (what the augmented stream after a cached prefix
    holds).

    Raises ValueError naming the pair whose prompt does not start with the prefix or has nothing after it (the
    prompt's last row must be in the stream: it predicts the first response token).
    """
    ids = list(prefix_ids)
    stripped = []
    for i, prompt in enumerate(aug_prompt_ids):
        if list(prompt[:len(ids)]) != ids:
            raise ValueError(f"aug_prompt_ids[{i}] does not start with the cached prefix ({len(ids)} tokens: the "
                             "template tokens before the refinement prompt and the prompt itself); a system message "
                             "or earlier turns before the query move p: set cache_refinement_prefix=False")
        if len(prompt) <= len(ids):
            raise ValueError(f"aug_prompt_ids[{i}] has no token after the cached prefix")
        stripped.append(list(prompt[len(ids):]))
    return stripped


def _common_suffix(a: list[int], b: list[int], limit: int) -> int:
    n = 0
    while n < limit and a[len(a) - 1 - n] == b[len(b) - 1 - n]:
        n += 1
    return n


def _augment_text(refinement_prompt: str, query: str) -> str:
    joiner = "" if refinement_prompt[-1:].isspace() or query[:1].isspace() else " "
    return refinement_prompt + joiner + query


def _augment_messages(refinement_prompt: str, messages: list[dict], position: str) -> list[dict]:
    users = [i for i, message in enumerate(messages) if message.get("role") == "user"]
    if not users:
        raise ValueError("refinement_prompt: the conversational prompt has no user message to put it in")
    target = users[-1] if position == "last_user_turn" else 0
    augmented = [dict(message) for message in messages]
    augmented[target]["content"] = _augment_text(refinement_prompt, messages[target]["content"])
    return augmented


def _render(tokenizer, messages: list[dict], *, generation_prompt: bool) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def _augmented_prompt(tokenizer, refinement_prompt: str, prompt: str | list[dict],
                      position: str = REFINEMENT_POSITIONS[0]) -> list[int]:
    """Token ids of p ⊕ x for a standard (string) or conversational (messages) prompt, untruncated."""
    if isinstance(prompt, str):
        return tokenizer(_augment_text(refinement_prompt, prompt))["input_ids"]
    return _render(tokenizer, _augment_messages(refinement_prompt, prompt, position), generation_prompt=True)


def refinement_prefix_ids(tokenizer, refinement_prompt: str, *, conversational: bool = False,
                          first_role: str = "user") -> list[int]:
    """The token ids every augmented prompt of :func:`tokenize_pair` starts with: the fixed template tokens before
    the refinement prompt p (a bos; for conversational data the chat template's opening of a first turn of
    ``first_role``) and p's tokens, without a last token that merges with the query. Computed from the tokenizer
    and p alone (the common prefix of the augmented prompts of queries that differ in their first character),
    never from data. ``first_role="system"`` gives the prefix of ``refinement_position="before_conversation"``
    prompts that open with a system message."""
    def probe(query: str):
        if not conversational:
            return query
        opening = [{"role": first_role, "content": query}]
        return opening if first_role == "user" else [*opening, {"role": "user", "content": "q"}]

    position = "before_conversation" if first_role != "user" else REFINEMENT_POSITIONS[0]
    augmented = [_augmented_prompt(tokenizer, refinement_prompt, probe(q), position) for q in _PROBE_QUERIES]
    return augmented[0][:shared_prefix_length(augmented)]


def _tokenize_texts(example: dict, tokenizer, refinement_prompt: str | None, position: str):
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
        aug = None if refinement_prompt is None else _augmented_prompt(tokenizer, refinement_prompt, prompt,
                                                                       position)
        return (*ids, aug)
    for key in ("prompt", "chosen", "rejected"):
        if not isinstance(example[key], str):
            raise ValueError(f"{key!r} must be a string or a list of messages, got {type(example[key]).__name__}")
    eos = tokenizer.eos_token or ""
    chosen = chosen if chosen.endswith(eos) else chosen + eos
    rejected = rejected if rejected.endswith(eos) else rejected + eos
    ids = tuple(tokenizer(text)["input_ids"] for text in (prompt, prompt + chosen, prompt + rejected))
    aug = None if refinement_prompt is None else _augmented_prompt(tokenizer, refinement_prompt, prompt)
    return (*ids, aug)


def _truncate(prompt: list[int], responses: list[list[int]], max_length: int | None,
              max_prompt_length: int | None, mode: str) -> tuple[range, list[list[int]]]:
    """The kept prompt positions and the (possibly cut) responses that share the prompt: prompt + the longest
    response ≤ ``max_length`` (module docstring)."""
    start, stop = 0, len(prompt)
    if max_prompt_length is not None and stop > max_prompt_length:
        start, stop = (stop - max_prompt_length, stop) if mode == "keep_end" else (0, max_prompt_length)
    longest = max(len(response) for response in responses)
    if max_length is not None and (stop - start) + longest > max_length:
        if mode == "keep_end":
            start = max(start, stop - max(max_length - longest, 1))
        else:
            stop = min(stop, start + max_length)
        room = max_length - (stop - start)
        responses = [response[:room] for response in responses]
    return range(start, stop), responses


def _check_truncation(max_length: int | None, max_prompt_length: int | None, truncation_mode: str) -> None:
    if truncation_mode not in TRUNCATION_MODES:
        raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {truncation_mode!r}")
    for name, value, least in (("max_length", max_length, 2), ("max_prompt_length", max_prompt_length, 1)):
        if value is not None and (not isinstance(value, int) or value < least):
            raise ValueError(f"{name} must be None or an int >= {least}, got {value!r}")


def _empty_after_truncation(name: str, prompt: list[int], max_length: int | None, mode: str) -> ValueError:
    return ValueError(f"empty {name} response after truncation: the prompt ({len(prompt)} tokens) fills "
                      f"max_length={max_length} with truncation_mode={mode!r}")


def _augmented_kept(plain: list[int], aug: list[int], kept: range) -> list[int]:
    """The augmented prompt restricted like the plain one: the query tokens it shares with the plain prompt at its
    end follow the plain prompt's truncation; everything before them (template, p, merged tokens) is kept whole."""
    head = shared_prefix_length([plain, aug])
    tail = _common_suffix(plain, aug, min(len(plain), len(aug)) - head)
    shift = len(aug) - len(plain)
    kept_tail = [aug[i + shift] for i in range(len(plain) - tail, len(plain)) if i in kept]
    return aug[:len(aug) - tail] + kept_tail


def tokenize_pair(example: dict[str, Any], tokenizer, *, refinement_prompt: str | None = None,
                  max_length: int | None = 1024, max_prompt_length: int | None = None,
                  truncation_mode: str = TRUNCATION_MODES[0], assistant_only: bool = False,
                  refinement_position: str = REFINEMENT_POSITIONS[0]) -> dict[str, list[int]]:
    """Tokenize a preference example (standard or conversational, explicit or implicit prompt).

    Returns ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids`` (lists of int; the sequences are
    prompt ⊕ chosen and prompt ⊕ rejected), plus ``aug_prompt_input_ids`` (p ⊕ x) when ``refinement_prompt``
    is given, placed per ``refinement_position``, plus ``chosen_token_weights``/``rejected_token_weights`` (cut
    with their tokens) when the example has token-weight or segment columns (:mod:`fastpref.data.token_weights`)
    or ``assistant_only`` is set (conversational data: weight 0 on the tokens each non-assistant turn of a response
    renders, times any given weights). Truncation: see the module docstring. Raises ``ValueError`` naming the
    problem for an empty
    prompt or an empty response (before or after truncation) and for bad arguments.
    """
    _check_truncation(max_length, max_prompt_length, truncation_mode)
    if refinement_position not in REFINEMENT_POSITIONS:
        raise ValueError(f"refinement_position must be one of {REFINEMENT_POSITIONS}, got {refinement_position!r}")
    if refinement_prompt is not None and (not isinstance(refinement_prompt, str) or not refinement_prompt):
        raise ValueError(f"refinement_prompt must be None or a non-empty string, got {refinement_prompt!r}")
    split = split_pair(example, tokenizer, refinement_prompt, refinement_position)
    prompt, chosen, rejected = split.prompt_full[:split.prompt_len], split.chosen, split.rejected
    kept, (chosen, rejected) = _truncate(prompt, [chosen, rejected], max_length, max_prompt_length, truncation_mode)
    for name, ids in (("chosen", chosen), ("rejected", rejected)):
        if not ids:
            raise _empty_after_truncation(name, prompt, max_length, truncation_mode)
    out = {"prompt_input_ids": prompt[kept.start:kept.stop], "chosen_input_ids": chosen,
           "rejected_input_ids": rejected}
    out.update(_response_weights(split, tokenizer, {"chosen": len(chosen), "rejected": len(rejected)},
                                 assistant_only))
    if split.aug_full is not None:
        # Drop the same prompt tail that merged into the responses, then truncate like the plain prompt.
        aug = split.aug_full[:len(split.aug_full) - (len(split.prompt_full) - split.prompt_len)]
        out["aug_prompt_input_ids"] = _augmented_kept(prompt, aug, kept)
    return out


def tokenize_ranked(example: dict[str, Any], tokenizer, *, max_length: int | None = 1024,
                    max_prompt_length: int | None = None, truncation_mode: str = TRUNCATION_MODES[0]
                    ) -> dict[str, list]:
    """Tokenize a ranked example (``prompt``, ``completions``: K responses) as K pairs would be, truncated as one
    pair is: the prompt and every completion follow :func:`tokenize_pair`'s rule for prompt + the longest
    completion ≤ ``max_length`` (module docstring), so all K share one prompt.

    Returns ``prompt_input_ids`` and ``completions_input_ids`` (K token lists). Raises ``ValueError`` when the
    completions leave different prompt tokens (a completion merges with the prompt's last token), and like
    :func:`tokenize_pair` for an empty prompt or completion (before or after truncation) and for bad arguments.
    """
    _check_truncation(max_length, max_prompt_length, truncation_mode)
    splits = [split_pair({"prompt": example["prompt"], "chosen": y, "rejected": y}, tokenizer, None)
              for y in example["completions"]]
    prompt = splits[0].prompt_full[:splits[0].prompt_len]
    if any(split.prompt_full[:split.prompt_len] != prompt for split in splits[1:]):
        raise ValueError("the completions leave different prompt tokens (a completion merges with the prompt's "
                         "last token); start each completion on a token boundary")
    kept, completions = _truncate(prompt, [split.chosen for split in splits], max_length, max_prompt_length,
                                  truncation_mode)
    for k, ids in enumerate(completions):
        if not ids:
            raise _empty_after_truncation(f"completions[{k}]", prompt, max_length, truncation_mode)
    return {"prompt_input_ids": prompt[kept.start:kept.stop], "completions_input_ids": completions}


class SplitPair(NamedTuple):
    """A pair's untruncated tokens: the prompt ends at ``prompt_len`` of ``prompt_full``."""
    example: dict
    prompt_full: list[int]
    prompt_len: int
    chosen: list[int]
    rejected: list[int]
    aug_full: list[int] | None


def split_pair(example: dict[str, Any], tokenizer, refinement_prompt: str | None,
               refinement_position: str = REFINEMENT_POSITIONS[0]) -> SplitPair:
    """``example`` (prompt extracted) tokenized and split into prompt and responses, untruncated; ValueError for an
    empty prompt or response."""
    example = extract_prompt(example)
    prompt_full, chosen_full, rejected_full, aug_full = _tokenize_texts(example, tokenizer, refinement_prompt,
                                                                        refinement_position)
    prompt_len = min(shared_prefix_length([prompt_full, full]) for full in (chosen_full, rejected_full))
    if prompt_len == 0:
        raise ValueError("empty prompt: the first response token needs a prompt token to predict it "
                         "(give a prompt, or use a tokenizer that adds a bos token)")
    split = SplitPair(example, prompt_full, prompt_len, chosen_full[prompt_len:], rejected_full[prompt_len:],
                      aug_full)
    for name in SIDES:
        if not getattr(split, name):
            raise ValueError(f"empty {name} response after tokenization")
    return split


def response_tokens(example: dict, tokenizer) -> dict[str, list[int]]:
    """The token ids of ``example``'s chosen and rejected responses as the trainer tokenizes them (untruncated):
    ``{"chosen": [...], "rejected": [...]}``, one entry per weight of ``{side}_token_weights``
    (:mod:`fastpref.data.token_weights`). ``tokenizer.convert_ids_to_tokens`` turns them into strings."""
    split = split_pair(example, tokenizer, None)
    return {"chosen": split.chosen, "rejected": split.rejected}


def _segment_offsets(split: SplitPair, tokenizer, side: str, column: str) -> tuple[list[tuple[int, int]], int]:
    """Each untruncated response token's character span within the response text, and the text's length."""
    example = split.example
    if not isinstance(example["prompt"], str):
        raise ValueError(f"{column} needs standard (string) data: conversational responses have no single text to "
                         f"index; give {side}_token_weights instead")
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"{column} needs a fast tokenizer (its offset mapping maps characters to tokens)")
    prompt, response = example["prompt"], example[side]
    eos = tokenizer.eos_token or ""
    text = response if response.endswith(eos) else response + eos
    offsets = tokenizer(prompt + text, return_offsets_mapping=True)["offset_mapping"][split.prompt_len:]
    length = len(response) - (len(eos) if eos and response.endswith(eos) else 0)
    return [(start - len(prompt), end - len(prompt)) for start, end in offsets], length


def assistant_token_mask(split: SplitPair, tokenizer, side: str) -> list[float]:
    """1.0 for each response token rendered by an assistant turn, 0.0 for those of any other turn (user, tool,
    system). The turns are found by rendering the conversation one response message more at a time; a ValueError
    if the chat template does not render a conversation as the concatenation of its turns."""
    example = split.example
    if not is_conversational(example):
        raise ValueError("assistant_only needs conversational data (lists of messages)")
    full = split.prompt_full[:split.prompt_len] + getattr(split, side)
    mask, done = [], split.prompt_len
    for count, message in enumerate(example[side], start=1):
        rendered = _render(tokenizer, example["prompt"] + example[side][:count], generation_prompt=False)
        end = len(rendered) if count < len(example[side]) else len(full)
        if rendered[:end] != full[:end] or end < done:
            raise ValueError(f"assistant_only: the chat template does not render the {side} conversation turn by "
                             "turn (a prefix of turns is not a prefix of its tokens)")
        mask += [1.0 if message.get("role") == "assistant" else 0.0] * (end - done)
        done = end
    return mask


def _response_weights(split: SplitPair, tokenizer, kept: dict[str, int], assistant_only: bool = False
                      ) -> dict[str, list[float]]:
    """``{side}_token_weights`` (cut to the ``kept`` response lengths) from the example's token-weight or segment
    columns, 1 for every token of a side with neither, times the assistant mask when ``assistant_only``; empty
    when no side has any and ``assistant_only`` is off."""
    example, out = split.example, {}
    for side, weights_column, segments_column in zip(SIDES, TOKEN_WEIGHT_COLUMNS, SEGMENT_COLUMNS, strict=True):
        given = [c for c in (weights_column, segments_column) if example.get(c) is not None]
        if len(given) == 2:
            raise ValueError(f"give {weights_column} or {segments_column}, not both")
        if not given:
            continue
        tokens = getattr(split, side)
        if given[0] == weights_column:
            weights = checked_token_weights(example[weights_column], len(tokens), weights_column)
        else:
            offsets, length = _segment_offsets(split, tokenizer, side, segments_column)
            weights = segment_token_weights(example[segments_column], offsets, length, segments_column)
        out[weights_column] = weights[:kept[side]]
    if out or assistant_only:
        for side, column in zip(SIDES, TOKEN_WEIGHT_COLUMNS, strict=True):
            out.setdefault(column, [1.0] * kept[side])
            if assistant_only:
                mask = assistant_token_mask(split, tokenizer, side)[:kept[side]]
                out[column] = [w * m for w, m in zip(out[column], mask, strict=True)]
    return out
