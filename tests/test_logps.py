"""fastpref.linear_logps / logits_logps on every backend present, against the float64 oracle, under the error
rule of tests/logps_checks.py (no worse than eager PyTorch in the same dtype, plus a small tolerance)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
import zlib

import pytest
import torch
from conftest import available_backends
from logps_checks import (assert_within_eager, eager_linear_logps, eager_logits_logps, float64_copies,
                          upstream_grads)

import fastpref
from fastpref.logps import oracle as logps_oracle

BACKENDS = available_backends()
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _random_case(packed: bool, n_seq: int, steps: int, dim: int, vocab: int, dtype, seed: int, ignored=0.35,
                 with_bias=False, weighted=False):
    gen = torch.Generator().manual_seed(seed)
    scale = dim ** -0.5
    if packed:
        lengths = torch.randint(1, 2 * steps, (n_seq,), generator=gen)
        lengths[0] = 1
        cu = torch.nn.functional.pad(lengths.cumsum(0), (1, 0))
        rows = int(cu[-1])
        hidden = torch.randn(rows, dim, generator=gen)
        label_shape = (rows,)
    else:
        cu = None
        hidden = torch.randn(n_seq, steps, dim, generator=gen)
        label_shape = (n_seq, steps)
    weight = torch.randn(vocab, dim, generator=gen) * scale * 4
    labels = torch.randint(0, vocab, label_shape, generator=gen)
    labels[torch.rand(label_shape, generator=gen) < ignored] = -100
    bias = torch.randn(vocab, generator=gen) if with_bias else None
    token_weights = torch.rand(label_shape, generator=gen) + 0.5 if weighted else None
    hidden, weight = hidden.to(dtype).requires_grad_(), weight.to(dtype).requires_grad_()
    if bias is not None:
        bias = bias.to(dtype).requires_grad_()
    return hidden, weight, labels, bias, token_weights, cu


CASES = [
    # packed, sequences, steps, D, V, softcap, temperature, bias, token weights
    pytest.param(False, 3, 5, 33, 301, None, 1.0, False, False, id="padded"),
    pytest.param(True, 4, 4, 17, 257, None, 1.0, False, True, id="packed-weighted"),
    pytest.param(False, 2, 1, 9, 130, 5.0, 0.7, True, False, id="T1-softcap-temp-bias"),
    pytest.param(True, 3, 3, 24, 515, 3.0, 1.3, True, True, id="packed-all"),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed,n_seq,steps,dim,vocab,softcap,temperature,with_bias,weighted", CASES)
def test_linear_logps_matches_oracle(backend, dtype, packed, n_seq, steps, dim, vocab, softcap, temperature,
                                     with_bias, weighted):
    seed = zlib.crc32(repr((backend, str(dtype), packed, dim, vocab)).encode()) % 10_000  # hash() varies per run
    hidden, weight, labels, bias, token_weights, cu = _random_case(
        packed, n_seq, steps, dim, vocab, dtype, seed, with_bias=with_bias, weighted=weighted)
    kwargs = dict(bias=bias, softcap=softcap, temperature=temperature, token_weights=token_weights,
                  cu_seqlens=cu)
    out = fastpref.linear_logps(hidden, weight, labels, return_token_logps=True, backend=backend, **kwargs)
    exact = float64_copies(hidden, weight, bias)
    oracle = logps_oracle.linear_logps(exact[0], exact[1], labels, return_token_logps=True,
                                       **{**kwargs, "bias": exact[2]})
    eager = eager_linear_logps(hidden, weight, labels, bias, softcap, temperature, token_weights, cu)

    assert out.logps.dtype == torch.float32 and out.counts.dtype == torch.int64
    assert torch.equal(out.counts, oracle.counts)
    assert out.token_logps.shape == labels.shape
    assert torch.all(out.token_logps[labels == -100] == 0)
    assert_within_eager("logps", out.logps, eager.logps, oracle.logps, dtype)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)

    # Non-uniform upstream gradients on both outputs.
    gen = torch.Generator().manual_seed(seed + 1)
    g_seq = torch.randn(out.logps.shape, generator=gen, dtype=torch.float64)
    g_tok = torch.randn(labels.shape, generator=gen, dtype=torch.float64)
    params = (hidden, weight, bias)
    fast_grads = upstream_grads(out, params, g_seq, g_tok)
    oracle_grads = upstream_grads(oracle, exact, g_seq, g_tok)
    eager_grads = upstream_grads(eager, params, g_seq, g_tok)
    for name, fast, eg, orc, p in zip(("hidden", "weight", "bias"), fast_grads, eager_grads, oracle_grads,
                                      [p for p in params if p is not None]):
        assert fast.dtype == p.dtype and fast.shape == p.shape
        assert_within_eager(f"grad {name}", fast, eg, orc, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_logits_logps_matches_oracle(backend, dtype, packed):
    gen = torch.Generator().manual_seed(7)
    vocab = 263
    if packed:
        cu = torch.tensor([0, 3, 3, 10, 11])
        shape = (11,)
    else:
        cu, shape = None, (3, 6)
    logits = (torch.randn(*shape, vocab, generator=gen) * 3).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, shape, generator=gen)
    labels[torch.rand(shape, generator=gen) < 0.3] = -100
    weights = torch.rand(shape, generator=gen) + 0.5
    kwargs = dict(temperature=0.8, token_weights=weights, cu_seqlens=cu, return_token_logps=True)
    out = fastpref.logits_logps(logits, labels, backend=backend, **kwargs)
    (exact,) = float64_copies(logits)
    oracle = logps_oracle.logits_logps(exact, labels, **kwargs)
    eager = eager_logits_logps(logits, labels, **{k: v for k, v in kwargs.items() if k != "return_token_logps"})
    assert torch.equal(out.counts, oracle.counts)
    assert_within_eager("logps", out.logps, eager.logps, oracle.logps, dtype)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)
    g_seq = torch.randn(out.logps.shape, generator=gen, dtype=torch.float64)
    g_tok = torch.randn(shape, generator=gen, dtype=torch.float64)
    (fast,) = upstream_grads(out, (logits,), g_seq, g_tok)
    (orc,) = upstream_grads(oracle, (exact,), g_seq, g_tok)
    (eg,) = upstream_grads(eager, (logits,), g_seq, g_tok)
    assert fast.dtype == dtype
    assert_within_eager("grad logits", fast, eg, orc, dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.float64], ids=str)
def test_token_stats_match_oracle(backend, dtype):
    """Entropy, log Σp², mean logit (float32) and top-1 per row, off by default, carrying no gradient."""
    gen = torch.Generator().manual_seed(11)
    hidden = torch.randn(3, 7, 20, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(211, 20, generator=gen) * 0.6).to(dtype)
    labels = torch.randint(0, 211, (3, 7), generator=gen)
    labels[:, :2] = -100
    z = hidden.detach().double() @ weight.double().T
    labels[:, 4] = (2.0 * torch.tanh(z / 2.0)).argmax(-1)[:, 4]  # some rows predicted right
    kwargs = dict(softcap=2.0, temperature=0.8)
    assert fastpref.linear_logps(hidden, weight, labels, backend=backend, **kwargs).token_stats is None
    out = fastpref.linear_logps(hidden, weight, labels, return_token_stats=True, backend=backend, **kwargs)
    oracle = logps_oracle.linear_logps(hidden, weight, labels, return_token_stats=True, **kwargs).token_stats
    tol = 2e-3 if dtype == torch.float16 else 2e-5
    for name in ("entropy", "log_sum_sq_probs", "mean_logits"):
        got, want = getattr(out.token_stats, name), getattr(oracle, name)
        assert got.shape == labels.shape and got.dtype == torch.float32 and not got.requires_grad
        torch.testing.assert_close(got.double(), want, rtol=0, atol=tol * max(1.0, want.abs().max().item()), msg=name)
    assert out.token_stats.is_top1.dtype == torch.bool
    assert torch.equal(out.token_stats.is_top1, oracle.is_top1) and oracle.is_top1.sum() >= 3
    out.logps.sum().backward()  # the statistics leave the gradient path as it is
    assert torch.isfinite(hidden.grad).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_sequence_without_scored_rows_is_zero_not_nan(backend):
    hidden = torch.randn(3, 4, 8, requires_grad=True)
    weight = torch.randn(50, 8, requires_grad=True)
    labels = torch.randint(0, 50, (3, 4))
    labels[1] = -100
    out = fastpref.linear_logps(hidden, weight, labels, backend=backend)
    assert out.logps[1].item() == 0.0 and out.counts[1].item() == 0
    assert torch.isfinite(out.logps).all()
    out.logps.sum().backward()
    assert torch.all(hidden.grad[1] == 0) and torch.isfinite(weight.grad).all()
    empty = fastpref.linear_logps(hidden.detach().reshape(12, 8), weight.detach(), labels.reshape(12),
                                  cu_seqlens=torch.tensor([0, 4, 4, 12]), backend=backend)
    assert empty.logps[1].item() == 0.0 and empty.counts.tolist() == [4, 0, 4]


@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_gradient_rows_get_zero_gradient(backend):
    """A sequence used only under stop-gradient (zero upstream gradient) contributes exactly nothing."""
    gen = torch.Generator().manual_seed(3)
    hidden = torch.randn(2, 5, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, requires_grad=True)
    labels = torch.randint(0, 97, (2, 5), generator=gen)
    out = fastpref.linear_logps(hidden, weight, labels, backend=backend)
    (out.logps * torch.tensor([0.0, 1.7])).sum().backward()
    assert torch.all(hidden.grad[0] == 0)
    solo = torch.autograd.grad(1.7 * fastpref.linear_logps(hidden[1:], weight, labels[1:], backend=backend).logps.sum(),
                               weight)[0]
    torch.testing.assert_close(weight.grad, solo, rtol=1e-5, atol=1e-6)


def test_backends_report_and_default():
    status = fastpref.backends()
    assert set(status) == {"triton", "cpp", "torch"}
    assert status["torch"].available
    if os.environ.get("FASTPREF_NO_EXT") != "1":
        assert status["cpp"].available, f"the compiled extension did not load: {status['cpp'].reason}"
        assert hasattr(torch.ops.fastpref, "linear_logps_fwd")
    hidden, weight = torch.randn(2, 3, 4), torch.randn(10, 4)
    labels = torch.randint(0, 10, (2, 3))
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpref.linear_logps(hidden, weight, labels, backend="cuda")


def test_env_var_picks_backend(monkeypatch):
    from fastpref.backends import resolve_backend

    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    assert resolve_backend(None, torch.device("cpu")) == "torch"
    assert resolve_backend("torch", torch.device("cpu")) == "torch"
    monkeypatch.delenv("FASTPREF_BACKEND")
    expected = "cpp" if fastpref.backends()["cpp"].available else "torch"
    assert resolve_backend(None, torch.device("cpu")) == expected


def test_missing_backend_says_why(monkeypatch):
    from fastpref import _ext
    from fastpref.backends import BackendUnavailableError

    monkeypatch.setattr(_ext, "_module", None)
    monkeypatch.setattr(_ext, "_missing_reason", "fastpref._C was built for torch 0.0, running torch 9.9")
    with pytest.raises(BackendUnavailableError, match="built for torch 0.0"):
        fastpref.linear_logps(torch.randn(2, 4), torch.randn(5, 4), torch.tensor([1, 2]), backend="cpp")


def _args():
    return torch.randn(2, 3, 8), torch.randn(11, 8), torch.randint(0, 11, (2, 3))


@pytest.mark.parametrize("mutate,error,match", [
    (lambda h, w, y, kw: (h, w, y.float(), kw), TypeError, "labels must be an integer"),
    (lambda h, w, y, kw: (h, w, y[:, :2], kw), ValueError, "labels must have shape"),
    (lambda h, w, y, kw: (h, w.double(), y, kw), TypeError, "weight dtype"),
    (lambda h, w, y, kw: (h, w[:, :5], y, kw), ValueError, "hidden must be"),
    (lambda h, w, y, kw: (h, w.to("meta"), y, kw), ValueError, "weight is on meta"),
    (lambda h, w, y, kw: (h, w, y.clone().fill_(11), kw), ValueError, ">= the vocabulary size 11"),
    (lambda h, w, y, kw: (h, w, y.clone().fill_(-3), kw), ValueError, "negative values"),
    (lambda h, w, y, kw: (h, w, y, {"temperature": float("nan")}), ValueError, "temperature"),
    (lambda h, w, y, kw: (h, w, y, {"temperature": 0.0}), ValueError, "temperature"),
    (lambda h, w, y, kw: (h, w, y, {"softcap": 0.0}), ValueError, "softcap"),
    (lambda h, w, y, kw: (h, w, y, {"softcap": float("inf")}), ValueError, "softcap"),
    (lambda h, w, y, kw: (h, w, y, {"bias": torch.randn(10)}), ValueError, "bias must have shape"),
    (lambda h, w, y, kw: (h, w, y, {"token_weights": torch.rand(3, 2)}), ValueError, "token_weights"),
    (lambda h, w, y, kw: (h, w, y, {"cu_seqlens": torch.tensor([0, 6])}), ValueError, "packed form"),
    (lambda h, w, y, kw: (h.reshape(6, 8), w, y.reshape(6), {"cu_seqlens": torch.tensor([1, 6])}),
     ValueError, "start at 0"),
    (lambda h, w, y, kw: (h.reshape(6, 8), w, y.reshape(6), {"cu_seqlens": torch.tensor([0, 4, 2, 6])}),
     ValueError, "non-decreasing"),
    (lambda h, w, y, kw: (h.reshape(6, 8), w, y.reshape(6), {"cu_seqlens": torch.tensor([0, 5])}),
     ValueError, "end at the number of rows"),
    (lambda h, w, y, kw: (h.reshape(6, 8), w, y.reshape(6), {"cu_seqlens": torch.tensor([0.0, 6.0])}),
     TypeError, "cu_seqlens must be int32 or int64"),
    (lambda h, w, y, kw: (h.int(), w.int(), y, kw), TypeError, "hidden must be float"),
    (lambda h, w, y, kw: (h[..., :0], w[:, :0], y, kw), ValueError, "D >= 1"),
])
def test_bad_input_names_the_argument(mutate, error, match):
    hidden, weight, labels, kwargs = mutate(*_args(), {})
    with pytest.raises(error, match=match):
        fastpref.linear_logps(hidden, weight, labels, backend="torch", **kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_skip_value_checks_removes_only_the_value_checks(backend):
    hidden, weight = torch.randn(4, 8), torch.randn(11, 8)
    bad_labels = torch.tensor([1, 11, 2, -100])
    with pytest.raises(ValueError, match="vocabulary size"):
        fastpref.linear_logps(hidden, weight, bad_labels, backend=backend)
    with fastpref.skip_value_checks():
        out = fastpref.linear_logps(hidden, weight, bad_labels, backend=backend)  # memory-safe, value undefined
        assert out.counts.tolist() == [3]
        with pytest.raises(ValueError, match="labels must have shape"):  # shape checks stay
            fastpref.linear_logps(hidden, weight, bad_labels[:3], backend=backend)
    with pytest.raises(ValueError, match="vocabulary size"):
        fastpref.linear_logps(hidden, weight, bad_labels, backend=backend)


def test_logits_bad_input():
    with pytest.raises(ValueError, match=">= the vocabulary size 7"):
        fastpref.logits_logps(torch.randn(3, 7), torch.tensor([0, 7, 1]))
    with pytest.raises(ValueError, match="logits must be"):
        fastpref.logits_logps(torch.randn(7), torch.tensor([0]))


_BOUNDED_MEMORY_SCRIPT = textwrap.dedent("""
    import resource, sys, torch, fastpref
    torch.manual_seed(0)
    rows, dim, vocab = 256, 8, 2 ** 20
    hidden = torch.randn(rows, dim, requires_grad=True)
    weight = (torch.randn(vocab, dim) * 0.3).requires_grad_()
    labels = torch.randint(0, vocab, (rows,))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    out = fastpref.linear_logps(hidden, weight, labels, backend=sys.argv[1])
    out.logps.sum().backward()
    grown = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) * 1024
    print(grown)
""")


@pytest.mark.parametrize("backend", [b for b in ("torch", "cpp") if b in BACKENDS])
def test_large_vocabulary_runs_in_bounded_memory(backend):
    """256 rows × 2^20 vocabulary: full float32 logits would take 1 GiB; the op must stay far below that."""
    done = subprocess.run([sys.executable, "-c", _BOUNDED_MEMORY_SCRIPT, backend], capture_output=True, text=True,
                          check=True, env={**os.environ, "OMP_NUM_THREADS": "2"})
    grown = int(done.stdout.strip().splitlines()[-1])
    weight_grad_bytes = 2 ** 20 * 8 * 4
    assert grown < weight_grad_bytes + 200 * 2 ** 20, f"peak memory grew by {grown / 2**20:.0f} MiB"


def test_kernels_folder_is_not_a_top_level_package(tmp_path):
    """The Triton kernels ship as fastpref.kernels. Outside a checkout `kernels` does not resolve to them; inside
    one (root on sys.path) the folder refuses use and transformers' probe for the PyPI `kernels` sees nothing."""
    import importlib.util

    assert importlib.util.find_spec("fastpref.kernels") is not None
    probe = "import importlib.util, sys; s = importlib.util.find_spec('kernels'); print(s.origin if s else None)"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=tmp_path, check=True)
    assert "fastpref" not in out.stdout and "/kernels/__init__.py" not in out.stdout
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    blocked = subprocess.run([sys.executable, "-c", "from kernels import get_kernel"], capture_output=True,
                             text=True, cwd=repo)
    assert blocked.returncode != 0 and "use fastpref.kernels" in blocked.stderr
    probe = "from transformers.utils.import_utils import is_kernels_available as k; print(k())"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, cwd=repo, check=True)
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input_returns_zeros(backend):
    """[B, 0] padded and N = 0 packed inputs: zeros (logps, counts), token_logps of the labels' shape, zero grads."""
    weight = torch.randn(7, 4, requires_grad=True)
    bias = torch.randn(7, requires_grad=True)
    cases = [(torch.randn(3, 0, 4, requires_grad=True), torch.zeros(3, 0, dtype=torch.long), None),
             (torch.randn(0, 4, requires_grad=True), torch.zeros(0, dtype=torch.long), torch.tensor([0, 0, 0]))]
    for hidden, labels, cu in cases:
        num = labels.shape[0] if cu is None else cu.numel() - 1
        out = fastpref.linear_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu, return_token_logps=True,
                                    backend=backend)
        assert torch.equal(out.logps, torch.zeros(num)) and torch.equal(out.counts, torch.zeros(num, dtype=torch.long))
        assert out.token_logps.shape == labels.shape
        grads = torch.autograd.grad(out.logps.sum() + out.token_logps.sum(), (hidden, weight, bias))
        for grad, param in zip(grads, (hidden, weight, bias)):
            assert grad.shape == param.shape and torch.all(grad == 0)
        logits = torch.randn(*labels.shape, 7, requires_grad=True)
        out = fastpref.logits_logps(logits, labels, cu_seqlens=cu, return_token_logps=True, backend=backend)
        assert torch.equal(out.logps, torch.zeros(num)) and out.token_logps.shape == labels.shape
        (grad,) = torch.autograd.grad(out.logps.sum(), logits)
        assert grad.shape == logits.shape


@pytest.mark.parametrize("backend", BACKENDS)
def test_packed_sequences_are_isolated(backend):
    """A NaN hidden row or a −inf target logit in one packed sequence leaves every other sequence's sum as it
    would be without it (a prefix sum over the packed rows spread it to every later sequence)."""
    gen = torch.Generator().manual_seed(21)
    hidden, weight = torch.randn(12, 8, generator=gen), torch.randn(30, 8, generator=gen)
    labels = torch.randint(0, 30, (12,), generator=gen)
    cu = torch.tensor([0, 3, 6, 6, 10, 12])
    clean = fastpref.linear_logps(hidden, weight, labels, cu_seqlens=cu, backend=backend).logps
    broken = hidden.clone()
    broken[4, 2] = float("nan")  # sequence 1
    hidden_req, weight_req = broken.requires_grad_(), weight.clone().requires_grad_()
    out = fastpref.linear_logps(hidden_req, weight_req, labels, cu_seqlens=cu, backend=backend)
    assert torch.isnan(out.logps[1])
    others = torch.tensor([0, 2, 3, 4])
    torch.testing.assert_close(out.logps[others], clean[others], rtol=1e-6, atol=1e-6)
    keep = torch.tensor([1.0, 0.0, 1.0, 1.0, 1.0])  # the broken sequence under a zero upstream gradient
    dh, dw = torch.autograd.grad((out.logps.nan_to_num() * keep).sum(), (hidden_req, weight_req))
    assert torch.isfinite(dw).all() and torch.isfinite(dh[torch.arange(12) != 4]).all()

    logits = torch.randn(12, 30, generator=gen)
    clean = fastpref.logits_logps(logits, labels, cu_seqlens=cu, backend=backend).logps
    logits[7, labels[7]] = float("-inf")  # sequence 3: its target is impossible
    out = fastpref.logits_logps(logits, labels, cu_seqlens=cu, backend=backend).logps
    assert out[3] == float("-inf")
    others = torch.tensor([0, 1, 2, 4])
    torch.testing.assert_close(out[others], clean[others], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_float64_in_float64_out(backend):
    """float64 inputs: float64 logps and token_logps at float64 precision, float64 gradients likewise (error
    ≤ 2 × eager float64's + 1e-12 relative); a float32 computation inside misses by ~1e-7."""
    dtype = torch.float64
    hidden, weight, labels, bias, token_weights, cu = _random_case(True, 3, 4, 13, 67, dtype, seed=5,
                                                                   with_bias=True, weighted=True)
    kwargs = dict(bias=bias, softcap=4.0, temperature=0.9, token_weights=token_weights, cu_seqlens=cu)
    out = fastpref.linear_logps(hidden, weight, labels, return_token_logps=True, backend=backend, **kwargs)
    oracle = logps_oracle.linear_logps(hidden, weight, labels, return_token_logps=True, **kwargs)
    eager = eager_linear_logps(hidden, weight, labels, bias, 4.0, 0.9, token_weights, cu)
    assert out.logps.dtype == dtype and out.token_logps.dtype == dtype
    assert_within_eager("logps", out.logps, eager.logps, oracle.logps, dtype)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)
    gen = torch.Generator().manual_seed(6)
    g_seq, g_tok = torch.randn(out.logps.shape, generator=gen, dtype=dtype), torch.randn(labels.shape, generator=gen,
                                                                                          dtype=dtype)
    params = (hidden, weight, bias)
    for name, fast, eg, orc in zip(("hidden", "weight", "bias"), upstream_grads(out, params, g_seq, g_tok),
                                   upstream_grads(eager, params, g_seq, g_tok),
                                   upstream_grads(oracle, params, g_seq, g_tok)):
        assert fast.dtype == dtype
        assert_within_eager(f"grad {name}", fast, eg, orc, dtype)

    logits = (torch.randn(11, 53, generator=gen, dtype=dtype) * 3).requires_grad_()
    lab = torch.randint(0, 53, (11,), generator=gen)
    out = fastpref.logits_logps(logits, lab, temperature=1.1, return_token_logps=True, backend=backend)
    oracle = logps_oracle.logits_logps(logits, lab, temperature=1.1, return_token_logps=True)
    eager = eager_logits_logps(logits, lab, temperature=1.1)
    assert out.logps.dtype == dtype
    assert_within_eager("logits token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)
    g_seq, g_tok = torch.randn(1, generator=gen, dtype=dtype), torch.randn(11, generator=gen, dtype=dtype)
    (fast,), (eg,), (orc,) = (upstream_grads(o, (logits,), g_seq, g_tok) for o in (out, eager, oracle))
    assert fast.dtype == dtype
    assert_within_eager("grad logits", fast, eg, orc, dtype)


def test_ignore_index_out_of_int64_range_is_a_value_error():
    hidden, weight, labels = _args()
    for bad in (2 ** 70, -(2 ** 63) - 1):
        with pytest.raises(ValueError, match="ignore_index"):
            fastpref.linear_logps(hidden, weight, labels, ignore_index=bad, backend="torch")
        with pytest.raises(ValueError, match="ignore_index"):
            fastpref.logits_logps(torch.randn(2, 3, 11), labels, ignore_index=bad, backend="torch")


def test_meta_tensors_skip_the_value_checks():
    """Meta tensors carry no values: the ops return outputs of the right shapes and dtypes instead of raising
    NotImplementedError from the value checks."""
    hidden, weight = torch.randn(10, 8, device="meta"), torch.randn(11, 8, device="meta")
    labels = torch.zeros(10, dtype=torch.long, device="meta")
    cu = torch.zeros(4, dtype=torch.long, device="meta")
    out = fastpref.linear_logps(hidden, weight, labels, cu_seqlens=cu, return_token_logps=True)
    assert out.logps.device.type == "meta" and out.logps.shape == (3,) and out.token_logps.shape == (10,)
    out = fastpref.logits_logps(torch.randn(2, 5, 11, device="meta"), labels.view(2, 5))
    assert out.logps.shape == (2,) and out.counts.dtype == torch.int64


def test_no_tensor_is_built_from_host_data(monkeypatch):
    """Packed input without cu_seqlens (and padded input) get their boundaries made on the device: building them
    with torch.tensor([...], device=cuda) is a host-to-device copy on every call."""
    def refuse(*args, **kwargs):
        raise AssertionError("torch.tensor / torch.as_tensor called on the op's path")

    hidden, weight, labels = torch.randn(6, 8), torch.randn(11, 8), torch.randint(0, 11, (6,))
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    monkeypatch.setattr(torch, "tensor", refuse)
    monkeypatch.setattr(torch, "as_tensor", refuse)
    assert fastpref.linear_logps(hidden, weight, labels, backend="torch").logps.shape == (1,)
    assert fastpref.linear_logps(hidden.view(2, 3, 8), weight, labels.view(2, 3), backend="torch").logps.shape == (2,)
    assert fastpref.logits_logps(torch.randn(6, 11), labels, backend="torch").logps.shape == (1,)


def test_oracle_token_stats_accurate_near_one_hot():
    """The oracle's entropy and log Σp² on rows z = (g, 0, …, 0): closed forms with r = (V−1)e^(−g),
    H = log1p(r) + g·r/(1+r) and log Σp² = log1p((V−1)e^(−2g)) − 2·log1p(r), to 1e-12 relative even where
    −Σ p log p of float64 probabilities is mostly rounding (and can come out negative)."""
    mpmath = pytest.importorskip("mpmath")
    mpmath.mp.dps = 80
    vocab, gaps = 50, [2.0, 15.0, 30.0, 45.0, 60.0]
    z = torch.zeros(len(gaps), vocab, dtype=torch.float64)
    z[:, 3] = torch.tensor(gaps)
    stats = logps_oracle.logits_logps(z, torch.full((len(gaps),), 3), return_token_stats=True).token_stats
    for row, gap in enumerate(gaps):
        r = (vocab - 1) * mpmath.exp(-gap)
        entropy = mpmath.log1p(r) + gap * r / (1 + r)
        log_sum_sq = mpmath.log1p((vocab - 1) * mpmath.exp(-2 * gap)) - 2 * mpmath.log1p(r)
        assert stats.entropy[row] >= 0
        assert abs(float(stats.entropy[row]) - float(entropy)) <= 1e-12 * float(entropy)
        assert abs(float(stats.log_sum_sq_probs[row]) - float(log_sum_sq)) <= 1e-12 * abs(float(log_sum_sq))
