"""fastpref: fused kernels and a thin trainer for DPO-family preference optimization.

Public ops: :func:`linear_logps`, :func:`logits_logps` (per-sequence log-probs), :func:`preference_loss`
(the DPO loss family), :func:`linear_preference_loss` (hidden states to the loss; 3 GEMMs with a trainable head where
it pays), :func:`listwise_loss` (K ranked responses), :func:`backends` (which implementations exist here). Float64 oracles of each op live in
:mod:`fastpref.logps.oracle` and :mod:`fastpref.losses.oracle`. The trainer (:class:`PreferenceConfig`, :class:`PreferenceTrainer`) needs the
``train`` extra and is imported on first use.
"""

from __future__ import annotations

from fastpref.backends import BackendUnavailableError, backends
from fastpref.logps.api import LogpsOutput, TokenStats, linear_logps, logits_logps
from fastpref.logps.inputs import skip_value_checks

__version__ = "0.1.0"

_LAZY = {
    "preference_loss": ("fastpref.losses", "preference_loss"),
    "PreferenceLossOutput": ("fastpref.losses", "PreferenceLossOutput"),
    "linear_preference_loss": ("fastpref.losses", "linear_preference_loss"),
    "LinearPreferenceOutput": ("fastpref.losses", "LinearPreferenceOutput"),
    "listwise_loss": ("fastpref.losses", "listwise_loss"),
    "ListwiseLossOutput": ("fastpref.losses", "ListwiseLossOutput"),
    "PreferenceConfig": ("fastpref.trainer", "PreferenceConfig"),
    "PreferenceTrainer": ("fastpref.trainer", "PreferenceTrainer"),
}

__all__ = ["BackendUnavailableError", "LogpsOutput", "TokenStats", "backends", "linear_logps", "logits_logps", "skip_value_checks", *_LAZY]


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        module_name, attr = _LAZY[name]
        value = getattr(importlib.import_module(module_name), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'fastpref' has no attribute {name!r}")
