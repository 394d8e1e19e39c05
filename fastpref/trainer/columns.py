"""The dataset columns the trainer knows: every column of a dataset is used or refused by name, never dropped.

- text: ``prompt``, ``chosen``, ``rejected`` (TRL's formats; tokenized into the token columns);
- token: ``prompt_input_ids``, ``chosen_input_ids``, ``rejected_input_ids``, ``aug_prompt_input_ids``;
- per token (:mod:`fastpref.data.token_weights`): ``chosen_token_weights``/``rejected_token_weights`` (one float
  per response token), or ``chosen_segments``/``rejected_segments`` (character spans, turned into token weights at
  tokenization);
- per pair (float, one value per row): ``score_chosen``/``score_rejected`` (rDPO's τ and ODPO's offset derive
  from them), ``tau``, ``offset``, ``weight`` (the pair's loss weight, ``preference_loss(weights=)``), and the
  reference log-probs ``ref_chosen_logps``, ``ref_rejected_logps``, ``aug_ref_chosen_logps``,
  ``aug_ref_rejected_logps``;
- ``example_index`` (int, added by the trainer: the reference cache is indexed by it).

Any other column raises :class:`UnknownColumnError` with what to do (a column near a known name says which).
"""

from __future__ import annotations

from fastpref.data.token_weights import SEGMENT_COLUMNS, TOKEN_WEIGHT_COLUMNS

TEXT_COLUMNS = ("prompt", "chosen", "rejected")
TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "aug_prompt_input_ids")
REFERENCE_COLUMNS = ("ref_chosen_logps", "ref_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")
PAIR_FLOAT_COLUMNS = ("score_chosen", "score_rejected", "tau", "offset", "weight", *REFERENCE_COLUMNS)
INDEX_COLUMN = "example_index"
# Every column a batch may carry besides the token streams (what Trainer's column filter must keep).
BATCH_COLUMNS = (*TOKEN_COLUMNS, *TOKEN_WEIGHT_COLUMNS, *PAIR_FLOAT_COLUMNS, INDEX_COLUMN)
KNOWN_COLUMNS = (*TEXT_COLUMNS, *SEGMENT_COLUMNS, *BATCH_COLUMNS)

# Columns users plausibly mean as something fastpref reads under another name, or that only TRL reads.
_REFUSED = {
    "weights": "per-pair loss weights go in a 'weight' column",
    "pair_weight": "per-pair loss weights go in a 'weight' column",
    "messages": "preference pairs need 'chosen'/'rejected' (with an optional 'prompt'), not an SFT 'messages' column",
    "images": "vision-language pairs are not supported",
    "token_weights": "per-token weights go in 'chosen_token_weights' and 'rejected_token_weights'",
    "margin": "a per-pair margin subtracted inside the logit goes in an 'offset' column",
    "label": "unpaired (KTO-style) data is not supported: give 'chosen' and 'rejected' per row",
}


class UnknownColumnError(ValueError):
    """A dataset column the trainer would otherwise silently ignore."""


def check_columns(column_names, dataset_name: str) -> None:
    """Raise :class:`UnknownColumnError` for every column of ``column_names`` that the trainer does not read."""
    unknown = [name for name in column_names if name not in KNOWN_COLUMNS]
    if not unknown:
        return
    reasons = "; ".join(f"{name!r}: {_REFUSED[name]}" for name in unknown if name in _REFUSED)
    raise UnknownColumnError(
        f"the {dataset_name} dataset has columns the trainer does not read: {unknown}"
        + (f" ({reasons})" if reasons else "")
        + f". Known columns: {', '.join(KNOWN_COLUMNS)}; drop the others with dataset.remove_columns(...)")
