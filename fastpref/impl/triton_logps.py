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

from ..kernels.linear_logps_bwd import linear_logps_backward
from ..kernels.linear_logps_fwd import linear_logps_forward
from ..kernels.logits_logps import logits_logps_backward, logits_logps_forward

TOKEN_STATS = ("entropy", "log_sum_sq_probs", "mean_logits", "is_top1")


def _on_device(tensor: Tensor):
    """Launch on `tensor`'s GPU (Triton launches on the current device)."""
    return torch.cuda.device(tensor.device) if tensor.device.type == "cuda" else contextlib.nullcontext()


def _nothing(like: Tensor) -> Tensor:
    return like.new_empty(0)


@torch.library.custom_op("fastpref::triton_linear_fwd", mutates_args=())
def _linear_fwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                temperature: float, softcap: float | None, need_lse: bool) -> tuple[Tensor, Tensor]:
    with _on_device(hidden):
        token_logps, lse, _ = linear_logps_forward(hidden.contiguous(), weight.contiguous(),
                                                   None if bias is None else bias.contiguous(),
                                                   labels.contiguous(), ignore_index, temperature, softcap)
    return token_logps, lse if need_lse else _nothing(lse)


@_linear_fwd.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_lse):
    rows = hidden.shape[0]
    return (hidden.new_empty(rows, dtype=torch.float32),
            hidden.new_empty(rows if need_lse else 0, dtype=torch.float32))


@torch.library.custom_op("fastpref::triton_linear_stats", mutates_args=())
def _linear_stats(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                  temperature: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    with _on_device(hidden):
        token_logps, lse, stats = linear_logps_forward(hidden.contiguous(), weight.contiguous(),
                                                       None if bias is None else bias.contiguous(),
                                                       labels.contiguous(), ignore_index, temperature, softcap,
                                                       with_stats=True)
    return (token_logps, lse, *(stats[name] for name in TOKEN_STATS))


@_linear_stats.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap):
    rows = hidden.shape[0]
    floats = [hidden.new_empty(rows, dtype=torch.float32) for _ in range(5)]
    return (*floats, hidden.new_empty(rows, dtype=torch.bool))


@torch.library.custom_op("fastpref::triton_linear_bwd", mutates_args=())
def _linear_bwd(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, lse: Tensor,
                grad_rows: Tensor, ignore_index: int, temperature: float, softcap: float | None, need_hidden: bool,
                need_weight: bool, need_bias: bool) -> tuple[Tensor, Tensor, Tensor]:
    with _on_device(hidden):
        dh, dw, db = linear_logps_backward(hidden.contiguous(), weight.contiguous(),
                                           None if bias is None else bias.contiguous(), labels.contiguous(),
                                           lse.contiguous(), grad_rows.contiguous(), ignore_index, temperature,
                                           softcap, need_hidden, need_weight, need_bias)
    return (_nothing(hidden) if dh is None else dh, _nothing(weight) if dw is None else dw,
            _nothing(weight) if db is None else db)


@_linear_bwd.register_fake
def _(hidden, weight, bias, labels, lse, grad_rows, ignore_index, temperature, softcap, need_hidden, need_weight,
      need_bias):
    return (torch.empty_like(hidden) if need_hidden else hidden.new_empty(0),
            torch.empty_like(weight) if need_weight else weight.new_empty(0),
            torch.empty_like(bias) if need_bias else weight.new_empty(0))


@torch.library.custom_op("fastpref::triton_logits_fwd", mutates_args=())
def _logits_fwd(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float,
                need_lse: bool) -> tuple[Tensor, Tensor]:
    with _on_device(logits):
        token_logps, lse = logits_logps_forward(logits.contiguous(), labels.contiguous(), ignore_index, temperature)
    return token_logps, lse if need_lse else _nothing(lse)


@_logits_fwd.register_fake
def _(logits, labels, ignore_index, temperature, need_lse):
    rows = logits.shape[0]
    return (logits.new_empty(rows, dtype=torch.float32),
            logits.new_empty(rows if need_lse else 0, dtype=torch.float32))


@torch.library.custom_op("fastpref::triton_logits_bwd", mutates_args=())
def _logits_bwd(logits: Tensor, labels: Tensor, lse: Tensor, grad_rows: Tensor, ignore_index: int,
                temperature: float) -> Tensor:
    with _on_device(logits):
        return logits_logps_backward(logits.contiguous(), labels.contiguous(), lse.contiguous(),
                                     grad_rows.contiguous(), ignore_index, temperature)


@_logits_bwd.register_fake
def _(logits, labels, lse, grad_rows, ignore_index, temperature):
    return torch.empty_like(logits)


# The four functions of the backend contract (fastpref/impl/__init__.py).

def linear_forward(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_lse):
    return torch.ops.fastpref.triton_linear_fwd(hidden, weight, bias, labels, ignore_index, temperature, softcap,
                                                need_lse)


def linear_backward(hidden, weight, bias, labels, lse, grad_rows, ignore_index, temperature, softcap,
                    need_hidden, need_weight, need_bias):
    dh, dw, db = torch.ops.fastpref.triton_linear_bwd(hidden, weight, bias, labels, lse, grad_rows, ignore_index,
                                                      temperature, softcap, need_hidden, need_weight, need_bias)
    return dh if need_hidden else None, dw if need_weight else None, db if need_bias else None


def logits_forward(logits, labels, ignore_index, temperature, need_lse):
    return torch.ops.fastpref.triton_logits_fwd(logits, labels, ignore_index, temperature, need_lse)


def logits_backward(logits, labels, lse, grad_rows, ignore_index, temperature):
    return torch.ops.fastpref.triton_logits_bwd(logits, labels, lse, grad_rows, ignore_index, temperature)


def linear_forward_with_stats(hidden, weight, bias, labels, ignore_index, temperature, softcap):
    """The forward pass that also yields per-row statistics of p = softmax(z_t), from the same fused tiles:
    returns (token_logps, lse, (entropy, log_sum_sq_probs, mean_logits, is_top1)); entropy = −Σ p log p,
    log Σ p², mean logit Σ z / V (float32 [N]), is_top1 (bool [N]: the target is torch.argmax of z, first index on
    ties); all 0 / False at ignored rows. The statistics carry no gradient."""
    token_logps, lse, *stats = torch.ops.fastpref.triton_linear_stats(hidden, weight, bias, labels, ignore_index,
                                                                      temperature, softcap)
    return token_logps, lse, tuple(stats)
