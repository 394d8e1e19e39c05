"""Triton log-prob kernels (the "triton" backend): fused h·Wᵀ tiles with an online log-sum-exp, never an [N, V]
tensor; see ``fastpref/kernels/linear_logps_fwd.py``, ``linear_logps_bwd.py`` and ``logits_logps.py``.

Every launch sits inside a ``torch.library.custom_op`` (``torch.ops.fastpref.triton_*``) with a fake
implementation, so torch.compile traces a model calling these ops without breaking the graph on them. The
kernels use no atomics: results are deterministic run to run. Rows with ignore_index (and, in the backward, rows
whose upstream gradient is exactly 0) are compacted away on the device, without a host sync.
"""

import contextlib

import torch
from torch import Tensor

from fastpref.kernels.linear_logps_bwd import linear_logps_backward, unit_backward
from fastpref.kernels.linear_logps_fwd import linear_logps_forward
from fastpref.kernels.logits_logps import logits_logps_backward, logits_logps_forward
from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels, absent_to_none
from fastpref.logps.torch_backend import KERNELS as TORCH_KERNELS

TOKEN_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _on_device(tensor: Tensor):
    """Launch on `tensor`'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _nothing(like: Tensor) -> Tensor:
    return like.new_empty(0)


def _contiguous(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor):
    return hidden.contiguous(), weight.contiguous(), None if bias is None else bias.contiguous(), labels.contiguous()


@torch.library.custom_op("fastpref::triton_linear_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                temperature: float, softcap: float | None, need_state: bool,
                with_unit: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(hidden):
        token_logps, state, _, unit = linear_logps_forward(*_contiguous(hidden, weight, bias, labels), ignore_index,
                                                           temperature, softcap, with_unit=with_unit)
    return (token_logps, state if need_state else _nothing(state),
            unit.to(hidden.dtype) if with_unit else _nothing(hidden))


@_linear_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_state, with_unit):
    rows = hidden.shape[0]
    return (hidden.new_empty(rows, dtype=torch.float32),
            hidden.new_empty((2, rows) if need_state else (0,), dtype=torch.float32),
            torch.empty_like(hidden) if with_unit else hidden.new_empty(0))


@torch.library.custom_op("fastpref::triton_linear_stats", mutates_args=())
def _linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  temperature: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _on_device(hidden):
        token_logps, state, stats, _ = linear_logps_forward(*_contiguous(hidden, weight, bias, labels), ignore_index,
                                                            temperature, softcap, with_stats=True)
    return (token_logps, state, *(stats[name] for name in TOKEN_STATS))


@_linear_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap):
    rows = hidden.shape[0]
    floats = [hidden.new_empty(rows, dtype=torch.float32) for _ in range(4)]
    return (floats[0], hidden.new_empty(2, rows, dtype=torch.float32), *floats[1:],
            hidden.new_empty(rows, dtype=torch.bool))


@torch.library.custom_op("fastpref::triton_linear_bwd", mutates_args=())
def _linear_bwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, state: Tensor,
                grad_rows: Tensor, ignore_index: int, temperature: float, softcap: float | None, need_hidden: bool,
                need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(hidden):
        head = LinearHead(*_contiguous(hidden, weight, bias, labels), ignore_index, temperature, softcap)
        dh, dw, db = linear_logps_backward(head, state.contiguous(), grad_rows.contiguous(),
                                           GradsWanted(need_hidden, need_weight, need_bias))
    return (_nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


@_linear_bwd.register_fake
def _(hidden, weight, bias, labels, state, grad_rows, ignore_index, temperature, softcap, need_hidden, need_weight,
      need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0))


@torch.library.custom_op("fastpref::triton_logits_fwd", mutates_args=())
def _logits_fwd(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float,
                need_state: bool) -> tuple[Tensor, Tensor]:
    with _on_device(logits):
        token_logps, state = logits_logps_forward(logits.contiguous(), labels.contiguous(), ignore_index,
                                                  temperature)
    return token_logps, state if need_state else _nothing(state)


@_logits_fwd.register_fake
def _(logits, labels, ignore_index, temperature, need_state):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty((2, rows) if need_state else (0,), dtype=torch.float32))


@torch.library.custom_op("fastpref::triton_logits_bwd", mutates_args=())
def _logits_bwd(logits: Tensor, labels: Tensor, state: Tensor, grad_rows: Tensor, ignore_index: int,
                temperature: float) -> Tensor:
    with _on_device(logits):
        return logits_logps_backward(logits.contiguous(), labels.contiguous(), state.contiguous(),
                                     grad_rows.contiguous(), ignore_index, temperature)


@_logits_bwd.register_fake
def _(logits, labels, state, grad_rows, ignore_index, temperature):
    return torch.empty_like(logits)


def _frozen_head(wanted: GradsWanted) -> bool:
    """Only dH is wanted (LoRA, a frozen lm_head): the forward accumulates the hidden-gradient unit."""
    return wanted == GradsWanted(True, False, False)


def _float64(tensor: Tensor) -> bool:
    return tensor.dtype == torch.float64


class TritonKernels(LogpsKernels):
    """The ``torch.ops.fastpref.triton_*`` ops above. State saved for backward: the row max and log-sum as one
    [2, N] tensor; with a frozen head (only dH wanted) the hidden-gradient unit G [N, D] before it, and the
    backward is dH = g·G / T without vocabulary work. The token-statistics forward keeps the recomputing
    backward (one kernel fewer to tune; statistics are for logging).

    float64 problems run the torch backend's tiles (in float64): the Triton kernels accumulate in float32 and
    refuse float64 themselves, so float64 in stays float64 out on this backend too.
    """

    name = "triton"

    def grad_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """float64 upstream gradients for float64 inputs (computed in float64)."""
        return torch.float64 if input_dtype == torch.float64 else torch.float32

    def linear_forward(self, head: LinearHead, wanted: GradsWanted):
        if _float64(head.hidden):
            return TORCH_KERNELS.linear_forward(head, wanted)
        frozen_head = _frozen_head(wanted)
        token_logps, state, unit = torch.ops.fastpref.triton_linear_fwd(
            head.hidden, head.weight, head.bias, head.labels, head.ignore_index, head.temperature, head.softcap,
            wanted.any, frozen_head)
        if frozen_head:  # two tensors saved tell the backward the unit is there
            return token_logps, (unit, state)
        return token_logps, (state,) if wanted.any else ()

    def linear_forward_with_stats(self, head: LinearHead, wanted: GradsWanted):
        """Statistics of p = softmax(z_t) from the same fused tiles (see :class:`fastpref.logps.TokenStats`)."""
        if _float64(head.hidden):
            return TORCH_KERNELS.linear_forward_with_stats(head, wanted)
        token_logps, state, *stats = torch.ops.fastpref.triton_linear_stats(head.hidden, head.weight, head.bias,
                                                                            head.labels, head.ignore_index,
                                                                            head.temperature, head.softcap)
        return token_logps, (state,) if wanted.any else (), tuple(stats)

    def linear_backward(self, head: LinearHead, state, grad_rows, wanted: GradsWanted):
        if _float64(head.hidden):
            return TORCH_KERNELS.linear_backward(head, state, grad_rows, wanted)
        if len(state) == 2:  # the forward saved the unit G (and the row max / log-sum)
            return unit_backward(state[0], grad_rows, head.temperature, head.hidden.dtype), None, None
        grads = torch.ops.fastpref.triton_linear_bwd(head.hidden, head.weight, head.bias, head.labels, state[0],
                                                     grad_rows, head.ignore_index, head.temperature, head.softcap,
                                                     *wanted)
        return tuple(absent_to_none(grad, want) for grad, want in zip(grads, wanted))

    def logits_forward(self, rows: LogitsRows, need_grad: bool):
        if _float64(rows.logits):
            return TORCH_KERNELS.logits_forward(rows, need_grad)
        token_logps, state = torch.ops.fastpref.triton_logits_fwd(rows.logits, rows.labels, rows.ignore_index,
                                                                  rows.temperature, need_grad)
        return token_logps, (state,) if need_grad else ()

    def logits_backward(self, rows: LogitsRows, state, grad_rows):
        if _float64(rows.logits):
            return TORCH_KERNELS.logits_backward(rows, state, grad_rows)
        return torch.ops.fastpref.triton_logits_bwd(rows.logits, rows.labels, state[0], grad_rows, rows.ignore_index,
                                                    rows.temperature)


KERNELS = TritonKernels()
