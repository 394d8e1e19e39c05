"""Float64 pure-PyTorch oracles of every fastpref op: plain formulas, full logits, no tricks.

They are the ground truth of the tests and the benchmarks, never the fast path.
"""

from .logps import linear_logps, logits_logps
from .losses import preference_loss

__all__ = ["linear_logps", "logits_logps", "preference_loss"]
