"""Load preference data in TRL's formats.

Columns: ``chosen`` and ``rejected`` (required), ``prompt`` (explicit prompt; without it the prompt is the
longest shared start of chosen and rejected — TRL's "implicit prompt"), optional ``score_chosen``,
``score_rejected``, ``tau``, ``offset``, ``ref_chosen_logps``, ``ref_rejected_logps``.
Standard format: the columns are strings. Conversational format: lists of ``{"role", "content"}`` messages.
Ranked rows (``prompt``, ``completions``, ``scores``: the listwise format) load from the same sources.
Rows are checked before a dataset is built: bad data raises :class:`PreferenceDataError` naming the file, the
line (JSONL) or row, and the column.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from fastpref.data.synthetic import DEMO_PATH, DEMO_TRAIN_SIZE

Message = dict[str, str]


def is_conversational(example: dict[str, Any]) -> bool:
    """True when the example's prompt/chosen/rejected are lists of ``{"role", "content"}`` messages."""
    for key in ("prompt", "chosen", "rejected"):
        value = example.get(key)
        if isinstance(value, list) and value and isinstance(value[0], dict) and "role" in value[0]:
            return True
    return False


def extract_prompt(example: dict[str, Any]) -> dict[str, Any]:
    """Return the example with an explicit ``prompt``: unchanged when it has one; otherwise the prompt is the
    longest common start of ``chosen`` and ``rejected`` (whole messages for conversational data; for strings,
    whole words: cut before the whitespace that starts the responses), and the responses are what follows."""
    if "prompt" in example:
        return example
    for key in ("chosen", "rejected"):
        if key not in example:
            raise ValueError(f"preference example needs a {key!r} field; got fields {sorted(example)}")
    chosen, rejected = example["chosen"], example["rejected"]
    shared = 0
    while shared < min(len(chosen), len(rejected)) and chosen[shared] == rejected[shared]:
        shared += 1
    if isinstance(chosen, str):  # end the prompt before the whitespace that starts the responses' first word
        boundary = max(chosen.rfind(space, 0, shared + 1) for space in (" ", "\n", "\t"))
        shared = boundary if boundary > 0 else shared
        while shared > 0 and chosen[shared - 1].isspace():
            shared -= 1
    elif shared == min(len(chosen), len(rejected)):  # one conversation is a prefix of the other
        shared -= 1
    if shared == 0:
        raise ValueError("implicit prompt: 'chosen' and 'rejected' share no prompt; give a 'prompt' field")
    return {**example, "prompt": chosen[:shared], "chosen": chosen[shared:], "rejected": rejected[shared:]}


TEXT_COLUMNS = ("prompt", "chosen", "rejected")
NUMBER_COLUMNS = ("score_chosen", "score_rejected", "tau", "offset", "ref_chosen_logps", "ref_rejected_logps")
TEXT_FORMAT = "a string or a list of {'role', 'content'} messages"


class PreferenceDataError(ValueError):
    """Preference data that cannot be used, located: the file, the line (JSONL) or row, and the column."""


def _text_kind(value: Any) -> str | None:
    """The format of a text column's value ("a string" or "a message list"), None when it is neither."""
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list) and all(isinstance(m, dict) and isinstance(m.get("role"), str)
                                       and isinstance(m.get("content"), str) for m in value):
        return "a message list"
    return None


def _shown(value: Any) -> str:
    text = repr(value)
    return f"{type(value).__name__} {text if len(text) <= 40 else text[:37] + '...'}"


def check_row(row: Any, where: str) -> dict[str, str]:
    """Raise :class:`PreferenceDataError` (prefixed by ``where``, e.g. "prefs.jsonl, line 34") unless ``row`` is
    a preference example; return the format ("a string" / "a message list") of each text column it has."""
    if not isinstance(row, dict):
        raise PreferenceDataError(f"{where}: expected an object with 'chosen' and 'rejected', got {_shown(row)}")
    for key in ("chosen", "rejected"):
        if key not in row:
            raise PreferenceDataError(f"{where}: no {key!r} column (the row has {sorted(row)})")
    kinds = {}
    for key in TEXT_COLUMNS:
        if key in row:
            kinds[key] = _text_kind(row[key])
            if kinds[key] is None:
                raise PreferenceDataError(f"{where}, column {key!r}: expected {TEXT_FORMAT}, got {_shown(row[key])}")
    if len(set(kinds.values())) > 1:
        shown = ", ".join(f"{key!r} is {kind}" for key, kind in kinds.items())
        raise PreferenceDataError(f"{where}: {shown}; use one format in a row")
    for key in NUMBER_COLUMNS:
        value = row.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))):
            raise PreferenceDataError(f"{where}, column {key!r}: expected a number, got {_shown(value)}")
    return kinds


def check_rows(rows: list[Any], places: list[str]) -> None:
    """:func:`check_row` on each row, and the same known columns in the same format as the first row (the
    dataset's columns and types are the first row's)."""
    first = check_row(rows[0], places[0])
    known = set(TEXT_COLUMNS + NUMBER_COLUMNS)
    first_columns = known & set(rows[0])
    for row, where in zip(rows[1:], places[1:]):
        kinds = check_row(row, where)
        columns = known & set(row)
        if columns != first_columns:
            extra, lacking = sorted(columns - first_columns), sorted(first_columns - columns)
            differs = f"has columns {extra} that {places[0]} lacks" if extra else \
                f"lacks columns {lacking} that {places[0]} has"
            raise PreferenceDataError(f"{where}: {differs}; give every row the same columns")
        for key, kind in kinds.items():
            if kind != first[key]:
                raise PreferenceDataError(f"{where}, column {key!r}: {kind}, but {places[0]} has {first[key]}; "
                                          "use one format in a file")


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise PreferenceDataError(f"{where} column {err.colno}: invalid JSON ({err.msg})") from None


def _read_rows(path: Path) -> tuple[list[Any], list[str]]:
    """The rows of a JSONL / JSON file and where each one is ("FILE, line N" / "FILE, row index I")."""
    with open(path, encoding="utf-8") as f:
        text = f.read()
    if path.suffix == ".jsonl":
        numbered = [(n, line) for n, line in enumerate(text.splitlines(), start=1) if line.strip()]
        return ([_parse_json(line, f"{path}, line {n}") for n, line in numbered],
                [f"{path}, line {n}" for n, _ in numbered])
    try:
        data = json.loads(text)
    except json.JSONDecodeError as err:
        raise PreferenceDataError(f"{path}, line {err.lineno} column {err.colno}: invalid JSON ({err.msg})") from None
    if not isinstance(data, list):
        raise PreferenceDataError(f"{path}: a JSON preference file must hold a list of rows, got "
                                  f"{type(data).__name__}")
    return data, [f"{path}, row index {i}" for i in range(len(data))]


def _rows_dataset(path: Path):
    """A JSONL / JSON file as a ``datasets.Dataset`` with an explicit prompt, every row checked first."""
    import datasets

    rows, places = _read_rows(path)
    if not rows:
        raise PreferenceDataError(f"{path}: no rows")
    if "completions" in rows[0]:  # ranked rows (prompt, completions, scores): the listwise format
        _check_ranked_rows(rows, places)
        return datasets.Dataset.from_list(rows)
    check_rows(rows, places)
    if "prompt" not in rows[0]:
        rows = [_located(extract_prompt, row, where) for row, where in zip(rows, places)]
    return datasets.Dataset.from_list(rows)


def _check_ranked_rows(rows, places) -> None:
    """:func:`fastpref.data.ranked.check_ranked_row` on each ranked row, errors located by ``places``."""
    from fastpref.data.ranked import check_ranked_row

    for index, (row, where) in enumerate(zip(rows, places)):
        _located(lambda r: check_ranked_row(index, r), row, where)


def _located(function, row: dict[str, Any], where: str) -> dict[str, Any]:
    try:
        return function(row)
    except ValueError as err:
        raise PreferenceDataError(f"{where}: {err}") from None


def _arrow_text_format(feature: Any) -> bool:
    """True when a ``datasets`` feature holds strings or lists of {role, content} string messages."""
    import datasets

    def is_string(f):
        return isinstance(f, datasets.Value) and f.dtype in ("string", "large_string")

    if is_string(feature):
        return True
    inner = getattr(feature, "feature", None)
    return (isinstance(feature, (datasets.Sequence, datasets.List, datasets.LargeList))
            and isinstance(inner, dict) and is_string(inner.get("role")) and is_string(inner.get("content")))


def check_columns(dataset, source: str) -> None:
    """Raise :class:`PreferenceDataError` when a parquet / saved dataset's text column holds another type or a
    null, or a number column holds no numbers."""
    import datasets
    import pyarrow.compute as pc

    for key in TEXT_COLUMNS:
        if key not in dataset.column_names:
            continue
        feature = dataset.features[key]
        if not _arrow_text_format(feature):
            raise PreferenceDataError(f"{source}, column {key!r}: holds {feature}, expected {TEXT_FORMAT}")
        column = dataset.data.column(key)
        if column.null_count:
            row = pc.index(column.is_null(), True).as_py()
            raise PreferenceDataError(f"{source}, row index {row}, column {key!r}: expected {TEXT_FORMAT}, got None")
    for key in NUMBER_COLUMNS:
        feature = dataset.features.get(key)
        if feature is not None and not (isinstance(feature, datasets.Value)
                                        and feature.dtype.startswith(("int", "uint", "float", "null"))):
            raise PreferenceDataError(f"{source}, column {key!r}: holds {feature}, expected numbers")


def load_preference_dataset(path_or_name: str | os.PathLike, *, split: str | None = None):
    """Load a preference dataset as a ``datasets.Dataset`` with an explicit ``prompt`` column.

    ``path_or_name``: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory written by
    ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, then ``split`` picks the part), or ``"demo"`` — the
    bundled synthetic set, whose ``split`` is ``"train"`` (its first ``DEMO_TRAIN_SIZE`` rows), ``"test"``
    (the rest, held out) or None (all rows). Ranked rows (``prompt``, ``completions``, ``scores``: the listwise
    format, :mod:`fastpref.trainer.listwise`) load as they are from any of these sources, each row checked.
    """
    import datasets

    if str(path_or_name) == "demo":
        dataset = load_preference_dataset(DEMO_PATH)
        if split is None:
            return dataset
        if split not in ("train", "test"):
            raise ValueError(f"split for 'demo' must be 'train', 'test' or None, got {split!r}")
        rows = range(DEMO_TRAIN_SIZE) if split == "train" else range(DEMO_TRAIN_SIZE, len(dataset))
        return dataset.select(rows)
    path = Path(path_or_name)
    if not path.exists():
        raise ValueError(f"path_or_name: {str(path)!r} is neither 'demo' nor an existing file or directory")
    if path.is_dir():
        loaded = datasets.load_from_disk(str(path))
        if isinstance(loaded, datasets.DatasetDict):
            if split is None or split not in loaded:
                raise ValueError(f"{path} holds splits {sorted(loaded)}; pass split= one of them")
            loaded = loaded[split]
        dataset = loaded
    elif split is not None:
        raise ValueError(f"split={split!r} applies to 'demo' and DatasetDict folders, not to the file {path}")
    elif path.suffix == ".parquet":
        dataset = datasets.Dataset.from_parquet(str(path))
    elif path.suffix in (".jsonl", ".json"):
        return _rows_dataset(path)
    else:
        raise ValueError(f"path_or_name: unsupported file type {path.suffix!r} (want .jsonl, .json, .parquet)")
    if "completions" in dataset.column_names:  # ranked rows, as from a JSONL file
        _check_ranked_rows(dataset, (f"{path}, row index {i}" for i in range(len(dataset))))
        return dataset
    missing = {"chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise PreferenceDataError(f"{path}: preference data needs columns {sorted(missing)}; has "
                                  f"{dataset.column_names}")
    check_columns(dataset, str(path))
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(lambda row, index: _located(extract_prompt, row, f"{path}, row index {index}"),
                              with_indices=True)
    return dataset
