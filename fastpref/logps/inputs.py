"""Checks and normalizes the arguments of the log-prob ops into one packed problem.

Every backend sees the same normalized problem: ``rows`` [N, K] (hidden states with K = D, or logits with
K = V), ``labels`` [N] int64, optional ``token_weights`` [N], and ``cu_seqlens`` [S+1] int64 giving each
sequence's row range. The padded form [B, T, ·] is the packed form with B sequences of T rows each.

Bad input raises ``TypeError``/``ValueError`` naming the argument. Shape, dtype and device checks cost
nothing; the checks that read tensor values (labels in range, ``cu_seqlens`` well formed) are combined into
one tensor that is read once — a single host sync on CUDA. ``FASTPREF_SKIP_VALUE_CHECKS=1`` removes it everywhere,
``with fastpref.skip_value_checks():`` within a block (the trainer does this for the token ids it made and
checked itself); the kernels stay memory-safe without it (they never use a label as an address), but results
for bad labels are then undefined. Tensors without readable values (meta tensors, the fake tensors of a
torch.compile trace) skip the value checks too. ``cu_seqlens`` is then forced into a valid boundary list on the
device, so no sequence reaches outside [0, N).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from fastpref._ext import env_flag

IGNORE_INDEX = -100  # the label of a row that scores nothing (PyTorch's and TRL's convention)

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_INT64_MIN, _INT64_MAX = -(2 ** 63), 2 ** 63 - 1


@dataclass
class LogpsProblem:
    """One log-prob problem in packed form (see the module docstring)."""

    rows: torch.Tensor
    labels: torch.Tensor
    token_weights: torch.Tensor | None
    cu_seqlens: torch.Tensor
    label_shape: torch.Size
    padded: bool
    ignore_index: int
    temperature: float
    softcap: float | None


def _require_tensor(name: str, value) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    return value


def _check_float(name: str, tensor: torch.Tensor) -> None:
    if tensor.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {tensor.dtype}")


def _check_same_device(name: str, tensor: torch.Tensor, ref_name: str, ref: torch.Tensor) -> None:
    if tensor.device != ref.device:
        raise ValueError(f"{name} is on {tensor.device} but {ref_name} is on {ref.device}")


def _check_scalars(ignore_index, temperature, softcap) -> tuple[int, float, float | None]:
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not _INT64_MIN <= ignore_index <= _INT64_MAX:
        raise ValueError(f"ignore_index must fit in int64 (labels are compared as int64), got {ignore_index}")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    if not math.isfinite(temperature) or temperature <= 0:
        raise ValueError(f"temperature must be finite and > 0, got {temperature}")
    if softcap is not None:
        if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
            raise TypeError(f"softcap must be a number or None, got {type(softcap).__name__}")
        if not math.isfinite(softcap) or softcap <= 0:
            raise ValueError(f"softcap must be finite and > 0 (or None), got {softcap}")
        softcap = float(softcap)
    return ignore_index, float(temperature), softcap


# Depth of nested skip_value_checks() blocks: a plain module global, which torch.compile traces (and guards on),
# unlike a ContextVar. Process-wide, as the training loop that uses it is.
_skip_depth = 0


@contextlib.contextmanager
def skip_value_checks() -> Iterator[None]:
    """Within this block the ops skip the checks that read tensor values (no host sync); shape, dtype and device
    checks stay. For inputs the caller has already validated."""
    global _skip_depth
    _skip_depth += 1
    try:
        yield
    finally:
        _skip_depth -= 1


def value_checks_enabled() -> bool:
    """False inside :func:`skip_value_checks`, when ``FASTPREF_SKIP_VALUE_CHECKS`` is set, or while torch.compile
    traces (fake tensors have no values to read; reading them would break the graph)."""
    if _skip_depth or torch.compiler.is_compiling():
        return False
    return not env_flag("FASTPREF_SKIP_VALUE_CHECKS")


def _has_values(tensor: torch.Tensor) -> bool:
    """False for tensors without data to read: meta tensors and fake tensors (the kernels stay memory-safe without
    the checks)."""
    if tensor.device.type == "meta":
        return False
    return not isinstance(tensor, torch._subclasses.fake_tensor.FakeTensor)


def _check_values(labels: torch.Tensor, ignore_index: int, vocab: int, cu_seqlens: torch.Tensor | None,
                  num_rows: int, cu_given: bool) -> None:
    """Reads every data-dependent condition in one go (one host sync) and raises on the first that fails."""
    if not value_checks_enabled() or not _has_values(labels):
        return
    scored = labels != ignore_index
    flags = [
        (scored & (labels < 0)).any(),
        (scored & (labels >= vocab)).any(),
    ]
    if cu_given:
        flags += [
            cu_seqlens[0] != 0,
            (cu_seqlens[1:] < cu_seqlens[:-1]).any(),
            cu_seqlens[-1] != num_rows,
        ]
    bad = torch.stack(flags).tolist()
    messages = [
        f"labels hold negative values other than ignore_index={ignore_index}",
        f"labels hold values >= the vocabulary size {vocab}",
        "cu_seqlens must start at 0",
        "cu_seqlens must be non-decreasing",
        f"cu_seqlens must end at the number of rows N={num_rows}",
    ]
    for failed, message in zip(bad, messages):
        if failed:
            raise ValueError(message)


def _bounded_boundaries(cu: torch.Tensor, num_rows: int) -> torch.Tensor:
    """``cu`` forced into a valid boundary list (0 first, N last, non-decreasing in between), on the device: the
    identity for checked boundaries; with the value checks skipped, bad boundaries give undefined sums but never an
    out-of-range row."""
    inner = cu[1:-1].clamp(0, num_rows).cummax(0).values
    return torch.cat([cu.new_zeros(1), inner, cu.new_full((1,), num_rows)])


def _packed_boundaries(rows_name: str, rows: torch.Tensor, cu_seqlens) -> torch.Tensor:
    """The [S+1] int64 boundaries of the packed form: ``cu_seqlens`` checked, or one sequence [0, N] made on the
    device (no host-to-device copy)."""
    if cu_seqlens is None:
        return torch.arange(2, device=rows.device, dtype=torch.int64) * rows.shape[0]
    cu_seqlens = _require_tensor("cu_seqlens", cu_seqlens)
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"cu_seqlens must be int32 or int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with S+1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    _check_same_device("cu_seqlens", cu_seqlens, rows_name, rows)
    return cu_seqlens.to(torch.int64)


def _checked_token_weights(rows_name: str, rows: torch.Tensor, labels: torch.Tensor, token_weights) -> torch.Tensor:
    token_weights = _require_tensor("token_weights", token_weights)
    _check_float("token_weights", token_weights)
    _check_same_device("token_weights", token_weights, rows_name, rows)
    if token_weights.shape != labels.shape:
        raise ValueError(f"token_weights must have the shape of labels {tuple(labels.shape)}, "
                         f"got {tuple(token_weights.shape)}")
    return token_weights.reshape(-1)


def _normalize_rows(rows_name: str, rows: torch.Tensor, labels: torch.Tensor, token_weights, cu_seqlens,
                    vocab: int, ignore_index: int, temperature: float, softcap: float | None) -> LogpsProblem:
    """Shared shape logic of both ops: [B, T, K] + [B, T] labels, or [N, K] + [N] labels (+ cu_seqlens)."""
    labels = _require_tensor("labels", labels)
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    _check_same_device("labels", labels, rows_name, rows)
    if rows.dim() == 3:
        if labels.shape != rows.shape[:2]:
            raise ValueError(f"labels must have shape {tuple(rows.shape[:2])} to match {rows_name} "
                             f"{tuple(rows.shape)}, got {tuple(labels.shape)}")
        if cu_seqlens is not None:
            raise ValueError(f"cu_seqlens is only for the packed form ({rows_name} [N, ·]); "
                             f"got {rows_name} of shape {tuple(rows.shape)}")
        batch, steps = labels.shape
        padded = True
        cu = torch.arange(batch + 1, device=rows.device, dtype=torch.int64) * steps
    elif rows.dim() == 2:
        if labels.shape != rows.shape[:1]:
            raise ValueError(f"labels must have shape ({rows.shape[0]},) to match {rows_name} "
                             f"{tuple(rows.shape)}, got {tuple(labels.shape)}")
        padded = False
        cu = _packed_boundaries(rows_name, rows, cu_seqlens)
    else:
        raise ValueError(f"{rows_name} must be [B, T, K] or [N, K], got shape {tuple(rows.shape)}")

    if token_weights is not None:
        token_weights = _checked_token_weights(rows_name, rows, labels, token_weights)

    flat_labels = labels.reshape(-1).to(torch.int64)
    _check_values(flat_labels, ignore_index, vocab, cu, flat_labels.numel(), cu_given=cu_seqlens is not None)
    if cu_seqlens is not None:
        cu = _bounded_boundaries(cu, flat_labels.numel())
    return LogpsProblem(
        rows=rows.reshape(-1, rows.shape[-1]),
        labels=flat_labels,
        token_weights=token_weights,
        cu_seqlens=cu,
        label_shape=labels.shape,
        padded=padded,
        ignore_index=ignore_index,
        temperature=temperature,
        softcap=softcap,
    )


def check_linear_logps_args(hidden, weight, labels, bias, ignore_index, temperature, softcap, token_weights,
                            cu_seqlens) -> tuple[LogpsProblem, torch.Tensor, torch.Tensor | None]:
    """Validate ``linear_logps`` arguments; returns the problem (rows = hidden) and the checked weight, bias."""
    hidden = _require_tensor("hidden", hidden)
    weight = _require_tensor("weight", weight)
    _check_float("hidden", hidden)
    _check_float("weight", weight)
    if weight.dtype != hidden.dtype:
        raise TypeError(f"weight dtype {weight.dtype} must equal hidden dtype {hidden.dtype}")
    _check_same_device("weight", weight, "hidden", hidden)
    if weight.dim() != 2:
        raise ValueError(f"weight must be [V, D], got shape {tuple(weight.shape)}")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != weight.shape[1]:
        raise ValueError(f"hidden must be [B, T, D] or [N, D] with D = weight.shape[1] = {weight.shape[1]}, "
                         f"got shape {tuple(hidden.shape)}")
    if weight.shape[0] == 0 or weight.shape[1] == 0:
        raise ValueError(f"weight must be [V, D] with V >= 1 and D >= 1, got shape {tuple(weight.shape)}")
    if bias is not None:
        bias = _require_tensor("bias", bias)
        _check_same_device("bias", bias, "hidden", hidden)
        if bias.shape != weight.shape[:1]:
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if bias.dtype != hidden.dtype:
            raise TypeError(f"bias dtype {bias.dtype} must equal hidden dtype {hidden.dtype}")
    ignore_index, temperature, softcap = _check_scalars(ignore_index, temperature, softcap)
    problem = _normalize_rows("hidden", hidden, labels, token_weights, cu_seqlens, weight.shape[0],
                              ignore_index, temperature, softcap)
    return problem, weight, bias


def check_logits_logps_args(logits, labels, ignore_index, temperature, token_weights, cu_seqlens) -> LogpsProblem:
    """Validate ``logits_logps`` arguments; returns the problem with rows = logits."""
    logits = _require_tensor("logits", logits)
    _check_float("logits", logits)
    if logits.dim() not in (2, 3) or logits.shape[-1] == 0:
        raise ValueError(f"logits must be [B, T, V] or [N, V] with V >= 1, got shape {tuple(logits.shape)}")
    ignore_index, temperature, _ = _check_scalars(ignore_index, temperature, None)
    return _normalize_rows("logits", logits, labels, token_weights, cu_seqlens, logits.shape[-1],
                           ignore_index, temperature, None)
