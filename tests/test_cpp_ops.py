"""The compiled CPU ops torch.ops.fastpref.{linear,logits}_logps_{fwd,bwd}, called directly (below the public API).

Checks: the ops and their fake kernels (shapes under FakeTensorMode, torch.library.opcheck); values and
gradients against a float64 autograd oracle for fp32/fp16/bf16/fp64 inputs, with bias, softcap, temperature,
ignored rows, zero-gradient rows and several vocabulary and row tiles; bit-for-bit determinism across runs and
thread counts; memory safety for labels outside [0, V); the contract checks; a 2^20 vocabulary in bounded memory.
"""

from __future__ import annotations

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

import fastpref

if not fastpref.backends()["cpp"].available:
    pytest.skip(f"cpp backend missing: {fastpref.backends()['cpp'].reason}", allow_module_level=True)

import fastpref.logps.cpp_backend  # noqa: E402,F401  (registers the fake kernels)

OPS = torch.ops.fastpref
IGNORE = -100
# (rtol, atol relative to the largest |oracle|) per input dtype: the kernels compute in float32 (float64 for
# float64 inputs); fp16/bf16 gradients are rounded to their dtype at the end.
TOL = {torch.float64: (2e-6, 2e-6), torch.float32: (2e-5, 2e-5), torch.float16: (2e-3, 1e-3),
       torch.bfloat16: (1e-2, 8e-3)}


def _linear_case(n, dim, vocab, dtype, seed, ignored=0.3, zero_grad=0.2, with_bias=True):
    gen = torch.Generator().manual_seed(seed)
    hidden = torch.randn(n, dim, generator=gen).to(dtype)
    weight = (torch.randn(vocab, dim, generator=gen) * 3 * dim ** -0.5).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[torch.rand(n, generator=gen) < ignored] = IGNORE
    grad = torch.randn(n, generator=gen)
    grad[torch.rand(n, generator=gen) < zero_grad] = 0.0
    return hidden, weight, bias, labels, grad


def _oracle_linear(hidden, weight, bias, labels, grad, temperature, softcap):
    """float64 token log-probs, lse and the gradients of Σ_t grad_t · log p_t (0 at ignored rows)."""
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    b = None if bias is None else bias.detach().double().requires_grad_()
    z = h @ w.T + (0 if b is None else b)
    if softcap:
        z = softcap * torch.tanh(z / softcap)
    z = z / temperature
    scored = labels != IGNORE
    token = torch.where(scored, z.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    lse = torch.logsumexp(z, -1)
    grads = torch.autograd.grad((token * grad.double()).sum(), [t for t in (h, w, b) if t is not None])
    return token.detach(), lse.detach(), grads


def _close(name, got, want, dtype):
    rtol, atol = TOL[dtype]
    scale = max(1.0, want.abs().max().item())
    torch.testing.assert_close(got.double(), want, rtol=rtol, atol=atol * scale, msg=lambda m: f"{name}: {m}")


def _lin_fwd(hidden, weight, bias, labels, temperature, softcap, need_lse, need_hidden_grad=False):
    """The forward op as (token_logps, state, [hidden_grad]): state = (row_max, row_log_sum), the recompute
    backward's input; hidden_grad only when asked for."""
    token, row_max, row_log_sum, hidden_grad = OPS.linear_logps_fwd(hidden, weight, bias, labels, IGNORE,
                                                                    temperature, softcap, need_lse, need_hidden_grad)
    return (token, (row_max, row_log_sum), hidden_grad) if need_hidden_grad else (token, (row_max, row_log_sum))


def _lin_bwd(hidden, weight, bias, labels, state, grad, temperature, softcap, *flags):
    return OPS.linear_logps_bwd(hidden, weight, bias, labels, *state, grad, IGNORE, temperature, softcap, *flags)


def _logits_fwd(logits, labels, temperature, need_lse):
    token, row_max, row_log_sum = OPS.logits_logps_fwd(logits, labels, IGNORE, temperature, need_lse)
    return token, (row_max, row_log_sum)


def _logits_bwd(logits, labels, state, grad, temperature):
    return OPS.logits_logps_bwd(logits, labels, *state, grad, IGNORE, temperature)


def _lse(state):
    return state[0] + state[1]


def test_ops_are_registered():
    for name in ("linear_logps_fwd", "linear_logps_bwd", "logits_logps_fwd", "logits_logps_bwd"):
        assert hasattr(OPS, name), name
    schema = str(OPS.linear_logps_fwd.default._schema)
    assert "Tensor? bias" in schema and "float softcap" in schema


# n, dim, vocab, temperature, softcap, bias: the larger cases span several row tiles (256 rows) and vocabulary
# blocks (2048 columns at 256 rows).
LINEAR_CASES = [
    pytest.param(37, 24, 301, 1.0, 0.0, False, id="small"),
    pytest.param(19, 16, 517, 0.7, 5.0, True, id="softcap-temp-bias"),
    pytest.param(300, 8, 4500, 1.3, 0.0, True, id="multi-tile"),
    pytest.param(290, 12, 2100, 0.9, 2.5, True, id="multi-tile-softcap"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
@pytest.mark.parametrize("n,dim,vocab,temperature,softcap,with_bias", LINEAR_CASES)
def test_linear_ops_match_float64(dtype, n, dim, vocab, temperature, softcap, with_bias):
    hidden, weight, bias, labels, grad = _linear_case(n, dim, vocab, dtype, seed=n + vocab, with_bias=with_bias)
    token, lse = _lin_fwd(hidden, weight, bias, labels, temperature, softcap, True)
    want_token, want_lse, want_grads = _oracle_linear(hidden, weight, bias, labels, grad, temperature,
                                                      softcap)
    scored = labels != IGNORE
    acc = torch.float64 if dtype == torch.float64 else torch.float32  # float64 in, float64 out
    assert token.dtype == acc and lse[0].dtype == acc and lse[1].dtype == acc
    assert torch.all(token[~scored] == 0) and torch.all(_lse(lse)[~scored] == 0)
    # bf16 (native or upcast): bf16 products accumulated and returned in float32, float32 accuracy
    _close("token_logps", token, want_token, acc)
    _close("lse", _lse(lse)[scored], want_lse[scored], acc)

    grads = _lin_bwd(hidden, weight, bias, labels, lse, grad, temperature, softcap, True,
                                 True, with_bias)
    for name, got, want, like in zip(("dhidden", "dweight", "dbias"), grads, want_grads, (hidden, weight, bias)):
        assert got.dtype == like.dtype and got.shape == like.shape, name
        _close(name, got, want, dtype)
    inactive = ~scored | (grad == 0)
    assert torch.all(grads[0][inactive] == 0), "ignored and zero-gradient rows must get exactly 0"


def test_fused_backward_with_grouped_vocabulary_blocks():
    """> 16 vocabulary blocks of 2048: the fused dH+dW pass puts several blocks in one group; all three backward
    passes (fused, dH only, dW/db only) agree with float64."""
    hidden, weight, bias, labels, grad = _linear_case(420, 8, 40_000, torch.float32, seed=21, ignored=0.1)
    token, lse = _lin_fwd(hidden, weight, bias, labels, 0.9, 0.0, True)
    _, _, (want_dh, want_dw, want_db) = _oracle_linear(hidden, weight, bias, labels, grad, 0.9, 0.0)
    fused = _lin_bwd(hidden, weight, bias, labels, lse, grad, 0.9, 0.0, True, True, True)
    (dh_only, _, _) = _lin_bwd(hidden, weight, bias, labels, lse, grad, 0.9, 0.0, True, False,
                                           False)
    (_, dw_only, db_only) = _lin_bwd(hidden, weight, bias, labels, lse, grad, 0.9, 0.0, False,
                                                 True, True)
    for name, got, want in [("fused dH", fused[0], want_dh), ("fused dW", fused[1], want_dw),
                            ("fused db", fused[2], want_db), ("dH", dh_only, want_dh), ("dW", dw_only, want_dw),
                            ("db", db_only, want_db)]:
        _close(name, got, want, torch.float32)


def test_linear_bwd_returns_empty_for_gradients_not_asked():
    hidden, weight, bias, labels, grad = _linear_case(9, 8, 40, torch.float32, seed=1)
    token, lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, False)
    assert lse[0].numel() == 0 and lse[1].numel() == 0
    _, lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, True)
    full = _lin_bwd(hidden, weight, bias, labels, lse, grad, 1.0, 0.0, True, True, True)
    for flags in [(True, False, False), (False, True, False), (False, False, True)]:
        got = _lin_bwd(hidden, weight, bias, labels, lse, grad, 1.0, 0.0, *flags)
        for wanted, g, f in zip(flags, got, full):
            if wanted:
                torch.testing.assert_close(g, f, rtol=1e-6, atol=1e-7)
            else:
                assert g.numel() == 0


def test_zero_gradient_rows_contribute_nothing():
    hidden, weight, bias, labels, grad = _linear_case(40, 16, 333, torch.float32, seed=2, ignored=0.0,
                                                      zero_grad=0.5)
    _, lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, True)
    dh, dw, db = _lin_bwd(hidden, weight, bias, labels, lse, grad, 1.0, 0.0, True, True, True)
    live = grad != 0
    assert torch.all(dh[~live] == 0)
    sub = [t[live] for t in (hidden, labels, *lse, grad)]
    _, sub_dw, sub_db = _lin_bwd(sub[0], weight, bias, sub[1], (sub[2], sub[3]), sub[4], 1.0, 0.0,
                                             False, True, True)
    torch.testing.assert_close(dw, sub_dw, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(db, sub_db, rtol=1e-5, atol=1e-6)
    nothing = _lin_bwd(hidden, weight, bias, labels, lse, torch.zeros_like(grad), 1.0, 0.0,
                                   True, True, True)
    assert all(torch.all(t == 0) for t in nothing)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64], ids=str)
def test_logits_ops_match_float64(dtype):
    gen = torch.Generator().manual_seed(5)
    n, vocab, temperature = 23, 9000, 0.8  # vocab spans several 4096-wide chunks
    wide = (torch.randn(n, vocab + 7, generator=gen) * 4).to(dtype)
    logits = wide[:, 3:vocab + 3]  # strided rows: read in place, never copied
    labels = torch.randint(0, vocab, (n,), generator=gen)
    labels[::4] = IGNORE
    grad = torch.randn(n, generator=gen)
    grad[1::5] = 0.0
    token, lse = _logits_fwd(logits, labels, temperature, True)
    z = (logits.detach().double() / temperature).requires_grad_()
    scored = labels != IGNORE
    want = torch.where(scored, z.log_softmax(-1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1), 0.0)
    _close("token_logps", token, want.detach(), torch.float32)
    _close("lse", _lse(lse)[scored], torch.logsumexp(z, -1).detach()[scored], torch.float32)
    (want_grad,) = torch.autograd.grad((want * grad.double()).sum(), z)
    dlogits = _logits_bwd(logits, labels, lse, grad, temperature)
    assert dlogits.dtype == dtype and dlogits.shape == logits.shape
    _close("dlogits", dlogits, want_grad / temperature, dtype)
    assert torch.all(dlogits[~scored | (grad == 0)] == 0)


def _linear_run(hidden, weight, bias, labels, grad):
    token, lse = _lin_fwd(hidden, weight, bias, labels, 0.9, 3.0, True)
    _, _, hidden_grad = _lin_fwd(hidden, weight, bias, labels, 0.9, 3.0, False, True)  # the frozen-head pass
    return (token, *lse, hidden_grad, *_lin_bwd(hidden, weight, bias, labels, lse, grad, 0.9, 3.0, True, True, True))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_bitwise_deterministic_across_runs_and_thread_counts(dtype):
    case = _linear_case(300, 32, 9000, dtype, seed=11)  # several work items in every pass
    logits = torch.randn(50, 5000).to(dtype)
    labels = torch.randint(0, 5000, (50,))
    grad = torch.randn(50)

    def logits_run():
        token, lse = _logits_fwd(logits, labels, 1.1, True)
        return token, *lse, _logits_bwd(logits, labels, lse, grad, 1.1)

    threads = torch.get_num_threads()
    try:
        results = []
        for count in (threads, threads, 1, max(2, threads)):
            torch.set_num_threads(count)
            results.append((*_linear_run(*case), *logits_run()))
    finally:
        torch.set_num_threads(threads)
    for other in results[1:]:
        for a, b in zip(results[0], other):
            assert torch.equal(a, b)


def test_inputs_that_require_grad_are_accepted():
    """The autograd wrapper calls the ops with leaf tensors that require grad; the kernels' inner ATen calls (also
    those made from worker threads) must not try to record them."""
    hidden, weight, bias, labels, grad = _linear_case(300, 16, 3000, torch.float32, seed=12)
    plain = _linear_run(hidden, weight, bias, labels, grad)
    leaves = [t.clone().requires_grad_() for t in (hidden, weight, bias)]
    with torch.enable_grad():
        tracked = _linear_run(leaves[0], leaves[1], leaves[2], labels, grad)
    for a, b in zip(plain, tracked):
        assert torch.equal(a, b.detach())


def test_strided_inputs_and_nan_rows():
    """Non-contiguous hidden/weight give the contiguous result; a NaN in a row makes that row NaN, no other."""
    hidden, weight, bias, labels, grad = _linear_case(40, 12, 700, torch.float32, seed=13, ignored=0.0,
                                                      zero_grad=0.0)
    strided_h = torch.stack([hidden, hidden], 2)[..., 0]
    strided_w = weight.T.contiguous().T
    assert not strided_h.is_contiguous() and not strided_w.is_contiguous()
    want = _linear_run(hidden, weight, bias, labels, grad)
    for a, b in zip(want, _linear_run(strided_h, strided_w, bias, labels, grad)):
        assert torch.equal(a, b)
    poisoned = hidden.clone()
    poisoned[5, 3] = float("nan")
    token, lse = _lin_fwd(poisoned, weight, bias, labels, 1.0, 0.0, True)
    assert torch.isnan(token[5]) and torch.isnan(_lse(lse)[5])
    assert torch.isfinite(token[torch.arange(40) != 5]).all()
    logits = torch.randn(3, 5000)
    logits[1, 4321] = float("nan")
    token, lse = _logits_fwd(logits, torch.tensor([0, 1, 2]), 1.0, True)
    assert torch.isnan(_lse(lse)[1]) and torch.isfinite(_lse(lse)[[0, 2]]).all()


def test_fake_kernels_give_shapes():
    with FakeTensorMode():
        hidden, weight = torch.empty(7, 5, dtype=torch.bfloat16), torch.empty(11, 5, dtype=torch.bfloat16)
        bias, labels = torch.empty(11, dtype=torch.bfloat16), torch.empty(7, dtype=torch.int64)
        token, lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, False)
        assert token.shape == (7,) and token.dtype == torch.float32 and lse[0].shape == (0,)
        _, _, hidden_grad = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, False, True)
        assert hidden_grad.shape == (7, 5) and hidden_grad.dtype == torch.float32
        rows = torch.empty(7)
        dh, dw, db = _lin_bwd(hidden, weight, bias, labels, (rows, rows), rows, 1.0, 0.0, True, False, True)
        assert dh.shape == (7, 5) and dh.dtype == torch.bfloat16 and dw.shape == (0,) and db.shape == (11,)
        logits = torch.empty(7, 11, dtype=torch.float16)
        token, lse = _logits_fwd(logits, labels, 1.0, True)
        assert lse[1].shape == (7,) and lse[1].dtype == torch.float32
        dlogits = _logits_bwd(logits, labels, (rows, rows), rows, 1.0)
        assert dlogits.shape == (7, 11) and dlogits.dtype == torch.float16


def test_opcheck():
    hidden, weight, bias, labels, grad = _linear_case(13, 8, 50, torch.float32, seed=3)
    _, lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, True)
    logits = torch.randn(13, 50)
    tests = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for flags in [(True, False), (False, True), (True, True)]:
        torch.library.opcheck(OPS.linear_logps_fwd, (hidden, weight, bias, labels, IGNORE, 0.8, 2.0, *flags),
                              test_utils=tests)
    torch.library.opcheck(OPS.linear_logps_fwd, (hidden.double(), weight.double(), None, labels, IGNORE, 1.0, 0.0,
                                                 True, True), test_utils=tests)
    torch.library.opcheck(OPS.linear_logps_bwd,
                          (hidden, weight, bias, labels, *lse, grad, IGNORE, 1.0, 0.0, True, True, True),
                          test_utils=tests)
    _, logits_state = _logits_fwd(logits, labels, 1.0, True)
    torch.library.opcheck(OPS.logits_logps_fwd, (logits, labels, IGNORE, 1.0, False), test_utils=tests)
    torch.library.opcheck(OPS.logits_logps_bwd, (logits, labels, *logits_state, grad, IGNORE, 1.0),
                          test_utils=tests)


def test_labels_out_of_range_never_read_memory():
    """With the Python value checks off, a bad label gives NaN for its row and no one-hot term, nothing else."""
    hidden, weight, bias, labels, grad = _linear_case(6, 8, 30, torch.float32, seed=4, ignored=0.0, zero_grad=0.0)
    bad = labels.clone()
    bad[1], bad[3], bad[4] = 30, -7, 2 ** 62
    token, lse = _lin_fwd(hidden, weight, bias, bad, 1.0, 0.0, True)
    good_token, good_lse = _lin_fwd(hidden, weight, bias, labels, 1.0, 0.0, True)
    is_bad = torch.tensor([False, True, False, True, True, False])
    assert torch.isnan(token[is_bad]).all() and torch.equal(token[~is_bad], good_token[~is_bad])
    assert torch.equal(lse[0], good_lse[0]) and torch.equal(lse[1], good_lse[1])
    dh, dw, db = _lin_bwd(hidden, weight, bias, bad, lse, grad, 1.0, 0.0, True, True, True)
    assert torch.isfinite(dh).all() and torch.isfinite(dw).all() and torch.isfinite(db).all()
    # A bad row's gradient is −softmax·g: its sum over the vocabulary is −g (no one-hot term was added).
    logits = torch.randn(6, 30)
    token, lse = _logits_fwd(logits, bad, 1.0, True)
    assert torch.isnan(token[is_bad]).all() and torch.isfinite(token[~is_bad]).all()
    dlogits = _logits_bwd(logits, bad, lse, grad, 1.0)
    torch.testing.assert_close(dlogits[is_bad].sum(1), -grad[is_bad])


def test_contract_violations_raise():
    hidden, weight, bias, labels, grad = _linear_case(5, 8, 20, torch.float32, seed=6)
    with pytest.raises(RuntimeError, match="weight must be"):
        _lin_fwd(hidden, weight[:, :7], bias, labels, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="labels must be int64"):
        _lin_fwd(hidden, weight, bias, labels.int(), 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="bias must be"):
        _lin_fwd(hidden, weight, bias[:-1], labels, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="weight dtype"):
        _lin_fwd(hidden, weight.double(), None, labels, 1.0, 0.0, False)
    with pytest.raises(RuntimeError, match="temperature"):
        _lin_fwd(hidden, weight, None, labels, 0.0, 0.0, False)
    with pytest.raises(RuntimeError, match="grad_rows must be"):
        _lin_bwd(hidden, weight, None, labels, (grad, grad), grad[:3], 1.0, 0.0, True, False, False)
    with pytest.raises(RuntimeError, match="need_bias"):
        _lin_bwd(hidden, weight, None, labels, (grad, grad), grad, 1.0, 0.0, False, False, True)
    with pytest.raises(RuntimeError, match="logits must be"):
        _logits_fwd(torch.randn(5, 0), labels, 1.0, False)
    with pytest.raises(RuntimeError, match="row_max must be Float"):
        _logits_bwd(torch.randn(5, 20), labels, (grad.double(), grad), grad, 1.0)


def _largest_allocation(fn) -> int:
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0)


def test_huge_vocabulary_in_bounded_memory():
    """V = 2^20 with a few rows: no allocation comes near the [N, V] float32 logits, results stay exact."""
    n, dim, vocab = 8, 4, 2 ** 20
    hidden, weight, bias, labels, grad = _linear_case(n, dim, vocab, torch.float32, seed=8, ignored=0.2,
                                                      zero_grad=0.0, with_bias=False)
    logits_bytes = n * vocab * 4
    out = {}
    peak_fwd = _largest_allocation(
        lambda: out.update(fwd=_lin_fwd(hidden, weight, None, labels, 1.0, 0.0, True)))
    token, lse = out["fwd"]
    peak_bwd = _largest_allocation(
        lambda: out.update(bwd=_lin_bwd(hidden, weight, None, labels, lse, grad, 1.0, 0.0,
                                                    True, False, False)))
    assert peak_fwd < logits_bytes / 8 and peak_bwd < logits_bytes / 8, (peak_fwd, peak_bwd, logits_bytes)
    want_token, _, (want_dh, _) = _oracle_linear(hidden, weight, None, labels, grad, 1.0, 0.0)
    _close("token_logps", token, want_token, torch.float32)
    _close("dhidden", out["bwd"][0], want_dh, torch.float32)


def test_backend_module_maps_empty_to_none():
    from fastpref.backends import load_kernels
    from fastpref.logps.contract import GradsWanted, LinearHead

    kernels = load_kernels("logps", "cpp")
    hidden, weight, bias, labels, grad = _linear_case(7, 8, 30, torch.float32, seed=9)
    head = LinearHead(hidden, weight, None, labels, IGNORE, 1.0, None)
    wanted = GradsWanted(hidden=False, weight=True, bias=False)
    token, state = kernels.linear_forward(head, wanted)
    dh, dw, db = kernels.linear_backward(head, state, grad, wanted)
    assert dh is None and db is None and dw.shape == weight.shape
    assert token.shape == (7,) and [t.shape for t in state] == [(7,), (7,)]
    capped = fastpref.linear_logps(hidden, weight, labels, backend="cpp", softcap=None, return_token_logps=True)
    torch.testing.assert_close(capped.token_logps, token)


# ---- Frozen head (issue 11 item 1), precision of p (issue 10 items 7, 8), bad labels (issue 10 item 4) ----

def _strict_rule(name, fast, eager, oracle):
    """Issue 10's rule: error ≤ 2 × the same-dtype eager error + 1e-6 relative to the oracle's magnitude."""
    fast, eager, oracle = fast.double(), eager.double(), oracle.double()
    err_fast = (fast - oracle).abs().max().item()
    err_eager = (eager - oracle).abs().max().item()
    bound = 2 * err_eager + 1e-6 * max(1.0, oracle.abs().max().item())
    assert err_fast <= bound, f"{name}: error {err_fast:.3g} > 2 × eager error {err_eager:.3g} + 1e-6 relative"


def _api_grads(hidden, weight, bias, labels, cu, gen, **kwargs):
    """Public cpp API, eager same-dtype and float64 oracle: outputs and dH for non-uniform upstream gradients on
    logps and token_logps."""
    from logps_checks import eager_linear_logps, upstream_grads

    from fastpref.logps import oracle as logps_oracle

    out = fastpref.linear_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu, return_token_logps=True,
                                backend="cpp", **kwargs)
    oracle = logps_oracle.linear_logps(hidden, weight, labels, bias=bias, cu_seqlens=cu, return_token_logps=True,
                                       **kwargs)
    eager = eager_linear_logps(hidden, weight, labels, bias, kwargs.get("softcap"), kwargs.get("temperature", 1.0),
                               None, cu)
    # Non-uniform, zeros included, and exact in float32 (the autograd wrapper hands the kernels float32 gradients).
    g_seq = torch.randint(-8, 9, out.logps.shape, generator=gen).double() / 4
    g_tok = torch.randint(-8, 9, labels.shape, generator=gen).double() / 4
    params = [p for p in (hidden, weight, bias) if p is not None and p.requires_grad]
    return [(out, oracle, eager)] + [upstream_grads(o, params, g_seq, g_tok) for o in (out, eager, oracle)]


FROZEN_CASES = [  # rows, D, V, softcap, temperature, bias, packed
    pytest.param(29, 24, 301, None, 1.0, False, False, id="small"),
    pytest.param(17, 16, 517, 5.0, 0.7, True, True, id="softcap-temp-bias-packed"),
    pytest.param(300, 12, 4500, 2.5, 0.9, True, False, id="multi-tile-softcap"),
    pytest.param(37, 8, 70_001, None, 1.3, False, True, id="many-segments"),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64], ids=str)
@pytest.mark.parametrize("rows,dim,vocab,softcap,temperature,with_bias,packed", FROZEN_CASES)
def test_frozen_head_matches_float64(dtype, rows, dim, vocab, softcap, temperature, with_bias, packed):
    """weight (and bias) frozen: dH comes from the forward's ∂log p/∂h, against the oracle under the error rule.
    Catches a wrong online rescaling (several vocabulary blocks and segments), a missing softcap or temperature
    factor, a wrong target term, and ignored rows that are not exactly 0."""
    from logps_checks import assert_within_eager

    gen = torch.Generator().manual_seed(rows * 7 + vocab)
    hidden = torch.randn(rows, dim, generator=gen).to(dtype).requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 3 * dim ** -0.5).to(dtype)
    bias = torch.randn(vocab, generator=gen).to(dtype) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.3] = IGNORE
    cu = torch.tensor([0, 0, rows // 3, rows // 3, rows]) if packed else None  # with empty sequences
    (out, oracle, eager), (fast_dh,), (eager_dh,), (oracle_dh,) = _api_grads(
        hidden, weight, bias, labels, cu, gen, softcap=softcap, temperature=temperature)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, dtype)
    assert fast_dh.dtype == dtype and fast_dh.shape == hidden.shape
    assert_within_eager("grad hidden", fast_dh, eager_dh, oracle_dh, dtype)
    assert torch.all(fast_dh[labels == IGNORE] == 0)


def test_frozen_head_backward_does_no_vocabulary_work():
    """The frozen head's backward only scales the saved ∂log p/∂h: no GEMM, no recompute op. Catches a fallback to
    the 4-GEMM recompute path."""
    hidden, weight, bias, labels, _ = _linear_case(64, 16, 3000, torch.float32, seed=31)
    hidden.requires_grad_()
    out = fastpref.linear_logps(hidden, weight, labels, bias=bias, backend="cpp")
    loss = (out.logps * torch.linspace(-1, 2, out.logps.numel())).sum()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        loss.backward()
    names = {e.name for e in prof.events()}
    assert not any(n in names for n in ("aten::mm", "aten::addmm", "fastpref::linear_logps_bwd")), names
    assert hidden.grad.abs().sum() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=str)
def test_single_entry_vocabulary_gives_exact_zero_gradients(dtype):
    """V = 1: log p = 0 and every gradient is exactly 0, however large the logit (issue 10 item 7: a rounded
    row log-sum-exp gave |dW| 1e-4). Trainable, frozen and logits paths."""
    gen = torch.Generator().manual_seed(41)
    hidden = (torch.randn(23, 8, generator=gen) * 40).to(dtype)
    weight = (torch.randn(1, 8, generator=gen) * 5).to(dtype)
    bias = torch.full((1,), 300.0, dtype=dtype)
    labels = torch.zeros(23, dtype=torch.int64)
    grad = torch.randn(23, generator=gen)
    for temperature, softcap in [(1.0, 0.0), (0.7, 0.0), (1.3, 200.0)]:
        token, state = _lin_fwd(hidden, weight, bias, labels, temperature, softcap, True)
        assert torch.all(token == 0)
        for got in _lin_bwd(hidden, weight, bias, labels, state, grad, temperature, softcap, True, True, True):
            assert torch.all(got == 0), got.abs().max()
        _, _, hidden_grad = _lin_fwd(hidden, weight, bias, labels, temperature, softcap, False, True)
        if softcap:  # (1 − tanh²) is formed in two places whose float contraction may differ by an ulp
            bound = 4 * torch.finfo(torch.float32).eps * weight.abs().max() / temperature
            assert hidden_grad.abs().max() <= bound, hidden_grad.abs().max()
        else:
            assert torch.all(hidden_grad == 0), hidden_grad.abs().max()
    h, w = hidden.clone().requires_grad_(), weight.clone().requires_grad_()  # and through the public API
    out = fastpref.linear_logps(h, w, labels, bias=bias, return_token_logps=True, backend="cpp")
    (out.token_logps * grad.to(dtype)).sum().backward()
    assert torch.all(w.grad == 0) and torch.all(h.grad == 0), (w.grad.abs().max(), h.grad.abs().max())
    logits = (torch.randn(23, 1, generator=gen) * 500).to(dtype)
    _, state = _logits_fwd(logits, labels, 0.9, True)
    assert torch.all(_logits_bwd(logits, labels, state, grad, 0.9) == 0)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_gradients_stay_accurate_at_large_logits(frozen):
    """|z| ≈ 550 in float32: p = exp((z − max) − log Σ) keeps the gradient within the strict rule; one rounded
    log-sum-exp per row (ulp 6e-5 at 550) shifted every p and made dH and dW many times worse than eager. The
    inputs are small multiples of powers of two, so the logits themselves are exact in float32 (eager's error is
    the softmax's alone)."""
    gen = torch.Generator().manual_seed(43)
    hidden = torch.randint(-3, 4, (40, 16), generator=gen).float().requires_grad_()
    weight = (torch.randint(-4, 5, (333, 16), generator=gen).float() / 8).requires_grad_(not frozen)
    bias = 550.0 + torch.randint(-16, 17, (333,), generator=gen).float() / 8
    labels = torch.randint(0, 333, (40,), generator=gen)
    (out, oracle, eager), fast, eager_g, oracle_g = _api_grads(hidden, weight, bias, labels, None, gen)
    _strict_rule("token_logps", out.token_logps, eager.token_logps, oracle.token_logps)
    for name, f, e, o in zip(("dH", "dW"), fast, eager_g, oracle_g):
        _strict_rule(name, f, e, o)


@pytest.mark.parametrize("softcap", [1e4, 300.0, 30.0, 1.0], ids=str)
def test_softcap_forward_and_gradient_accuracy(softcap):
    """z = c·tanh(a/c) stays accurate for large softcaps (a/c ≈ 0: (1 − e)/(1 + e) cancelled to 1e-4 absolute at
    c = 1e4) and for small ones (saturation): strict rule against eager float32, forward and both gradients."""
    gen = torch.Generator().manual_seed(int(softcap))
    hidden = torch.randn(50, 16, generator=gen).requires_grad_()
    weight = (torch.randn(1000, 16, generator=gen) * 2).requires_grad_()
    labels = torch.randint(0, 1000, (50,), generator=gen)
    (out, oracle, eager), fast, eager_g, oracle_g = _api_grads(hidden, weight, None, labels, None, gen,
                                                               softcap=softcap)
    _strict_rule("token_logps", out.token_logps, eager.token_logps, oracle.token_logps)
    for name, f, e, o in zip(("dH", "dW"), fast, eager_g, oracle_g):
        _strict_rule(name, f, e, o)


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_wild_labels_with_value_checks_skipped_never_crash(frozen):
    """skip_value_checks(): labels V + 10^7, −10^9 and the int64 extremes give a wrong number for their own row at
    most, never a crash or an out-of-bounds read; the other rows are unaffected."""
    hidden, weight, bias, labels, _ = _linear_case(12, 8, 300, torch.float32, seed=47, ignored=0.0)
    bad = labels.clone()
    bad[[1, 4, 7, 10]] = torch.tensor([300 + 10 ** 7, -10 ** 9, 2 ** 63 - 1, -2 ** 63])
    good = torch.ones(12, dtype=torch.bool)
    good[[1, 4, 7, 10]] = False
    outs = []
    for y in (bad, torch.where(good, labels, IGNORE)):
        h = hidden.clone().requires_grad_()
        w = weight.clone().requires_grad_(not frozen)
        with fastpref.skip_value_checks():
            out = fastpref.linear_logps(h, w, y, bias=bias, return_token_logps=True, backend="cpp")
        out.token_logps.sum().backward()
        outs.append((out.token_logps, h.grad, w.grad))
    torch.testing.assert_close(outs[0][0][good], outs[1][0][good])
    torch.testing.assert_close(outs[0][1][good], outs[1][1][good])
    assert torch.isfinite(outs[0][1]).all()
    logits = torch.randn(12, 300, requires_grad=True)
    with fastpref.skip_value_checks():
        out = fastpref.logits_logps(logits, bad, return_token_logps=True, backend="cpp")
    out.token_logps[good].sum().backward()
    assert torch.isfinite(out.token_logps[good]).all() and torch.isfinite(logits.grad).all()


def test_float64_in_float64_out():
    """float64 inputs give float64 log-probs computed in float64 (issue 10 item 6 for the cpp backend)."""
    hidden, weight, bias, labels, _ = _linear_case(9, 8, 50, torch.float64, seed=49)
    out = fastpref.linear_logps(hidden, weight, labels, bias=bias, return_token_logps=True, backend="cpp")
    from fastpref.logps import oracle as logps_oracle

    want = logps_oracle.linear_logps(hidden, weight, labels, bias=bias, return_token_logps=True)
    assert out.token_logps.dtype == torch.float64 and out.logps.dtype == torch.float64
    torch.testing.assert_close(out.token_logps, want.token_logps, rtol=1e-12, atol=1e-12)


def _cpu_has_avx512_bf16() -> bool:
    """Read from /proc/cpuinfo, independently of the extension's own detection (Linux only; False elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = {word for line in f if line.startswith("flags") for word in line.split()}
    except OSError:
        return False
    return {"avx512f", "avx512bw", "avx512vl", "avx512_bf16"} <= flags


NATIVE_BF16 = pytest.mark.skipif(not _cpu_has_avx512_bf16(), reason="no AVX-512 BF16: bf16 tiles are upcast")


@NATIVE_BF16
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_bf16_runs_native_gemms_where_supported(monkeypatch, frozen):
    """On a CPU with AVX-512 BF16, bf16 inputs run the native bf16 GEMMs by default (counted by the extension),
    forward and backward; FASTPREF_CPU_UPCAST_BF16=1 runs none (the upcast path) and gives other bits. Catches a
    detection or dispatch that silently falls back to the float32 upcast."""
    from fastpref import _C

    gen = torch.Generator().manual_seed(61)
    hidden = torch.randn(45, 24, generator=gen).bfloat16().requires_grad_()
    weight = torch.randn(333, 24, generator=gen).bfloat16().requires_grad_(not frozen)
    labels = torch.randint(0, 333, (45,), generator=gen)
    assert _C.bf16_gemm_supported()
    results = []
    for upcast in ("0", "1"):
        monkeypatch.setenv("FASTPREF_CPU_UPCAST_BF16", upcast)
        before = _C.bf16_gemm_calls()
        out = fastpref.linear_logps(hidden, weight, labels, backend="cpp", return_token_logps=True)
        after_forward = _C.bf16_gemm_calls()
        grads = torch.autograd.grad(out.token_logps.sum(), [hidden] if frozen else [hidden, weight])
        after_backward = _C.bf16_gemm_calls()
        if upcast == "0":
            assert after_forward > before, "forward: no native bf16 GEMM ran"
            assert after_backward > after_forward or frozen, "backward: no native bf16 GEMM ran"
        else:
            assert after_backward == before, "FASTPREF_CPU_UPCAST_BF16=1 still ran native bf16 GEMMs"
        results.append((out.token_logps, *grads))
    assert not all(torch.equal(x, y) for x, y in zip(*results))


NATIVE_CASES = [  # rows, D, V, softcap, temperature, bias
    pytest.param(1, 1, 1, None, 1.0, False, id="V=1"),
    pytest.param(13, 64, 5, None, 1.0, False, id="V=5-D=64"),
    pytest.param(37, 33, 301, 5.0, 0.7, True, id="odd-softcap-temp-bias"),
    pytest.param(300, 40, 5003, 20.0, 0.8, True, id="multi-tile"),
    pytest.param(261, 17, 2113, None, 1.3, False, id="odd-tiles"),
]


@NATIVE_BF16
@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
@pytest.mark.parametrize("rows,dim,vocab,softcap,temperature,with_bias", NATIVE_CASES)
def test_native_bf16_meets_error_rule(rows, dim, vocab, softcap, temperature, with_bias, frozen):
    """The native bf16 path (the default on this CPU) against the float64 oracle under the 2×eager rule: odd
    shapes, an empty and an all-ignored sequence, non-uniform upstream gradients, frozen and trainable heads,
    bias, softcap and temperature. Catches a wrong packing or tail of the bf16 GEMMs, a lost target term of the
    frozen head's Σ p·W, and a rounding that costs more than eager's own."""
    from logps_checks import assert_within_eager

    gen = torch.Generator().manual_seed(rows * 31 + vocab)
    hidden = torch.randn(rows, dim, generator=gen).bfloat16().requires_grad_()
    weight = (torch.randn(vocab, dim, generator=gen) * 3 * dim ** -0.5).bfloat16().requires_grad_(not frozen)
    bias = torch.randn(vocab, generator=gen).bfloat16().requires_grad_(not frozen) if with_bias else None
    labels = torch.randint(0, vocab, (rows,), generator=gen)
    cut = [0, rows // 3, rows // 3, (2 * rows) // 3, rows] if rows >= 3 else [0, rows, rows]
    labels[cut[-3]:cut[-2]] = IGNORE  # an all-ignored sequence (empty when it has no rows)
    labels[::5] = IGNORE
    cu = torch.tensor(cut)
    (out, oracle, eager), fast, eager_g, oracle_g = _api_grads(
        hidden, weight, bias, labels, cu, torch.Generator().manual_seed(rows), softcap=softcap,
        temperature=temperature)
    assert_within_eager("logps", out.logps, eager.logps, oracle.logps, torch.bfloat16)
    assert_within_eager("token_logps", out.token_logps, eager.token_logps, oracle.token_logps, torch.bfloat16)
    for name, f, e, o in zip(("dH", "dW", "db"), fast, eager_g, oracle_g):
        assert_within_eager(name, f, e, o, torch.bfloat16)
    ignored = labels == IGNORE
    assert (out.token_logps[ignored] == 0).all() and (fast[0][ignored] == 0).all()


@pytest.mark.parametrize("frozen", [False, True], ids=["trainable", "frozen"])
def test_torch_compile_fullgraph_traces_both_heads(monkeypatch, frozen):
    """torch.compile(fullgraph=True, aot_eager) through the cpp ops and their fake kernels, frozen (state:
    ∂log p/∂h) and trainable (state: row max and log-sum): no graph break, the same values and gradients."""
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    gen = torch.Generator().manual_seed(59)
    hidden = torch.randn(20, 16, generator=gen, requires_grad=True)
    weight = torch.randn(97, 16, generator=gen, requires_grad=not frozen)
    labels = torch.randint(0, 97, (20,), generator=gen)
    labels[:4] = IGNORE
    cu = torch.tensor([0, 7, 20])
    params = [hidden] if frozen else [hidden, weight]

    def step(hidden, weight, labels, cu):
        out = fastpref.linear_logps(hidden, weight, labels, cu_seqlens=cu, backend="cpp", return_token_logps=True)
        return out.logps.sum() * 2 + out.token_logps.pow(2).sum()

    eager_loss = step(hidden, weight, labels, cu)  # first: the backend module is imported outside the trace
    eager_grads = torch.autograd.grad(eager_loss, params)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(hidden, weight, labels, cu)
    grads = torch.autograd.grad(loss, params)
    torch.testing.assert_close(loss, eager_loss, rtol=0, atol=0)
    for got, want in zip(grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=0, atol=0)
