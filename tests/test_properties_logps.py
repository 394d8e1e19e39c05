"""Property-based fuzzing of fastpref.linear_logps / logits_logps on every backend present, against the float64
oracle, under the error rule of tests/logps_checks.py (values and gradients no worse than 2 × eager PyTorch in
the same dtype + 1e-6 relative, 1e-12 for float64).

Hypothesis draws shapes (V = 1, primes, just above the backends' tile sizes), layouts (padded, packed, empty and
all-ignored sequences), dtypes, bias / softcap / temperature / token weights / ignore_index, non-contiguous
inputs, large logit magnitudes and offsets, frozen or trainable heads and non-uniform upstream gradients
(including zero ones). The torch backend also runs with tiny row and vocabulary blocks, so its multi-tile paths
are reached at small sizes; the triton backend (the interpreter here) gets small sizes only.

Budget: a fixed, derandomized run sized for CI by default. ``FASTPREF_FUZZ_EXAMPLES=N`` draws N cases per test
instead, ``FASTPREF_FUZZ_SEED=K`` another fixed set of cases; ``FASTPREF_FUZZ_LOG=path.jsonl`` records every
case (and its failure) to that file and keeps going instead of stopping at the first failure, for counting
failures in long runs.
"""

from __future__ import annotations

import json
import math
import os
import traceback
from dataclasses import asdict, dataclass
from unittest import mock

import pytest
import torch
from conftest import available_backends
from logps_checks import (assert_within_eager, eager_linear_logps, eager_logits_logps, float64_copies,
                          upstream_grads)

import fastpref
from fastpref.backends import triton_interpreted
from fastpref.logps import oracle as logps_oracle
from fastpref.logps import torch_backend

pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, Phase, given, note, seed, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

# On a CUDA machine the triton backend wants CUDA tensors; this suite builds CPU ones (tests/test_gpu_logps.py
# covers the compiled kernels there).
BACKENDS = [b for b in available_backends() if b != "triton" or triton_interpreted()]
EXAMPLES = int(os.environ.get("FASTPREF_FUZZ_EXAMPLES", "0"))
LOG_PATH = os.environ.get("FASTPREF_FUZZ_LOG")
SEED = int(os.environ["FASTPREF_FUZZ_SEED"]) if os.environ.get("FASTPREF_FUZZ_SEED") else None
DTYPES = {"fp32": torch.float32, "fp64": torch.float64, "fp16": torch.float16, "bf16": torch.bfloat16}
# Cases per test in CI (the interpreter runs a Triton program in about a millisecond: fewer there).
CI_EXAMPLES = {"torch": 25, "cpp": 25, "triton": 5}

# bf16 tl.dot and arithmetic are wrong in the Triton interpreter (NOTES.md): triton bf16 is checked on a GPU only.
SKIP = {("triton", "bf16"): "bf16 is broken in the Triton interpreter"}


def _params():
    for backend in BACKENDS:
        for name in DTYPES:
            if (backend, name) in SKIP:
                continue
            yield pytest.param(backend, name, id=f"{backend}-{name}")


PARAMS = list(_params())


def _settings(backend: str):
    """Derandomized (the same cases every run) unless ``FASTPREF_FUZZ_SEED`` picks another fixed seed."""
    fixed = settings(max_examples=EXAMPLES or CI_EXAMPLES[backend], derandomize=SEED is None, deadline=None,
                     database=None, phases=(Phase.explicit, Phase.generate), suppress_health_check=list(HealthCheck))
    return fixed if SEED is None else (lambda test: seed(SEED)(fixed(test)))


@dataclass(frozen=True)
class Case:
    """One drawn problem; its repr is a complete reproducer (values come from ``seed``)."""

    dtype: str
    layout: tuple  # ("padded", B, T) or ("packed", lengths...)
    dim: int
    vocab: int
    seed: int
    ignored: float  # fraction of rows set to ignore_index
    ignore_one_sequence: bool  # one sequence has no scored row
    ignore_index: int
    bias: bool
    offset: float  # added to every logit through the bias: large |z| with an ordinary spread
    softcap: float | None
    temperature: float
    weighted: bool
    strided: bool  # non-contiguous hidden / weight / logits
    magnitude: float  # standard deviation of the raw logits
    grad_hidden: bool
    grad_weight: bool  # and bias
    grads: str  # upstream gradients: "both", "sequences", "tokens", "sparse"
    blocks: tuple  # torch backend (ROW_BLOCK, VOCAB_BLOCK)


PRIMES_AND_EDGES = [1, 2, 3, 5, 7, 13, 16, 17, 31, 33, 61, 63, 64, 65, 127, 129]


@st.composite
def cases(draw, dtype: str, backend: str, linear: bool) -> Case:
    small = backend == "triton"
    if draw(st.booleans()):
        layout = ("padded", draw(st.integers(1, 3)), draw(st.sampled_from([0, 1, 2, 3, 5, 8, 17])))
    else:
        lengths = draw(st.lists(st.integers(0, 9 if small else 20), min_size=1, max_size=5))
        layout = ("packed", *lengths)
    vocab_choices = PRIMES_AND_EDGES + ([] if small else [257, 4097])
    vocab = draw(st.sampled_from(vocab_choices))
    dim = draw(st.sampled_from([1, 2, 5, 16, 17, 33] + ([] if small else [64, 65])))
    if vocab > 1000:
        dim = min(dim, 5)
    half = dtype in ("fp16", "bf16")
    bias = linear and draw(st.booleans())
    grad_weight = draw(st.booleans())
    return Case(
        dtype=dtype, layout=layout, dim=dim, vocab=vocab, seed=draw(st.integers(0, 2 ** 31 - 1)),
        ignored=draw(st.sampled_from([0.0, 0.3, 1.0])), ignore_one_sequence=draw(st.booleans()),
        ignore_index=draw(st.sampled_from([-100, -100, -1, 0])),
        bias=bias, offset=draw(st.sampled_from([0.0, 0.0, -40.0, 500.0])) if bias or not linear else 0.0,
        # fp16 eager overflows differentiating c·tanh(z/c) at c = 1e4 (upstream × c > 65504): no baseline there.
        softcap=draw(st.sampled_from([None, None, 1.0, 5.0, 50.0] + ([] if dtype == "fp16" else [1e4])))
        if linear else None,
        temperature=draw(st.sampled_from([1.0, 1.0, 0.7, 1.3, 0.1, 5.0])),
        weighted=draw(st.booleans()), strided=draw(st.booleans()),
        magnitude=draw(st.sampled_from([0.1, 1.0, 4.0, 30.0] + ([] if half else [300.0]))),
        grad_hidden=draw(st.booleans()) if grad_weight else True, grad_weight=grad_weight,
        grads=draw(st.sampled_from(["both", "sequences", "tokens", "sparse"])),
        blocks=draw(st.sampled_from([(1024, 4096), (3, 8), (16, 32)])) if backend == "torch" else (1024, 4096),
    )


def _layout(case: Case) -> tuple[tuple, torch.Tensor | None, int]:
    """(label shape, cu_seqlens or None, number of sequences)."""
    if case.layout[0] == "padded":
        _, batch, steps = case.layout
        return (batch, steps), None, batch
    lengths = torch.tensor(case.layout[1:])
    cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
    return (int(cu[-1]),), cu, lengths.numel()


def _labels(case: Case, shape, cu, gen) -> torch.Tensor:
    labels = torch.randint(0, case.vocab, shape, generator=gen)
    drop = torch.rand(shape, generator=gen) < case.ignored
    if case.ignore_one_sequence:
        if cu is None:
            drop[0] = True
        else:
            drop[cu[0]:cu[1]] = True
    return torch.where(drop, case.ignore_index, labels)


def _strided(values: torch.Tensor, strided: bool) -> torch.Tensor:
    """`values` as a leaf needing a gradient, or (strided) as every other column of a wider leaf."""
    if not strided:
        return values.clone().requires_grad_()
    wide = torch.zeros(*values.shape[:-1], 2 * values.shape[-1], dtype=values.dtype)
    wide[..., ::2] = values
    return wide.requires_grad_()[..., ::2]


def _upstream(case: Case, num_seq: int, shape, gen) -> tuple[torch.Tensor, torch.Tensor]:
    g_seq = torch.randn(num_seq, generator=gen, dtype=torch.float64)
    g_tok = torch.randn(shape, generator=gen, dtype=torch.float64)
    if case.grads == "sequences":
        g_tok.zero_()
    elif case.grads == "tokens":
        g_seq.zero_()
    elif case.grads == "sparse":
        g_seq[::2] = 0
    return g_seq, g_tok


def _check_outputs(out, eager, oracle, labels, case: Case, dtype):
    want_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    assert out.logps.dtype == want_dtype and out.token_logps.dtype == want_dtype, out.logps.dtype
    assert out.counts.dtype == torch.int64 and torch.equal(out.counts, oracle.counts)
    assert out.token_logps.shape == labels.shape
    assert torch.all(out.token_logps[labels == case.ignore_index] == 0), "ignored rows must score 0"
    assert_within_eager("logps", out.logps, eager.logps, oracle.logps, dtype)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)


def _check_grads(outs, params, exact_params, names, g_seq, g_tok, dtype):
    """outs = (fast, eager, oracle); the oracle is differentiated with respect to float64 copies of the inputs."""
    fast, eager, oracle = outs
    got = upstream_grads(fast, params, g_seq, g_tok)
    eg = upstream_grads(eager, params, g_seq, g_tok)
    want = upstream_grads(oracle, exact_params, g_seq, g_tok)
    for name, param, g, e, w in zip(names, params, got, eg, want):
        assert g.dtype == param.dtype and g.shape == param.shape, f"grad {name}: {g.dtype} {tuple(g.shape)}"
        assert_within_eager(f"grad {name}", g, e, w, dtype)


def _record(test: str, backend: str, case: Case, error: BaseException | None):
    with open(LOG_PATH, "a") as log:
        entry = {"test": test, "backend": backend, "case": repr(case), "ok": error is None}
        if error is not None:
            entry["error"] = "".join(traceback.format_exception_only(type(error), error)).strip()[-2000:]
        log.write(json.dumps(entry) + "\n")


def _run(test: str, backend: str, case: Case, check):
    note(repr(case))
    patch = (mock.patch.object(torch_backend, "ROW_BLOCK", case.blocks[0]),
             mock.patch.object(torch_backend, "VOCAB_BLOCK", case.blocks[1]))
    with patch[0], patch[1]:
        if LOG_PATH is None:
            check(backend, case)
            return
        try:
            check(backend, case)
        except Exception as error:  # recorded, not raised: a long run counts every failure
            _record(test, backend, case, error)
        else:
            _record(test, backend, case, None)


def _linear_case(backend: str, case: Case):
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(case.seed)
    shape, cu, num_seq = _layout(case)
    labels = _labels(case, shape, cu, gen)
    hidden = _strided(torch.randn(*shape, case.dim, generator=gen, dtype=torch.float64).to(dtype), case.strided)
    w = (torch.randn(case.vocab, case.dim, generator=gen, dtype=torch.float64) * case.magnitude / case.dim ** 0.5)
    weight = _strided(w.to(dtype).t().contiguous(), False).t() if case.strided else _strided(w.to(dtype), False)
    bias = None
    if case.bias:
        bias = _strided((torch.randn(case.vocab, generator=gen, dtype=torch.float64) + case.offset).to(dtype), False)
    weights = torch.rand(shape, generator=gen) + 0.25 if case.weighted else None
    kwargs = dict(bias=bias, ignore_index=case.ignore_index, temperature=case.temperature, softcap=case.softcap,
                  token_weights=weights, cu_seqlens=cu)
    out = fastpref.linear_logps(hidden, weight, labels, return_token_logps=True, backend=backend, **kwargs)
    exact = float64_copies(hidden, weight, bias)
    oracle = logps_oracle.linear_logps(exact[0], exact[1], labels, return_token_logps=True,
                                       **{**kwargs, "bias": exact[2]})
    eager = eager_linear_logps(hidden, weight, labels, bias, case.softcap, case.temperature, weights, cu,
                               ignore_index=case.ignore_index)
    _check_outputs(out, eager, oracle, labels, case, dtype)
    wanted = [case.grad_hidden, case.grad_weight, case.grad_weight and bias is not None]
    picked = [i for i, want in enumerate(wanted) if want]
    params = [(hidden, weight, bias)[i] for i in picked]
    exact_params = [exact[i] for i in picked]
    names = [("hidden", "weight", "bias")[i] for i in picked]
    g_seq, g_tok = _upstream(case, num_seq, shape, gen)
    _check_grads((out, eager, oracle), params, exact_params, names, g_seq, g_tok, dtype)


def _logits_case(backend: str, case: Case):
    dtype = DTYPES[case.dtype]
    gen = torch.Generator().manual_seed(case.seed)
    shape, cu, num_seq = _layout(case)
    labels = _labels(case, shape, cu, gen)
    raw = torch.randn(*shape, case.vocab, generator=gen, dtype=torch.float64) * case.magnitude + case.offset
    logits = _strided(raw.to(dtype), case.strided)
    weights = torch.rand(shape, generator=gen) + 0.25 if case.weighted else None
    kwargs = dict(ignore_index=case.ignore_index, temperature=case.temperature, token_weights=weights,
                  cu_seqlens=cu)
    out = fastpref.logits_logps(logits, labels, return_token_logps=True, backend=backend, **kwargs)
    (exact,) = float64_copies(logits)
    oracle = logps_oracle.logits_logps(exact, labels, return_token_logps=True, **kwargs)
    eager = eager_logits_logps(logits, labels, **kwargs)
    _check_outputs(out, eager, oracle, labels, case, dtype)
    g_seq, g_tok = _upstream(case, num_seq, shape, gen)
    _check_grads((out, eager, oracle), [logits], [exact], ["logits"], g_seq, g_tok, dtype)


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_linear_logps_properties(backend, dtype):
    @_settings(backend)
    @given(case=cases(dtype, backend, linear=True))
    def run(case):
        _run("linear", backend, case, _linear_case)

    run()


@pytest.mark.parametrize("backend,dtype", PARAMS)
def test_logits_logps_properties(backend, dtype):
    @_settings(backend)
    @given(case=cases(dtype, backend, linear=False))
    def run(case):
        _run("logits", backend, case, _logits_case)

    run()


def _case(**changes) -> Case:
    base = dict(dtype="fp32", layout=("packed", 6), dim=4, vocab=7, seed=0, ignored=0.0, ignore_one_sequence=False,
                ignore_index=-100, bias=False, offset=0.0, softcap=None, temperature=1.0, weighted=False,
                strided=False, magnitude=1.0, grad_hidden=True, grad_weight=True, grads="sequences",
                blocks=(1024, 4096))
    return Case(**{**base, **changes})


# Minimal reproducers of the fuzz run's findings in the compiled kernels (issue 10 items 2, 7, 8): large logits,
# V = 1, large and saturated softcaps, N = 0 with gradients wanted. Each failed before its kernel fix.
FOUND_CASES = [
    # a saturated softcap: 1 − tanh² recovered from the tempered logit must be exactly 0, as eager's
    ("linear", "cpp", _case(dtype="fp32", layout=("padded", 2, 17), dim=1, vocab=4097, seed=50941772, bias=True,
                            offset=500.0, softcap=1.0, temperature=0.7, weighted=True, magnitude=30.0,
                            grad_weight=False, grads="sparse")),
    ("linear", "cpp", _case(vocab=1, dim=3, magnitude=4.0, softcap=1.0)),
    ("linear", "cpp", _case(vocab=5, dim=2, magnitude=300.0, layout=("packed", 11, 6))),
    ("logits", "cpp", _case(vocab=127, magnitude=300.0, offset=500.0, seed=1, layout=("packed", 6, 3))),
    ("linear", "cpp", _case(vocab=2, dim=33, softcap=1e4, temperature=0.1, layout=("padded", 1, 8))),
    # bf16 with V = 5, D = 64: bf16-rounded logits (the earlier native bf16 GEMM) missed the rule here; the native
    # GEMMs now return float32 logits
    ("linear", "cpp", _case(dtype="bf16", vocab=5, dim=64, magnitude=3.0, layout=("packed", 9, 4))),
    ("linear", "cpp", _case(dtype="bf16", vocab=5, dim=64, softcap=2.0, bias=True, grads="sparse", seed=3)),
    ("linear", "triton", _case(layout=("packed", 0, 0))),
    ("linear", "triton", _case(vocab=31, dim=1, magnitude=300.0, temperature=5.0, layout=("packed", 3))),
    ("logits", "triton", _case(vocab=127, magnitude=300.0, temperature=0.7, seed=1, layout=("packed", 8))),
]


@pytest.mark.parametrize("test,backend,case", [
    pytest.param(test, backend, case, id=f"{test}-{backend}-{i}") for i, (test, backend, case) in enumerate(FOUND_CASES)])
def test_fuzz_findings_stay_fixed(test, backend, case):
    if backend not in BACKENDS:
        pytest.skip(f"backend {backend} is not available")
    {"linear": _linear_case, "logits": _logits_case}[test](backend, case)

