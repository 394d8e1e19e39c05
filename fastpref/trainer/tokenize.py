"""Tokenization of a preference dataset for the trainer: its columns checked (:mod:`fastpref.trainer.columns`:
used or refused, never dropped), :func:`fastpref.data.tokenize_pair` on every row, the text columns replaced by
token ids, the per-pair columns kept, and an ``example_index`` column added (the reference cache is indexed by it).

Rows that cannot be trained on after truncation (a prompt that fills ``max_length`` under ``keep_start``
leaves an empty response) are dropped, as TRL drops them, with one warning that counts them and quotes the
first reason (:func:`map_fitting_rows`, which the listwise path's ranked rows share); any other tokenization
error is raised. Pairs whose chosen and rejected tokens, and token weights when given, are identical carry no
preference signal (every DPO-family loss sees a zero margin and no gradient) and are dropped with one warning
unless ``args.keep_identical_pairs``; the same tokens under different token weights have different weighted
log-probs and are kept. Empty responses (nothing but the eos token) are kept, as TRL keeps them (an empty
rejected answer can be meant), with one warning that counts them. Each warning names a few row indices; when
no pair is left the error says why.
"""

from __future__ import annotations

import warnings

from fastpref.data import tokenize_pair
from fastpref.data.token_weights import SEGMENT_COLUMNS, SIDES, TOKEN_WEIGHT_COLUMNS, checked_token_weights
from fastpref.trainer.columns import INDEX_COLUMN, TEXT_COLUMNS, check_columns

_ERROR_COLUMN = "_fastpref_tokenize_error"
_DROPPABLE = "after truncation"


def tokenize_dataset(dataset, tokenizer, args, name: str = "train"):
    """``dataset`` (TRL formats, or already tokenized) → token-id columns per ``args`` (a PreferenceConfig).

    Raises :class:`fastpref.trainer.columns.UnknownColumnError` for a column the trainer does not read."""
    refinement_prompt = args.refinement_prompt if args.uses_augmented_stream else None
    columns = dataset.column_names
    if columns is not None:  # an IterableDataset of unknown features has None
        check_columns(columns, name)
    if "chosen_input_ids" in columns:
        row_numbers = list(range(len(dataset)))
        if refinement_prompt is not None and "aug_prompt_input_ids" not in columns:
            raise ValueError("the tokenized dataset has no aug_prompt_input_ids column, which sr_dpo/sr_ipo with "
                             "refinement='prompt' needs: pass the untokenized dataset")
        if any(c in columns for c in SEGMENT_COLUMNS):
            raise ValueError(f"{name}: segment columns need the text: pass the untokenized dataset, or give "
                             "chosen_token_weights/rejected_token_weights")
        if args.assistant_only:
            raise ValueError(f"{name}: assistant_only needs the conversational dataset (the turns), not token ids")
        _check_token_weights(dataset, name)
    else:
        empty = {"prompt_input_ids": [], "chosen_input_ids": [], "rejected_input_ids": []}
        if refinement_prompt is not None:
            empty["aug_prompt_input_ids"] = []

        weighted = args.assistant_only or any(c in columns for c in (*TOKEN_WEIGHT_COLUMNS, *SEGMENT_COLUMNS))
        if weighted:
            empty.update({column: [] for column in TOKEN_WEIGHT_COLUMNS})

        def tokenize(example, row):
            out = tokenize_pair(example, tokenizer, refinement_prompt=refinement_prompt, max_length=args.max_length,
                                max_prompt_length=args.max_prompt_length, truncation_mode=args.truncation_mode,
                                assistant_only=args.assistant_only, refinement_position=args.refinement_position)
            if weighted:  # a row without weights (None) on one side weighs its tokens 1
                for side, column in zip(SIDES, TOKEN_WEIGHT_COLUMNS, strict=True):
                    out.setdefault(column, [1.0] * len(out[f"{side}_input_ids"]))
            return out

        dataset, row_numbers = map_fitting_rows(
            dataset, tokenize, empty, args, name, "pairs", desc="Tokenizing pairs",
            remove_columns=[c for c in (*TEXT_COLUMNS, *SEGMENT_COLUMNS) if c in columns])
    dataset = _check_pairs(dataset, row_numbers, tokenizer.eos_token_id, args.keep_identical_pairs, name)
    if INDEX_COLUMN not in dataset.column_names:
        dataset = dataset.add_column(INDEX_COLUMN, list(range(len(dataset))))
    return dataset


def map_fitting_rows(dataset, tokenize, empty: dict, args, name: str, unit: str, **map_kwargs):
    """``dataset.map(tokenize(example, row))`` without the rows that do not fit ``args.max_length`` after
    truncation (a ValueError saying "after truncation"; ``empty`` stands in for them until they are dropped), with
    one warning counting them; any other ValueError is raised naming the row. Returns the dataset and each kept
    row's number in the dataset as given. ``unit`` names the rows in the messages ("pairs")."""
    def run(example, row):
        try:
            return {**tokenize(example, row), _ERROR_COLUMN: ""}
        except ValueError as error:
            if _DROPPABLE not in str(error):
                raise ValueError(f"{name} row {row}: {error}") from error
            return {**empty, _ERROR_COLUMN: str(error)}

    dataset = dataset.map(run, with_indices=True, num_proc=args.dataset_num_proc, **map_kwargs)
    errors = [e for e in dataset[_ERROR_COLUMN] if e]
    row_numbers = [i for i, e in enumerate(dataset[_ERROR_COLUMN]) if not e]  # of the rows kept, as given
    if errors and len(errors) == len(dataset):
        raise ValueError(f"no {unit} left: all {len(dataset)} {unit} are longer than max_length={args.max_length} "
                         f"allows (truncation_mode={args.truncation_mode!r}); raise max_length, set "
                         f"max_prompt_length, or use truncation_mode='keep_end'. First: {errors[0]}")
    if errors:
        warnings.warn(f"dropped {len(errors)} of {len(dataset)} {unit} that do not fit max_length="
                      f"{args.max_length} (truncation_mode={args.truncation_mode!r}); first: {errors[0]}",
                      stacklevel=4)
        dataset = dataset.filter(lambda error: not error, input_columns=[_ERROR_COLUMN])
    return dataset.remove_columns(_ERROR_COLUMN), row_numbers


def _check_token_weights(dataset, name: str) -> None:
    """A ValueError naming the row and column of a tokenized dataset whose token weights do not match its tokens."""
    for side, column in zip(SIDES, TOKEN_WEIGHT_COLUMNS, strict=True):
        if column not in dataset.column_names:
            continue
        for row, (ids, weights) in enumerate(zip(dataset[f"{side}_input_ids"], dataset[column], strict=True)):
            if weights is not None:
                try:
                    checked_token_weights(weights, len(ids), column)
                except ValueError as error:
                    raise ValueError(f"{name} row {row}: {error}") from error


def _same_weights(dataset, rows: list[int]) -> list[int]:
    """The ``rows`` whose chosen and rejected token weights are equal too (a side without weights, None or no
    column, weighs its tokens 1): only they are no-ops for the loss; different weights give different weighted
    log-probs, a margin."""
    picked = dataset.select(rows)
    lengths = [len(ids) for ids in picked["chosen_input_ids"]]
    weights = [[w if w is not None else [1.0] * n
                for w, n in zip(picked[c] if c in picked.column_names else [None] * len(rows), lengths, strict=True)]
               for c in TOKEN_WEIGHT_COLUMNS]
    return [row for row, c, r in zip(rows, *weights, strict=True) if list(c) == list(r)]


def _check_pairs(dataset, row_numbers: list[int], eos_token_id: int | None, keep_identical: bool, name: str):
    """``dataset`` (tokenized) with a warning for empty responses and identical pairs (dropped unless
    ``keep_identical``); a ValueError when dropping leaves no pair. Warnings name rows by ``row_numbers`` (each
    row's number in the dataset as given, before rows that do not fit max_length were dropped)."""
    chosen, rejected = dataset["chosen_input_ids"], dataset["rejected_input_ids"]
    identical = [i for i, (c, r) in enumerate(zip(chosen, rejected)) if c == r]
    if identical and set(TOKEN_WEIGHT_COLUMNS) & set(dataset.column_names):
        identical = _same_weights(dataset, identical)
    empty = {"chosen": [i for i, ids in enumerate(chosen) if list(ids) in ([], [eos_token_id])],
             "rejected": [i for i, ids in enumerate(rejected) if list(ids) in ([], [eos_token_id])]}

    def few(rows: list[int], shown: int = 5) -> str:
        return ", ".join(str(row_numbers[i]) for i in rows[:shown]) + (", …" if len(rows) > shown else "")

    for side, rows in empty.items():
        if rows:
            warnings.warn(f"{name}: {len(rows)} of {len(dataset)} pairs have an empty {side} response (rows "
                          f"{few(rows)}); they are trained on as an eos-only response", stacklevel=4)
    if not identical:
        return dataset
    if keep_identical:
        warnings.warn(f"{name}: {len(identical)} of {len(dataset)} pairs have chosen == rejected (rows "
                      f"{few(identical)}); kept (keep_identical_pairs=True), they carry no preference signal",
                      stacklevel=4)
        return dataset
    if len(identical) == len(dataset):
        raise ValueError(f"no pairs left: all {len(dataset)} {name} pairs have chosen == rejected, which carries no "
                         f"preference signal; fix the data, or set keep_identical_pairs=True to train on them")
    warnings.warn(f"{name}: dropped {len(identical)} of {len(dataset)} pairs with chosen == rejected (rows "
                  f"{few(identical)}): they carry no preference signal (keep_identical_pairs=True keeps them)",
                  stacklevel=4)
    dropped = set(identical)
    return dataset.select([i for i in range(len(dataset)) if i not in dropped])
