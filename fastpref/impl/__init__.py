"""Backend implementations of the log-prob kernels, one module per backend, all with the same four functions:

    linear_forward(hidden [N, D], weight [V, D], bias [V] | None, labels [N] int64, ignore_index, temperature,
                   softcap | None, need_lse) -> (token_logps [N] f32 (0 at ignored rows), lse [N] f32)
    linear_backward(hidden, weight, bias, labels, lse, grad_rows [N] f32, ignore_index, temperature, softcap,
                    need_hidden, need_weight, need_bias) -> (dhidden | None, dweight | None, dbias | None)
    logits_forward(logits [N, V], labels, ignore_index, temperature, need_lse) -> (token_logps, lse)
    logits_backward(logits, labels, lse, grad_rows, ignore_index, temperature) -> dlogits

Gradients come back in the dtype of their input, accumulated in float32. ``grad_rows`` is ∂L/∂log p_t; rows
with ignore_index (and, where a backend says so, rows whose gradient is exactly 0) contribute nothing. When
``need_lse`` is False the backend may return an empty ``lse`` and save no state.
"""

from __future__ import annotations

import importlib
from types import ModuleType

_MODULES = {"torch": "torch_logps", "cpp": "cpp_logps", "triton": "triton_logps"}


_LOADED: dict[str, ModuleType] = {}


def logps_kernels(backend: str) -> ModuleType:
    """The module implementing the log-prob kernels of `backend` (imported on first use, then cached so that
    torch.compile traces this lookup without a graph break on importlib)."""
    module = _LOADED.get(backend)
    if module is None:
        module = _LOADED[backend] = importlib.import_module(f"{__name__}.{_MODULES[backend]}")
    return module
