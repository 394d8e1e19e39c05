"""The DPO family of preference losses as one fused op: :func:`preference_loss`.

``table`` holds the loss table (one entry per loss type: formula, paper, what it needs; the compiled kernels'
layout; Sr-DPO's Δ); ``inputs`` checks the arguments; ``fused`` holds the backend interface and runs the compiled
backends (``cpp_backend``: csrc/preference_loss_cpu.cpp, ``triton_backend``: fastpref.kernels.preference_loss);
``torch_backend`` evaluates the table with PyTorch ops; ``oracle`` is the float64 ground truth of the tests,
written independently; ``listwise`` holds the listwise losses over K ranked responses (:func:`listwise_loss`, float64 truth in
``listwise_oracle``); ``linear_loss`` goes from hidden states to the loss (:func:`linear_preference_loss`, the kept-logits 3-GEMM
path); ``scores`` turns judge scores into ODPO offsets and rDPO's τ.
"""

from fastpref.losses.api import preference_loss
from fastpref.losses.table import (LOSS_DEFINITIONS, LOSS_TYPES, REFERENCE_FREE_LOSS_TYPES, REFINED_LOSS_TYPES,
                                   TRL_LOSS_TYPES, refinement_delta)
from fastpref.losses.scores import TAU_MODES, bt_tau, odpo_offset, tau_from_scores
from fastpref.losses.output import PreferenceLossOutput
from fastpref.losses.listwise import LISTWISE_LOSS_TYPES, ListwiseLossOutput, listwise_loss
from fastpref.losses.linear_loss import LinearPreferenceOutput, linear_preference_loss

__all__ = [
           "LISTWISE_LOSS_TYPES",
           "LinearPreferenceOutput",
           "LOSS_DEFINITIONS",
           "ListwiseLossOutput",
           "LOSS_TYPES",
           "TRL_LOSS_TYPES",
           "PreferenceLossOutput",
           "REFERENCE_FREE_LOSS_TYPES",
           "REFINED_LOSS_TYPES",
           "bt_tau",
           "linear_preference_loss",
           "listwise_loss",
           "odpo_offset",
           "preference_loss",
           "refinement_delta",
           "tau_from_scores",
           "TAU_MODES",
]
