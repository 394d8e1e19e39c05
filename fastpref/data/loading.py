"""Load preference data in TRL's formats.

Columns: ``chosen`` and ``rejected`` (required), ``prompt`` (explicit prompt; without it the prompt is the
longest shared start of chosen and rejected — TRL's "implicit prompt"), optional ``score_chosen``,
``score_rejected``, ``tau``, ``offset``, ``ref_chosen_logps``, ``ref_rejected_logps``.
Standard format: the columns are strings. Conversational format: lists of ``{"role", "content"}`` messages.
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


def _read_rows(path: Path) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        with open(path, encoding="utf-8") as f:
            return [json.loads(line) for line in f if line.strip()]
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    if not isinstance(data, list):
        raise ValueError(f"{path}: a JSON preference file must hold a list of rows, got {type(data).__name__}")
    return data


def load_preference_dataset(path_or_name: str | os.PathLike, *, split: str | None = None):
    """Load a preference dataset as a ``datasets.Dataset`` with an explicit ``prompt`` column.

    ``path_or_name``: a ``.jsonl`` / ``.json`` / ``.parquet`` file, a directory written by
    ``Dataset.save_to_disk`` (or a ``DatasetDict``'s, then ``split`` picks the part), or ``"demo"`` — the
    bundled synthetic set, whose ``split`` is ``"train"`` (its first ``DEMO_TRAIN_SIZE`` rows), ``"test"``
    (the rest, held out) or None (all rows).
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
        dataset = datasets.Dataset.from_list(_read_rows(path))
    else:
        raise ValueError(f"path_or_name: unsupported file type {path.suffix!r} (want .jsonl, .json, .parquet)")
    missing = {"chosen", "rejected"} - set(dataset.column_names)
    if missing:
        raise ValueError(f"{path}: preference data needs columns {sorted(missing)}; has {dataset.column_names}")
    if "prompt" not in dataset.column_names:
        dataset = dataset.map(extract_prompt)
    return dataset
