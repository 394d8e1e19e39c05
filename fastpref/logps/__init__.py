"""Per-sequence log-probs: the public ops (``api``), their argument checks (``inputs``), the backend interface
(``contract``), one module per backend (``torch_backend``, ``cpp_backend``, ``triton_backend``; the Triton kernels
themselves live in ``fastpref.kernels``) and the float64 ``oracle`` the tests check them against."""

from fastpref.logps.api import LogpsOutput, TokenStats, linear_logps, logits_logps, sequence_sums
from fastpref.logps.inputs import IGNORE_INDEX, skip_value_checks

__all__ = ["IGNORE_INDEX", "LogpsOutput", "TokenStats", "linear_logps", "logits_logps", "sequence_sums",
           "skip_value_checks"]
