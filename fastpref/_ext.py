"""Loads the compiled extension ``fastpref._C`` and records why it is missing when it is.

``import fastpref`` never fails because of the extension: the "cpp" backend is then reported as missing,
with the reason, by :func:`fastpref.backends`.
"""

from __future__ import annotations

import importlib
import os

import torch

_module = None
_missing_reason: str | None = None
_TRUE = frozenset({"1", "true", "yes", "on"})


def env_flag(name: str) -> bool:
    """Whether environment variable ``name`` is set to a true value: 1/true/yes/on, any case, spaces ignored
    (the same reading as setup.py's build switches)."""
    return os.environ.get(name, "").strip().lower() in _TRUE


def _load() -> None:
    global _module, _missing_reason
    if env_flag("FASTPREF_NO_EXT"):
        _missing_reason = "disabled by FASTPREF_NO_EXT=1"
        return
    try:
        module = importlib.import_module("fastpref._C")
    except ImportError as err:
        _missing_reason = f"fastpref._C is not built or failed to load ({err})"
        return
    running = torch.__version__.split("+")[0]
    built = getattr(module, "built_with_torch", "unknown")
    if built != running:
        _missing_reason = f"fastpref._C was built for torch {built}, running torch {running}: rebuild it"
        return
    _module = module


def extension():
    """The loaded ``fastpref._C`` module, or None."""
    return _module


def missing_reason() -> str | None:
    """Why ``fastpref._C`` is unusable, or None when it is loaded."""
    return _missing_reason


_load()
