"""What every log-prob backend receives and returns: the problem objects and the :class:`LogpsKernels` interface.

A backend module (``torch_backend``, ``cpp_backend``, ``triton_backend``) defines ``KERNELS``, an instance of a
:class:`LogpsKernels` subclass; :func:`fastpref.backends.load_kernels` finds it. The kernels see one packed
problem, never [B, T] views: ``LinearHead`` for :func:`fastpref.linear_logps`, ``LogitsRows`` for
:func:`fastpref.logits_logps`.

Forward: ``token_logps`` [N] float32 (float64 for float64 inputs: a backend that returns float32 there loses
precision the op promises), 0 at ignored rows, and ``state``: the tensors the backend's own backward needs (for
example the row log-sum-exp), saved by the autograd wrapper and handed back unchanged. ``wanted`` says which
gradients the backward will be asked for; with none, ``state`` may be empty.
Backward: ``grad_rows`` [N] is ∂L/∂log p_t in the dtype :meth:`LogpsKernels.grad_dtype` declares for the input
dtype (float32 unless the backend says otherwise); gradients come back in their input's dtype, None where not
wanted.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import torch
from torch import Tensor


@dataclass(frozen=True)
class LinearHead:
    """z_t = cap(h_t·Wᵀ + b) / T for the rows of ``hidden``; row t scores ``labels[t]`` unless it is ignore_index."""

    hidden: Tensor  # [N, D]
    weight: Tensor  # [V, D]
    bias: Tensor | None  # [V]
    labels: Tensor  # [N] int64
    ignore_index: int
    temperature: float
    softcap: float | None


@dataclass(frozen=True)
class LogitsRows:
    """z_t = logits_t / T; row t scores ``labels[t]`` unless it is ignore_index."""

    logits: Tensor  # [N, V]
    labels: Tensor  # [N] int64
    ignore_index: int
    temperature: float


class GradsWanted(NamedTuple):
    """Which gradients of :class:`LinearHead`'s tensors the backward will compute."""

    hidden: bool
    weight: bool
    bias: bool

    @property
    def any(self) -> bool:
        return self.hidden or self.weight or self.bias


class LogpsKernels:
    """The interface of a log-prob backend (see the module docstring)."""

    name: str = ""

    def grad_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        """The dtype of the ``grad_rows`` this backend's backward takes for inputs of ``input_dtype``."""
        return torch.float32

    def linear_forward(self, head: LinearHead, wanted: GradsWanted) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def linear_backward(self, head: LinearHead, state: tuple[Tensor, ...], grad_rows: Tensor,
                        wanted: GradsWanted) -> tuple[Tensor | None, Tensor | None, Tensor | None]:
        raise NotImplementedError

    def linear_forward_with_stats(self, head: LinearHead, wanted: GradsWanted):
        """(token_logps, state, stats): the forward plus :class:`fastpref.logps.TokenStats` fields per row. By
        default one more tiled pass of the torch backend; a backend that has them in its fused pass overrides this."""
        from fastpref.logps.torch_backend import traced_token_stats

        token_logps, state = self.linear_forward(head, wanted)
        return token_logps, state, traced_token_stats(head)

    def logits_forward(self, rows: LogitsRows, need_grad: bool) -> tuple[Tensor, tuple[Tensor, ...]]:
        raise NotImplementedError

    def logits_backward(self, rows: LogitsRows, state: tuple[Tensor, ...], grad_rows: Tensor) -> Tensor:
        raise NotImplementedError


def absent_to_none(tensor: Tensor, wanted: bool) -> Tensor | None:
    """Compiled ops return an empty tensor for an output they did not compute; the contract says None."""
    return tensor if wanted else None
