"""CPU benchmark of fastpref.linear_logps: compiled "cpp" kernels and the chunked "torch" backend against eager
PyTorch with full logits (h·Wᵀ, float32 log_softmax, gather), forward and forward+backward, float32.

Run: `make bench` or `.venv/bin/python -m pytest -q benchmarks/test_linear_logps_cpu.py`. Writes
benchmarks/results/linear_logps_cpu.json (+ .png): median time (pytest-benchmark), peak memory above the
inputs (resident set sampled, fastpref.profiling; `peak_beyond_grads_mib` leaves out the float32 gradients
every implementation returns), and ratios to eager measured in the same run.
"""

from __future__ import annotations

import pytest
import torch

import fastpref
from fastpref.profiling import peak_memory

RESULTS_NAME = "linear_logps_cpu"
PLOT = dict(x="case", y="median_ms", group="impl", facet="pass", log_y=True)
SHAPES = [(1024, 256, 32000), (512, 512, 128256)]  # (scored rows N, D, V)
IMPLS = ["eager", "torch", "cpp"]
_medians: dict[tuple, float] = {}
_peaks: dict[tuple, int] = {}


def _inputs(rows: int, dim: int, vocab: int):
    gen = torch.Generator().manual_seed(0)
    hidden = torch.randn(rows, dim, generator=gen).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).requires_grad_()
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    return hidden, weight, labels


def _eager(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    return torch.log_softmax(logits, -1).gather(-1, labels[:, None]).sum()


def _step(impl: str, backward: bool, hidden, weight, labels):
    def run():
        hidden.grad = weight.grad = None
        if impl == "eager":
            total = _eager(hidden, weight, labels)
        else:
            total = fastpref.linear_logps(hidden, weight, labels, backend=impl).logps.sum()
        if backward:
            total.backward()
        return total
    return run


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"N{s[0]}-D{s[1]}-V{s[2]}")
@pytest.mark.parametrize("backward", [False, True], ids=["fwd", "fwd+bwd"])
@pytest.mark.parametrize("impl", IMPLS)
def test_linear_logps_cpu(benchmark, record, impl, backward, shape):
    if impl != "eager" and not fastpref.backends()[impl].available:
        pytest.skip(f"backend {impl} missing: {fastpref.backends()[impl].reason}")
    rows, dim, vocab = shape
    hidden, weight, labels = _inputs(rows, dim, vocab)
    step = _step(impl, backward, hidden, weight, labels)
    with torch.set_grad_enabled(backward):
        _, peak = peak_memory(step)
        benchmark.pedantic(step, rounds=3, iterations=1, warmup_rounds=1)
    median = benchmark.stats.stats.median
    key = (shape, backward)
    _medians[(impl, *key)] = median
    _peaks[(impl, *key)] = peak
    eager_median = _medians.get(("eager", *key))
    eager_peak = _peaks.get(("eager", *key))
    flops = (8 if backward else 2) * rows * dim * vocab
    grad_bytes = (hidden.numel() + weight.numel()) * 4 if backward else 0
    record(dict(impl=impl, **{"pass": "fwd+bwd" if backward else "fwd"},
                case=f"N{rows} D{dim} V{vocab}", rows=rows, dim=dim, vocab=vocab, dtype="float32",
                median_ms=median * 1e3, gflops_equiv=flops / median / 1e9, peak_mib=peak / 2**20,
                peak_beyond_grads_mib=(peak - grad_bytes) / 2**20,
                speedup_vs_eager=None if eager_median is None else eager_median / median,
                memory_ratio_eager_over_impl=None if eager_peak is None else eager_peak / max(peak, 1)))
