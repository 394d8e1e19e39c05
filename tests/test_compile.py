"""torch.compile(fullgraph=True) of a training step calling linear_logps, logits_logps and preference_loss on CPU,
with the "torch" and "cpp" backends, forward and backward, against the same step run eagerly.

fullgraph=True fails on any graph break: a host sync (the value checks, a data-dependent row gather outside a
custom op), an untraceable helper, or an op without a fake implementation. The value checks are left on (the
default): under compilation there are no values to read, so they step aside rather than break the graph.
The aot_eager backend traces with fake tensors through dynamo and AOTAutograd and runs the graph eagerly, so
compiled and eager results match bit for bit; one case also goes through inductor's CPU code generation.
"""

from __future__ import annotations

import pytest
import torch
from conftest import available_backends

import fastpref

BACKENDS = [b for b in ("torch", "cpp") if b in available_backends()]


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(12)
    hidden = torch.randn(19, 16, generator=gen, dtype=dtype, requires_grad=True)
    weight = (torch.randn(37, 16, generator=gen, dtype=dtype) * 0.5).requires_grad_()
    bias = torch.randn(37, generator=gen, dtype=dtype, requires_grad=True)
    labels = torch.randint(0, 37, (19,), generator=gen)
    labels[[0, 5, 6]] = -100
    cu = torch.tensor([0, 4, 9, 9, 15, 19])  # one empty sequence
    logits = torch.randn(2, 7, 37, generator=gen, dtype=dtype, requires_grad=True)
    logit_labels = torch.randint(0, 37, (2, 7), generator=gen)
    logit_labels[1, :3] = -100
    weights = torch.rand(19, generator=gen, dtype=dtype) + 0.5
    return hidden, weight, bias, labels, cu, logits, logit_labels, weights


def _step(backend):
    def step(hidden, weight, bias, labels, cu, logits, logit_labels, weights):
        out = fastpref.linear_logps(hidden, weight, labels, bias=bias, softcap=4.0, temperature=0.9, cu_seqlens=cu,
                                    token_weights=weights, return_token_logps=True, backend=backend)
        ref = fastpref.logits_logps(logits, logit_labels, temperature=1.2, return_token_logps=True, backend=backend)
        loss = fastpref.preference_loss(out.logps[:2], out.logps[2:4], ref.logps, ref.logps.detach() * 0.5,
                                        loss_type="sigmoid", beta=0.3, backend="torch").loss
        return loss + out.token_logps.pow(2).mean() + ref.token_logps.sum() * 0.1 + out.logps[4]
    return step


def _compare(backend, compile_backend, dtype=torch.float32):
    inputs = _inputs(dtype)
    params = [inputs[i] for i in (0, 1, 2, 5)]
    step = _step(backend)
    # Eager first: it also imports the backend modules (fastpref.backends.load_kernels imports on first use, which
    # dynamo cannot trace).
    eager_loss = step(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, params)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, params)
    exact = compile_backend == "aot_eager"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, eager_loss, **tol)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_equals_eager(backend, dtype):
    _compare(backend, "aot_eager", dtype)


def test_compiled_step_with_inductor():
    _compare(BACKENDS[-1], "inductor")
