"""The "cpp" backend: the compiled CPU kernels of ``fastpref._C``, called as ``torch.ops.fastpref.*``.

The kernels (``csrc/linear_logps_cpu.cpp``, ``csrc/logits_logps_cpu.cpp``) compute, for each row with label y,
log p = z[y] − logsumexp(z) with z = cap(h·Wᵀ + b) / T, walking the vocabulary in tiles with an online softmax
(never [N, V] logits), in float32 (float64 for float64 inputs, whose outputs are float64). Ignored rows cost no
vocabulary work. Two backward paths, chosen from :class:`GradsWanted` at forward time:

- **frozen head** (weight and bias need no gradient: LoRA, a frozen lm_head): the forward also accumulates, in
  the same pass over the vocabulary, ∂log p_t/∂h_t = (c_t·W[y_t] − Σ_v p_tv·(1 − tanh²_tv)·W_v) / T
  (c_t = 1 − tanh²_{t,y_t}; the tanh factors are 1 without a softcap) with flash attention's online rescaling,
  and saves it as the state; the backward is dH_t = g_t·∂log p_t/∂h_t, no vocabulary work, exact for any upstream
  gradient g. This holds with a softcap too: ∂log p_t/∂h_t does not depend on g. Two GEMM-equivalents in all.
- **trainable head**: the state is the row max and log Σ exp(z − max) (kept apart so p is exact to the dtype);
  the backward recomputes the tiles and forms (onehot(y) − softmax(z))·g / T (· (1 − tanh²) under a softcap);
  rows with a zero upstream gradient cost no vocabulary work. Four GEMM-equivalents.

This module adapts the backend contract of :mod:`fastpref.logps.contract` to the op schemas: ``softcap=None`` is
passed as 0.0 and empty results mean "not computed".
"""

from __future__ import annotations

import torch

from fastpref import _ext

if _ext.extension() is None:  # resolve_backend never picks "cpp" then; importing directly is a usage error
    raise ImportError(f"the cpp backend needs the compiled extension: {_ext.missing_reason()}")

from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels, absent_to_none  # noqa: E402

_ops = torch.ops.fastpref

# Fake (meta) kernels, so that the ops trace under FakeTensorMode and torch.compile. Shapes follow the schemas in
# csrc/: token_logps, row_max and row_log_sum are [N] in the accumulation dtype (float32; float64 for float64
# inputs), the last two [0] when not asked for; hidden_grad is [N, D] in the accumulation dtype or [0]; a gradient
# not asked for is an empty [0] float32 tensor; the others have the shape and dtype of their input.

def _acc_dtype(like: torch.Tensor) -> torch.dtype:
    return torch.float64 if like.dtype == torch.float64 else torch.float32


def _rows_acc(rows: torch.Tensor, present: bool) -> torch.Tensor:
    return rows.new_empty((rows.shape[0] if present else 0,), dtype=_acc_dtype(rows))


def _absent(like: torch.Tensor) -> torch.Tensor:
    return like.new_empty((0,), dtype=torch.float32)


@torch.library.register_fake("fastpref::linear_logps_fwd")
def _linear_logps_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_lse, need_hidden_grad):
    shape = tuple(hidden.shape) if need_hidden_grad else (0,)
    hidden_grad = hidden.new_empty(shape, dtype=_acc_dtype(hidden))
    return _rows_acc(hidden, True), _rows_acc(hidden, need_lse), _rows_acc(hidden, need_lse), hidden_grad


@torch.library.register_fake("fastpref::linear_logps_bwd")
def _linear_logps_bwd(hidden, weight, bias, labels, row_max, row_log_sum, grad_rows, ignore_index, temperature,
                      softcap, need_hidden, need_weight, need_bias):
    dhidden = torch.empty_like(hidden, memory_format=torch.contiguous_format) if need_hidden else _absent(hidden)
    dweight = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_weight else _absent(hidden)
    dbias = torch.empty_like(bias) if need_bias and bias is not None else _absent(hidden)
    return dhidden, dweight, dbias


@torch.library.register_fake("fastpref::logits_logps_fwd")
def _logits_logps_fwd(logits, labels, ignore_index, temperature, need_lse):
    return _rows_acc(logits, True), _rows_acc(logits, need_lse), _rows_acc(logits, need_lse)


@torch.library.register_fake("fastpref::logits_logps_bwd")
def _logits_logps_bwd(logits, labels, row_max, row_log_sum, grad_rows, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


def frozen_head(wanted: GradsWanted) -> bool:
    """The two-GEMM path: only the hidden states need a gradient."""
    return wanted.hidden and not wanted.weight and not wanted.bias


class CppKernels(LogpsKernels):
    """``torch.ops.fastpref.linear_logps_fwd/_bwd`` and ``logits_logps_fwd/_bwd``. State: ``(hidden_grad,)`` for a
    frozen head (see the module docstring), else ``(row_max, row_log_sum)``."""

    name = "cpp"

    def grad_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """float64 upstream gradients for float64 inputs (computed in float64)."""
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def linear_forward(self, head: LinearHead, wanted: GradsWanted):
        frozen = frozen_head(wanted)
        token_logps, row_max, row_log_sum, hidden_grad = _ops.linear_logps_fwd(
            head.hidden, head.weight, head.bias, head.labels, head.ignore_index, head.temperature,
            head.softcap or 0.0, wanted.any and not frozen, frozen)
        if frozen:
            return token_logps, (hidden_grad,)
        return token_logps, (row_max, row_log_sum) if wanted.any else ()

    def linear_backward(self, head: LinearHead, state, grad_rows, wanted: GradsWanted):
        if frozen_head(wanted):
            (hidden_grad,) = state
            return (grad_rows.to(hidden_grad.dtype)[:, None] * hidden_grad).to(head.hidden.dtype), None, None
        grads = _ops.linear_logps_bwd(head.hidden, head.weight, head.bias, head.labels, state[0], state[1], grad_rows,
                                      head.ignore_index, head.temperature, head.softcap or 0.0, *wanted)
        return tuple(absent_to_none(grad, want) for grad, want in zip(grads, wanted))

    def logits_forward(self, rows: LogitsRows, need_grad: bool):
        token_logps, row_max, row_log_sum = _ops.logits_logps_fwd(rows.logits, rows.labels, rows.ignore_index,
                                                                  rows.temperature, need_grad)
        return token_logps, (row_max, row_log_sum) if need_grad else ()

    def logits_backward(self, rows: LogitsRows, state, grad_rows):
        return _ops.logits_logps_bwd(rows.logits, rows.labels, state[0], state[1], grad_rows, rows.ignore_index,
                                     rows.temperature)


KERNELS = CppKernels()
