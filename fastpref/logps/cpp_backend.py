"""The "cpp" backend: the compiled CPU kernels of ``fastpref._C``, called as ``torch.ops.fastpref.*``.

The kernels (``csrc/linear_logps_cpu.cpp``, ``csrc/logits_logps_cpu.cpp``) compute, for each row with label y,
log p = z[y] − logsumexp(z) with z = cap(h·Wᵀ + b) / T, walking the vocabulary in tiles with an online
log-sum-exp (never [N, V] logits), in float32 (float64 for float64 inputs); their backward recomputes the tiles
and forms (onehot(y) − softmax(z))·g / T (· (1 − tanh²) under a softcap). Ignored rows and rows with a zero
upstream gradient cost no vocabulary work. This module only adapts the backend contract of
:mod:`fastpref.logps.contract` to the op schemas: ``softcap=None`` is passed as 0.0 and empty results mean "not computed".
"""

from __future__ import annotations

import torch

from fastpref import _ext

if _ext.extension() is None:  # resolve_backend never picks "cpp" then; importing directly is a usage error
    raise ImportError(f"the cpp backend needs the compiled extension: {_ext.missing_reason()}")

from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels, absent_to_none  # noqa: E402

_ops = torch.ops.fastpref

# Fake (meta) kernels, so that the ops trace under FakeTensorMode and torch.compile. Shapes follow the schemas in
# csrc/: token_logps and lse are [N] float32 (lse [0] when not asked for); a gradient not asked for is an empty
# [0] float32 tensor; the others have the shape and dtype of their input.

def _rows_f32(rows: torch.Tensor, present: bool) -> torch.Tensor:
    return rows.new_empty((rows.shape[0] if present else 0,), dtype=torch.float32)


def _absent(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.register_fake("fastpref::linear_logps_fwd")
def _linear_logps_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_lse):
    return _rows_f32(hidden, True), _rows_f32(hidden, need_lse)


@torch.library.register_fake("fastpref::linear_logps_bwd")
def _linear_logps_bwd(hidden, weight, bias, labels, lse, grad_rows, ignore_index, temperature, softcap,
                      need_hidden, need_weight, need_bias):
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else _absent(hidden)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else _absent(hidden)
    dbias = torch.empty_like(bias) if need_bias and bias is not None else _absent(hidden)
    return dhidden, dweight, dbias


@torch.library.register_fake("fastpref::logits_logps_fwd")
def _logits_logps_fwd(logits, labels, ignore_index, temperature, need_lse):
    return _rows_f32(logits, True), _rows_f32(logits, need_lse)


@torch.library.register_fake("fastpref::logits_logps_bwd")
def _logits_logps_bwd(logits, labels, lse, grad_rows, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


class CppKernels(LogpsKernels):
    """``torch.ops.fastpref.linear_logps_fwd/_bwd`` and ``logits_logps_fwd/_bwd``. State: the row log-sum-exp."""

    name = "cpp"

    def linear_forward(self, head: LinearHead, wanted: GradsWanted):
        token_logps, lse = _ops.linear_logps_fwd(head.hidden, head.weight, head.bias, head.labels, head.ignore_index,
                                                 head.temperature, head.softcap or 0.0, wanted.any)
        return token_logps, (lse,) if wanted.any else ()

    def linear_backward(self, head: LinearHead, state, grad_rows, wanted: GradsWanted):
        grads = _ops.linear_logps_bwd(head.hidden, head.weight, head.bias, head.labels, state[0], grad_rows,
                                      head.ignore_index, head.temperature, head.softcap or 0.0, *wanted)
        return tuple(absent_to_none(grad, want) for grad, want in zip(grads, wanted))

    def logits_forward(self, rows: LogitsRows, need_grad: bool):
        token_logps, lse = _ops.logits_logps_fwd(rows.logits, rows.labels, rows.ignore_index, rows.temperature,
                                                 need_grad)
        return token_logps, (lse,) if need_grad else ()

    def logits_backward(self, rows: LogitsRows, state, grad_rows):
        return _ops.logits_logps_bwd(rows.logits, rows.labels, state[0], grad_rows, rows.ignore_index,
                                     rows.temperature)


KERNELS = CppKernels()
