"""The DPO family of preference losses as one fused op: :func:`preference_loss`.

definitions.py holds the table (one entry per loss type: formula, paper, what it needs); inputs.py checks
arguments; torch_path.py evaluates the table with PyTorch ops (the "torch" backend and the float64 oracle);
fused.py runs the compiled kernels ("cpp": csrc/preference_loss_cpu.cpp, "triton": kernels/preference_loss.py).
"""

from .api import preference_loss
from .definitions import LOSS_DEFINITIONS, LOSS_TYPES, TRL_LOSS_TYPES
from .helpers import bt_tau, odpo_offset
from .output import PreferenceLossOutput

__all__ = [
           "LOSS_DEFINITIONS",
           "LOSS_TYPES",
           "TRL_LOSS_TYPES",
           "PreferenceLossOutput",
           "bt_tau",
           "odpo_offset",
           "preference_loss",
]
