"""Which implementation runs an op: "triton", "cpp" or "torch".

``backend=None`` picks the best available for the tensors' device: "triton" on CUDA tensors, "cpp" (the
compiled ``fastpref._C`` CPU kernels) on CPU tensors, "torch" (pure PyTorch) otherwise. The environment
variable ``FASTPREF_BACKEND`` replaces that default; an explicit ``backend=`` argument wins over both. Asking
for a backend that cannot run raises :class:`BackendUnavailableError` saying why. Under
``TRITON_INTERPRET=1`` the "triton" backend runs on CPU tensors (the tests use this).
"""

from __future__ import annotations

import importlib
import importlib.util
import os
from dataclasses import dataclass

import torch

from fastpref import _ext

BACKEND_NAMES = ("triton", "cpp", "torch")


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run these tensors; the message says why."""


@dataclass(frozen=True)
class BackendStatus:
    """Whether a backend exists in this process, and if not, why not."""

    available: bool
    reason: str

    def __str__(self) -> str:
        return "available" if self.available else f"missing: {self.reason}"


def triton_interpreted() -> bool:
    """True when Triton kernels run in the interpreter (``TRITON_INTERPRET=1``), i.e. on CPU tensors."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _triton_status() -> BackendStatus:
    if importlib.util.find_spec("triton") is None:
        return BackendStatus(False, "the triton package is not installed (pip install triton)")
    if triton_interpreted():
        return BackendStatus(True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors")
    if not torch.cuda.is_available():
        return BackendStatus(False, "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)")
    return BackendStatus(True, f"CUDA device {torch.cuda.get_device_name()}")


def _cpp_status() -> BackendStatus:
    if _ext.extension() is None:
        return BackendStatus(False, _ext.missing_reason() or "fastpref._C is not loaded")
    ext = _ext.extension()
    return BackendStatus(True, f"fastpref._C built for torch {ext.built_with_torch}, openmp={ext.with_openmp}")


def backends() -> dict[str, BackendStatus]:
    """Report every backend: ``{"triton": BackendStatus, "cpp": ..., "torch": ...}``."""
    return {
        "triton": _triton_status(),
        "cpp": _cpp_status(),
        "torch": BackendStatus(True, f"pure PyTorch {torch.__version__}"),
    }


def _device_ok(name: str, device: torch.device) -> str | None:
    """None when backend `name` can run tensors on `device`, else the reason it cannot."""
    if name == "cpp" and device.type != "cpu":
        return f"the cpp backend runs CPU tensors only, got tensors on {device}"
    if name == "triton":
        if triton_interpreted():
            return None if device.type == "cpu" else "TRITON_INTERPRET=1 runs CPU tensors only"
        if device.type != "cuda":
            return f"the triton backend runs CUDA tensors, got tensors on {device} (or set TRITON_INTERPRET=1)"
    return None


def resolve_backend(backend: str | None, device: torch.device) -> str:
    """The backend that runs an op on tensors of `device`, following the rules in this module's docstring."""
    if backend is None:
        backend = os.environ.get("FASTPREF_BACKEND") or None
        if backend is None:
            if device.type == "cuda" and backends()["triton"].available:
                return "triton"
            if device.type == "cpu" and _ext.extension() is not None:
                return "cpp"
            return "torch"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {backend!r}")
    status = backends()[backend]
    if not status.available:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {status.reason}")
    reason = _device_ok(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run here: {reason}")
    return backend


_LOADED: dict[tuple[str, str], object] = {}


def load_kernels(op: str, backend: str):
    """The ``KERNELS`` object of backend `backend` for op family `op` ("logps" or "losses"): the module
    ``fastpref/<op>/<backend>_backend.py`` defines it. Imported on first use, then cached, so torch.compile traces
    this lookup without a graph break on importlib."""
    kernels = _LOADED.get((op, backend))
    if kernels is None:
        kernels = _LOADED[(op, backend)] = importlib.import_module(f"fastpref.{op}.{backend}_backend").KERNELS
    return kernels
