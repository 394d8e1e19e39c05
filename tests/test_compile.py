"""torch.compile(fullgraph=True) of a training step calling linear_logps, logits_logps and preference_loss on CPU,
with the "torch" and "cpp" backends, forward and backward, against the same step run eagerly; then every loss type
of the table (preference_loss) and every listwise_loss type, and linear_logps with each head option (frozen or
trainable head, bias, softcap, temperature), each alone, at small shapes.

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
from fastpref.losses import LISTWISE_LOSS_TYPES, LOSS_DEFINITIONS

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
    _assert_compiled_equals_eager(_step(backend), inputs, [inputs[i] for i in (0, 1, 2, 5)], compile_backend)


def _assert_compiled_equals_eager(step, inputs, params, compile_backend="aot_eager"):
    """``step(*inputs)`` (a scalar) and its gradients with respect to ``params``, compiled with fullgraph=True
    against eager: bit for bit under aot_eager."""
    # Eager first: it also imports the backend modules (fastpref.backends.load_kernels imports on first use, which
    # dynamo cannot trace).
    eager_loss = step(*inputs)
    eager_grads = torch.autograd.grad(eager_loss, params, allow_unused=True, materialize_grads=True)
    torch._dynamo.reset()  # a fresh cache: past the recompile limit dynamo would fall back to eager
    compiled = torch.compile(step, fullgraph=True, backend=compile_backend)
    loss = compiled(*inputs)
    grads = torch.autograd.grad(loss, params, allow_unused=True, materialize_grads=True)  # sft ignores rejected
    exact = compile_backend == "aot_eager"
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(loss, eager_loss, **tol)
    for got, want in zip(grads, eager_grads, strict=True):
        torch.testing.assert_close(got, want, **tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_step_equals_eager(backend, dtype):
    _compare(backend, "aot_eager", dtype)


def test_compiled_step_with_inductor():
    _compare(BACKENDS[-1], "inductor")


def _pair_case(definition, seed):
    """Policy log-probs (leaves), reference log-probs and the keyword arguments ``definition`` needs: counts
    (one 0), tau, an offset, per-pair weights, the Sr-DPO aug_* log-probs, label smoothing inside its interval
    and, where the type takes one, a non-default f-divergence."""
    gen = torch.Generator().manual_seed(seed)
    pairs = 7

    def logps():
        return -5 - 60 * torch.rand(pairs, generator=gen)

    chosen, rejected = logps().requires_grad_(), logps().requires_grad_()
    kwargs = dict(loss_type=definition.name, beta=0.3, chosen_counts=torch.randint(0, 40, (pairs,), generator=gen),
                  rejected_counts=torch.randint(1, 40, (pairs,), generator=gen))
    kwargs["chosen_counts"][2] = 0
    if not definition.reference_free:
        kwargs.update(ref_chosen_logps=chosen.detach() + torch.randn(pairs, generator=gen),
                      ref_rejected_logps=rejected.detach() + torch.randn(pairs, generator=gen))
    if "tau" in definition.requires:
        kwargs["tau"] = torch.rand(pairs, generator=gen)
    if definition.takes_offset:
        kwargs["offset"] = 2 * torch.rand(pairs, generator=gen)
    if definition.takes_weights:
        kwargs["weights"] = 0.5 + torch.rand(pairs, generator=gen)
    if definition.refined:
        kwargs.update({key: logps() for key in ("aug_chosen_logps", "aug_rejected_logps", "aug_ref_chosen_logps",
                                                "aug_ref_rejected_logps")})
    if definition.smoothing is not None:
        low, high = definition.smoothing[:2]
        kwargs["label_smoothing"] = low + (high - low) / 4
    if definition.f_divergence:
        kwargs["f_divergence_type"] = "js_divergence"
    return chosen, rejected, kwargs


@pytest.mark.parametrize("loss_type", list(LOSS_DEFINITIONS))
@pytest.mark.parametrize("backend", BACKENDS)
def test_every_loss_type_compiles(backend, loss_type):
    chosen, rejected, kwargs = _pair_case(LOSS_DEFINITIONS[loss_type], seed=LOSS_DEFINITIONS[loss_type].code)
    upstream = torch.randn(chosen.numel(), generator=torch.Generator().manual_seed(3))

    def step(chosen, rejected):
        out = fastpref.preference_loss(chosen, rejected, **kwargs, backend=backend)
        return out.loss + (upstream * out.losses).sum() + out.margins.sum()

    _assert_compiled_equals_eager(step, (chosen, rejected), [chosen, rejected])


@pytest.mark.parametrize("with_ref", [True, False], ids=["ref", "reference_free"])
@pytest.mark.parametrize("loss_type", LISTWISE_LOSS_TYPES)
def test_every_listwise_loss_type_compiles(loss_type, with_ref):
    gen = torch.Generator().manual_seed(31)
    policy = (-5 - 30 * torch.rand(3, 5, generator=gen)).requires_grad_()
    ref = -5 - 30 * torch.rand(3, 5, generator=gen) if with_ref else None
    scores = torch.randint(0, 4, (3, 5), generator=gen).float()  # ties included
    mask = torch.tensor([[True] * 5, [True, True, False, True, False], [True, False, True, True, True]])
    upstream = torch.randn(3, generator=gen)

    def step(policy):
        out = fastpref.listwise_loss(policy, ref, scores, loss_type, 0.2, mask)
        return out.loss + (upstream * out.losses).sum()

    _assert_compiled_equals_eager(step, (policy,), [policy])


HEAD_OPTIONS = {"plain": {}, "bias": {"bias": True}, "softcap": {"softcap": 3.0}, "temperature": {"temperature": 0.7},
                "all": {"bias": True, "softcap": 3.0, "temperature": 1.3},
                "token_stats": {"return_token_stats": True, "softcap": 3.0}}


@pytest.mark.parametrize("options", list(HEAD_OPTIONS))
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_linear_logps_compiles_with_each_head_option(backend, frozen, options):
    """A frozen head (no weight or bias gradient) or a trainable one, with a bias, a softcap, a temperature, all,
    or the token statistics (the trainer's policy pass asks for them)."""
    options = dict(HEAD_OPTIONS[options])
    gen = torch.Generator().manual_seed(41)
    hidden = torch.randn(13, 8, generator=gen, requires_grad=True)
    weight = torch.randn(29, 8, generator=gen).requires_grad_(not frozen)
    bias = torch.randn(29, generator=gen).requires_grad_(not frozen) if options.pop("bias", False) else None
    labels = torch.randint(0, 29, (13,), generator=gen)
    labels[[1, 7, 8]] = -100
    cu = torch.tensor([0, 5, 5, 13])  # one empty sequence
    upstream = torch.randn(13, generator=gen)

    def step(hidden, weight, bias):
        out = fastpref.linear_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu, return_token_logps=True,
                                    backend=backend, **options)
        stats = 0 if out.token_stats is None else sum(value.float().sum() for value in out.token_stats)
        return (out.logps * torch.tensor([0.5, 2.0, -1.0])).sum() + (upstream * out.token_logps).sum() + stats

    params = [hidden] + ([] if frozen else [weight] + ([] if bias is None else [bias]))
    _assert_compiled_equals_eager(step, (hidden, weight, bias), params)


def test_token_stats_op_passes_opcheck():
    """torch.ops.fastpref.torch_linear_stats (the token statistics of the torch and cpp backends as one op): schema,
    fake kernel (shapes and dtypes, also for float64 inputs) and dispatch."""
    import fastpref.logps.torch_backend  # noqa: F401  (registers the op)

    gen = torch.Generator().manual_seed(43)
    for dtype in (torch.float32, torch.float64):
        hidden, weight = torch.randn(11, 8, generator=gen, dtype=dtype), torch.randn(23, 8, generator=gen, dtype=dtype)
        bias = torch.randn(23, generator=gen, dtype=dtype)
        labels = torch.randint(0, 23, (11,), generator=gen)
        labels[[0, 4]] = -100
        torch.library.opcheck(torch.ops.fastpref.torch_linear_stats.default,
                              (hidden, weight, bias, labels, -100, 0.8, 3.0))
