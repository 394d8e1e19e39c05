"""The "cpp" backend: the compiled CPU kernels of ``fastpref._C``, called as ``torch.ops.fastpref.*``.

The kernels (``csrc/linear_logps_cpu.cpp``, ``csrc/logits_logps_cpu.cpp``) compute, for each row with label y,
log p = z[y] − logsumexp(z) with z = cap(h·Wᵀ + b) / T, walking the vocabulary in tiles with an online
log-sum-exp (never [N, V] logits), in float32 (float64 for float64 inputs); their backward recomputes the tiles
and forms (onehot(y) − softmax(z))·g / T (· (1 − tanh²) under a softcap). Ignored rows and rows with a zero
upstream gradient cost no vocabulary work. This module only adapts the backend contract of
:mod:`fastpref.impl` to the op schemas: ``softcap=None`` is passed as 0.0 and empty results mean "not computed".
"""

from __future__ import annotations

import torch

from .. import _ext

if _ext.extension() is None:  # resolve_backend never picks "cpp" then; importing directly is a usage error
    raise ImportError(f"the cpp backend needs the compiled extension: {_ext.missing_reason()}")

from . import cpp_fakes  # noqa: E402,F401  (registers the fake kernels of the ops used below)

_ops = torch.ops.fastpref


def _or_none(tensor: torch.Tensor, wanted: bool) -> torch.Tensor | None:
    return tensor if wanted else None


def linear_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_lse):
    return _ops.linear_logps_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap or 0.0, need_lse)


def linear_backward(hidden, weight, bias, labels, lse, grad_rows, ignore_index, temperature, softcap,
                    need_hidden, need_weight, need_bias):
    dhidden, dweight, dbias = _ops.linear_logps_bwd(hidden, weight, bias, labels, lse, grad_rows, ignore_index,
                                                    temperature, softcap or 0.0, need_hidden, need_weight,
                                                    need_bias)
    return _or_none(dhidden, need_hidden), _or_none(dweight, need_weight), _or_none(dbias, need_bias)


def logits_forward(logits, labels, ignore_index, temperature, need_lse):
    return _ops.logits_logps_fwd(logits, labels, ignore_index, temperature, need_lse)


def logits_backward(logits, labels, lse, grad_rows, ignore_index, temperature):
    return _ops.logits_logps_bwd(logits, labels, lse, grad_rows, ignore_index, temperature)
