"""Per-token weights of a preference pair's responses, given as data (TGDPO, 2D-DPO, SDPO, Full-Step-DPO, DMPO).

Two dataset forms, per side (``chosen``/``rejected``):

* ``{side}_token_weights``: one float per token of the response as the trainer tokenizes it, before truncation
  (:func:`fastpref.data.tokenization.response_tokens` returns those tokens, to align weights with them); truncation cuts the weights with
  their tokens. A length mismatch is a ``ValueError`` naming the column.
* ``{side}_segments``: a list of ``[start_char, end_char, weight]`` spans of the response text (standard, string
  data: the text after the prompt, without the eos token the tokenizer appends), ``end_char`` exclusive, spans
  not overlapping. Tokens are mapped to characters with the fast tokenizer's offset mapping: a token takes the
  weight of the first span (in text order) it shares at least one character with; a token partly inside a span
  thus takes the span's weight whole. Tokens covering no span character (uncovered text, the eos token) weigh 1.

The weights multiply each token's log-probability in the policy, the reference and the Sr-DPO augmented streams:
log π(y) = Σ_t w_t log π(y_t | x, y_<t).
"""

from __future__ import annotations

from collections.abc import Sequence

SIDES = ("chosen", "rejected")
TOKEN_WEIGHT_COLUMNS = tuple(f"{side}_token_weights" for side in SIDES)
SEGMENT_COLUMNS = tuple(f"{side}_segments" for side in SIDES)


def checked_token_weights(weights, length: int, column: str) -> list[float]:
    """``weights`` as a list of ``length`` finite floats; a ValueError naming ``column`` otherwise."""
    if isinstance(weights, (str, bytes)) or not isinstance(weights, Sequence) and not hasattr(weights, "tolist"):
        raise ValueError(f"{column} must be a list of floats, got {type(weights).__name__}")
    values = [float(w) for w in (weights.tolist() if hasattr(weights, "tolist") else weights)]
    if len(values) != length:
        raise ValueError(f"{column} has {len(values)} weights but the response has {length} tokens as the trainer "
                         "tokenizes it (fastpref.data.response_tokens(row, tokenizer) returns them)")
    if any(w != w or w in (float("inf"), float("-inf")) for w in values):
        raise ValueError(f"{column} holds a non-finite weight")
    return values


def _checked_spans(segments, text_length: int, column: str) -> list[tuple[int, int, float]]:
    spans = []
    for span in segments:
        if len(span) != 3:
            raise ValueError(f"{column}: each segment is [start_char, end_char, weight], got {span!r}")
        start, end, weight = int(span[0]), int(span[1]), float(span[2])
        if not 0 <= start < end <= text_length:
            raise ValueError(f"{column}: segment {list(span)} is not a non-empty span of the {text_length}-character "
                             "response")
        spans.append((start, end, weight))
    spans.sort()
    for (_, end, _), (start, _, _) in zip(spans, spans[1:]):
        if start < end:
            raise ValueError(f"{column}: segments overlap at character {start}")
    return spans


def segment_token_weights(segments, offsets: Sequence[tuple[int, int]], text_length: int, column: str) -> list[float]:
    """Token weights from character spans (module docstring). ``offsets``: each response token's [start, end)
    characters within the response text (the eos token's lie past ``text_length``, or are empty)."""
    spans = _checked_spans(segments, text_length, column)
    weights = []
    for start, end in offsets:
        hit = next((w for s, e, w in spans if start < e and s < end), 1.0)
        weights.append(hit)
    return weights
