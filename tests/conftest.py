"""Test configuration shared by every test file.

Without a GPU the Triton kernels run in the interpreter on CPU tensors: TRITON_INTERPRET=1 must be set before
any kernel module is imported, so it is set here, first. On a CUDA machine the real compiler runs instead.
"""

import importlib
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from fastpref.backends import backends  # noqa: E402

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"


def available_backends() -> list[str]:
    """Backends that run on this machine's test device (CPU here; the interpreter makes "triton" one)."""
    return [name for name, status in backends().items() if status.available]


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def load_benchmark(monkeypatch, tmp_path):
    """``load_benchmark(name)`` imports the script ``benchmarks/<name>.py`` with its results redirected to
    ``tmp_path`` (``record.RESULTS_DIR``, ``$FASTPREF_RESULTS_DIR`` unset), keeping the committed results untouched."""
    monkeypatch.syspath_prepend(str(BENCHMARKS))
    import record

    monkeypatch.setattr(record, "RESULTS_DIR", tmp_path)
    monkeypatch.delenv("FASTPREF_RESULTS_DIR", raising=False)
    return importlib.import_module
