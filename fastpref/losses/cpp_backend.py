"""The "cpp" backend of :func:`fastpref.preference_loss`: ``torch.ops.fastpref.preference_loss_fwd/_bwd`` from
``csrc/preference_loss_cpu.cpp`` (one pass over the pairs each way; arithmetic and results in float64 for float64
inputs, float32 otherwise). ``torch.ops.fastpref.preference_loss_layout`` reports the kernel's loss codes, slots,
scalars and f-divergences, which :func:`layout_drift` compares with the table."""

from __future__ import annotations

import torch

from fastpref import _ext
from fastpref.losses.fused import CompiledLossKernels, FusedProblem
from fastpref.losses.table import F_DIVERGENCES, LOSS_TYPES, PAIR_SLOTS, SCALARS

if _ext.extension() is None:  # resolve_backend never picks "cpp" then; importing directly is a usage error
    raise ImportError(f"the cpp backend needs the compiled extension: {_ext.missing_reason()}")

_ops = torch.ops.fastpref


def _output_dtype(chosen: torch.Tensor) -> torch.dtype:
    return torch.float64 if chosen.dtype == torch.float64 else torch.float32


@torch.library.register_fake("fastpref::preference_loss_fwd")
def _forward_fake(slots, codes, loss_weights, scalars, divergence):
    """Shapes only (FakeTensorMode, torch.compile): a scalar and four [B], float64 for float64 inputs."""
    chosen = slots[0]
    dtype = _output_dtype(chosen)
    per_pair = [chosen.new_empty(chosen.shape, dtype=dtype) for _ in range(4)]
    return (chosen.new_empty((), dtype=dtype), *per_pair)


@torch.library.register_fake("fastpref::preference_loss_bwd")
def _backward_fake(slots, codes, loss_weights, scalars, divergence, grad_loss, grad_losses):
    chosen = slots[0]
    return tuple(chosen.new_empty(chosen.shape, dtype=_output_dtype(chosen)) for _ in range(4))


def layout_drift() -> list[str]:
    """Where the C++ kernel's layout differs from the table's (empty when they agree)."""
    want = {"losses": LOSS_TYPES, "slots": PAIR_SLOTS, "scalars": SCALARS, "divergences": F_DIVERGENCES}
    drift = []
    for part, names in want.items():
        got = tuple(_ops.preference_loss_layout(part))
        if got != tuple(names):
            drift.append(f"{part}: csrc/preference_loss_cpu.cpp has {got}, fastpref/losses/table.py {tuple(names)}")
    return drift


def _settings(fused: FusedProblem) -> tuple:
    return list(fused.codes), list(fused.loss_weights), fused.params.scalars(), fused.params.divergence_code


class CppLossKernels(CompiledLossKernels):
    name = "cpp"

    def forward(self, fused: FusedProblem):
        return _ops.preference_loss_fwd(fused.slots, *_settings(fused))

    def backward(self, fused: FusedProblem, grad_loss: torch.Tensor, grad_losses: torch.Tensor | None):
        return _ops.preference_loss_bwd(fused.slots, *_settings(fused), grad_loss, grad_losses)


KERNELS = CppLossKernels()
