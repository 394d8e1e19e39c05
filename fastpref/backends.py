"""Which implementation runs an op: "triton", "cpp" or "torch".

``backend=None`` picks the best available for the tensors' device: "triton" on CUDA tensors, "cpp" (the
compiled ``fastpref._C`` CPU kernels) on CPU tensors, "torch" (pure PyTorch) otherwise. The environment
variable ``FASTPREF_BACKEND`` replaces that default; an explicit ``backend=`` argument wins over both. Asking
for a backend that cannot run raises :class:`BackendUnavailableError` saying why. Under
``TRITON_INTERPRET=1`` the "triton" backend runs on CPU tensors (the tests use this).

:func:`resolve_backend` runs inside every op, also while ``torch.compile(fullgraph=True)`` traces a step: it only
reads what the compiler can fold (the triton status cached per process at first use, ``TRITON_INTERPRET``, the
loaded extension) and never asks the driver for the device name; :func:`backends` is the full report, with the
device name.
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


def _triton_missing() -> str | None:
    """Why the triton backend cannot run in this process, or None when it can; no device name is read."""
    if importlib.util.find_spec("triton") is None:
        return "the triton package is not installed (pip install triton)"
    if triton_interpreted() or torch.cuda.is_available():
        return None
    return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on the CPU)"


# The triton status per TRITON_INTERPRET setting, taken at first use: whether triton imports and CUDA exists do
# not change within a process, and a dict read is all torch.compile sees on later calls.
_TRITON_MISSING: dict[bool, str | None] = {}


def _triton_status() -> BackendStatus:
    missing = _triton_missing()
    if missing is not None:
        return BackendStatus(False, missing)
    if triton_interpreted():
        return BackendStatus(True, "TRITON_INTERPRET=1: kernels run in the interpreter on CPU tensors")
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


def missing_reason(name: str) -> str | None:
    """Why backend `name` cannot run in this process (None when it can): what :func:`resolve_backend` reads on
    every op call. Traceable by torch.compile: the cached triton status, the ``TRITON_INTERPRET`` flag and the
    loaded extension; unlike :func:`backends`, never the device name."""
    if name == "triton":
        interpreted = triton_interpreted()
        if interpreted not in _TRITON_MISSING:
            _TRITON_MISSING[interpreted] = _triton_missing()
        return _TRITON_MISSING[interpreted]
    if name == "cpp" and _ext.extension() is None:
        return _ext.missing_reason() or "fastpref._C is not loaded"
    return None


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
            if device.type == "cuda" and missing_reason("triton") is None:
                return "triton"
            if device.type == "cpu" and missing_reason("cpp") is None:
                return "cpp"
            return "torch"
    if backend not in BACKEND_NAMES:
        raise ValueError(f"backend must be one of {BACKEND_NAMES} or None, got {backend!r}")
    missing = missing_reason(backend)
    if missing is not None:
        raise BackendUnavailableError(f"backend {backend!r} is unavailable: {missing}")
    reason = _device_ok(backend, device)
    if reason is not None:
        raise BackendUnavailableError(f"backend {backend!r} cannot run here: {reason}")
    return backend


_LOADED: dict[tuple[str, str], object] = {}


def load_kernels(op: str, backend: str):
    """The ``KERNELS`` object of backend `backend` for op family `op` ("logps" or "losses"): the module
    ``fastpref/<op>/<backend>_backend.py`` defines it. Imported once, then cached; :func:`preload_kernels` fills
    the cache when an op family is imported, so a call traced by torch.compile only reads a dict (dynamo refuses
    ``importlib``)."""
    kernels = _LOADED.get((op, backend))
    if kernels is None:
        kernels = _LOADED[(op, backend)] = importlib.import_module(f"fastpref.{op}.{backend}_backend").KERNELS
    return kernels


def preload_kernels(op: str) -> None:
    """Import the kernels of every backend that can run in this process for op family `op`."""
    for name in BACKEND_NAMES:
        if missing_reason(name) is None:
            load_kernels(op, name)
