"""The last complete checkpoint of an output directory, for ``train(resume_from_checkpoint=True)``.

transformers picks the highest-numbered ``checkpoint-N`` folder whatever it holds; a run killed while saving
leaves one without its trainer state, weights or optimizer, and resuming from it then fails. Here a checkpoint
counts only when ``trainer_state.json`` parses, its model (or adapter) weights are present and readable, and the
optimizer and scheduler states are there when the run saves them; torn ones are skipped with a warning.

Each checkpoint also holds ``fastpref_state.json``: what fastpref's trainer counts beside transformers'
``TrainerState`` (``num_tokens``, the training tokens seen so far over every process), which a resumed run
continues from (a checkpoint without it, e.g. from an older fastpref, continues from 0).
"""

from __future__ import annotations

import json
import os
import re
import warnings
from pathlib import Path

FASTPREF_STATE_NAME = "fastpref_state.json"
_CHECKPOINT = re.compile(r"checkpoint-(\d+)")
_WEIGHTS = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json",
            "adapter_model.safetensors", "adapter_model.bin")


def _readable_weights(path: Path) -> bool:
    if path.name.endswith(".json"):
        return _parses(path)
    if path.suffix != ".safetensors":
        return path.stat().st_size > 0
    try:
        from safetensors import safe_open

        with safe_open(str(path), framework="pt", device="cpu") as handle:
            handle.keys()
    except Exception:  # any parse failure: a torn file
        return False
    return True


def _parses(path: Path) -> bool:
    try:
        json.loads(path.read_text())
    except (OSError, ValueError):
        return False
    return True


def checkpoint_problem(folder: Path, *, expects_optimizer: bool) -> str | None:
    """What makes ``folder`` unusable as a checkpoint to resume from, or None when it is complete."""
    if not _parses(folder / "trainer_state.json"):
        return "trainer_state.json is missing or unreadable"
    weights = [folder / name for name in _WEIGHTS if (folder / name).is_file()]
    if not weights:
        return "it holds no model weights"
    if not all(_readable_weights(path) for path in weights):
        return "its model weights are torn"
    if expects_optimizer:
        missing = [name for name in ("optimizer.pt", "scheduler.pt") if not (folder / name).is_file()]
        if missing:
            return f"{' and '.join(missing)} missing"
    return None


def last_complete_checkpoint(output_dir: str | os.PathLike, *, expects_optimizer: bool) -> str | None:
    """The highest-numbered complete ``checkpoint-N`` in ``output_dir`` (warning about each torn one skipped on
    the way), or None. ``expects_optimizer``: the run saves optimizer and scheduler states (no
    ``save_only_model``, no DeepSpeed/FSDP, which save them in their own layout)."""
    root = Path(output_dir)
    if not root.is_dir():
        return None
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := _CHECKPOINT.fullmatch(p.name)) and p.is_dir()]
    for _, folder in sorted(found, reverse=True):
        problem = checkpoint_problem(folder, expects_optimizer=expects_optimizer)
        if problem is None:
            return str(folder)
        warnings.warn(f"skipping incomplete checkpoint {folder} ({problem}); resuming from an earlier one",
                      stacklevel=3)
    return None


def save_fastpref_state(folder: str | os.PathLike, *, num_tokens: int) -> None:
    """Write ``fastpref_state.json`` into the checkpoint ``folder`` (created when missing)."""
    os.makedirs(folder, exist_ok=True)
    (Path(folder) / FASTPREF_STATE_NAME).write_text(json.dumps({"num_tokens": num_tokens}))


def saved_num_tokens(folder: str | os.PathLike) -> int:
    """The ``num_tokens`` a checkpoint saved, or 0 when it holds no (readable) ``fastpref_state.json``."""
    path = Path(folder) / FASTPREF_STATE_NAME
    if not _parses(path):
        return 0
    return int(json.loads(path.read_text()).get("num_tokens", 0))
