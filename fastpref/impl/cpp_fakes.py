"""Fake (meta) kernels of the compiled log-prob ops, so that ``torch.ops.fastpref.*`` trace under FakeTensorMode
and torch.compile: they return tensors of the right shape and dtype without computing anything.

Shapes follow the schemas in ``csrc/linear_logps_cpu.cpp`` and ``csrc/logits_logps_cpu.cpp``: ``token_logps`` and
``lse`` are [N] float32 (``lse`` is [0] when not asked for); a gradient that is not asked for is an empty [0]
float32 tensor; the others have the shape and dtype of their input. Importing this module registers them once;
it requires the compiled extension to be loaded (the schemas live there).
"""

from __future__ import annotations

import torch


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
