"""A short printed comparison of the fused log-prob head against eager full logits (part of ``fastpref demo``).

Eager is what a training loop does without fastpref: logits = h·Wᵀ for every row, float32 log_softmax,
gather, masked sum. fastpref computes the same per-sequence log-probs without ever holding the logits.
"""

from __future__ import annotations

import time

import torch

from fastpref.logps import oracle as logps_oracle
from fastpref.backends import resolve_backend
from fastpref.logps.api import linear_logps
from fastpref.profiling import peak_memory


def _eager_logps(hidden, weight, labels):
    logits = (hidden @ weight.T).float()
    token = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None]).squeeze(-1)
    return (token * (labels != -100)).sum(-1)


def _fwd_bwd(fn, hidden, weight):
    hidden.grad = weight.grad = None
    logps = fn()
    logps.sum().backward()
    return logps.detach()


def _timed(fn, hidden, weight, device, repeats: int = 3):
    _fwd_bwd(fn, hidden, weight)  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        _fwd_bwd(fn, hidden, weight)
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    logps, peak = peak_memory(lambda: _fwd_bwd(fn, hidden, weight), device)
    return sorted(times)[len(times) // 2], peak, logps


def compare_logps_head(device: str = "cpu", rows: int = 1024, dim: int = 256, vocab: int = 32000,
                       batch: int = 8, seed: int = 0) -> str:
    """Time and peak memory of forward+backward, fused head vs eager logits, on one random input; a summary."""
    dev = torch.device(device)
    gen = torch.Generator().manual_seed(seed)
    steps = rows // batch
    hidden = torch.randn(batch, steps, dim, generator=gen).to(dev).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * dim ** -0.5).to(dev).requires_grad_()
    labels = torch.randint(0, vocab, (batch, steps), generator=gen)
    labels[:, : steps // 4] = -100  # prompt rows: scored by nobody
    labels = labels.to(dev)
    backend = resolve_backend(None, dev)
    eager_t, eager_mem, eager_out = _timed(lambda: _eager_logps(hidden, weight, labels), hidden, weight, dev)
    fused_t, fused_mem, fused_out = _timed(lambda: linear_logps(hidden, weight, labels).logps, hidden, weight, dev)
    truth = logps_oracle.linear_logps(hidden.detach(), weight.detach(), labels).logps
    mib = 2 ** 20
    return "\n".join([
        f"fused log-prob head vs eager full logits ({dev.type}, float32, {batch}x{steps} rows, D={dim}, "
        f"V={vocab}, 25% prompt rows), forward+backward:",
        f"  {'eager (logits, log_softmax, gather):':38s} {eager_t * 1e3:8.1f} ms   peak +{eager_mem / mib:7.1f} MiB   "
        f"max|err| {float((eager_out - truth).abs().max()):.2e}",
        f"  {f'fastpref ({backend} backend):':38s} {fused_t * 1e3:8.1f} ms   peak +{fused_mem / mib:7.1f} MiB   "
        f"max|err| {float((fused_out - truth).abs().max()):.2e}",
        f"  -> {eager_t / fused_t:.2f}x the speed of eager, "
        f"{eager_mem / max(fused_mem, 2 ** 20):.0f}x less peak memory (fused peak counted as at least 1 MiB)",
    ])
