"""fastpref.linear_preference_loss: the kept-logits path (3 GEMMs) against the float64 oracles (full logits,
log_softmax, fastpref.losses.oracle), the composed linear_logps + preference_loss path, and its refusals."""

from __future__ import annotations

import pytest
import torch

from fastpref import _ext
from fastpref.logps import oracle as logps_oracle
from fastpref.losses import oracle as loss_oracle
from fastpref.losses.linear_loss import (KEPT_MAX_VOCAB, KEPT_MIN_CHUNK_ROWS, chunk_rows, kept_path_wins,
                                         linear_preference_loss)
from logps_checks import assert_within_eager

pytestmark = pytest.mark.skipif(_ext.extension() is None, reason="needs the cpp extension")

# sequence lengths (chosen first): an empty chosen sequence (pair 1) and an all-ignored rejected one (pair 3)
LENGTHS = (7, 0, 11, 5, 9, 13, 6, 4, 8, 3)
ALL_IGNORED = 8  # sequence index: rejected of pair 3
VOCAB, DIM = 37, 19


def _case(dtype, seed, bias=False):
    gen = torch.Generator().manual_seed(seed)
    cu = torch.tensor([0, *torch.tensor(LENGTHS).cumsum(0).tolist()], dtype=torch.int64)
    rows = int(cu[-1])
    hidden = torch.randn(rows, DIM, generator=gen).to(dtype)
    weight = (torch.randn(VOCAB, DIM, generator=gen) * 0.6).to(dtype)
    labels = torch.randint(0, VOCAB, (rows,), generator=gen)
    labels[torch.rand(rows, generator=gen) < 0.2] = -100
    labels[cu[ALL_IGNORED]:cu[ALL_IGNORED + 1]] = -100
    pairs = len(LENGTHS) // 2
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    refs = [(-5 * torch.rand(pairs, generator=gen) - 1).to(acc) for _ in range(2)]
    b = (torch.randn(VOCAB, generator=gen) * 0.3).to(dtype) if bias else None
    return hidden, weight, b, labels, cu, refs


def _budget(pairs_per_chunk: int) -> int:
    """A budget holding about this many pairs of LENGTHS: several chunks, the last one partial."""
    return pairs_per_chunk * 20 * VOCAB * 4  # the longest pair has 20 rows


def _token_weights(labels, seed):
    return 0.5 + torch.rand(labels.shape, generator=torch.Generator().manual_seed(seed))


def _reference(hidden, weight, bias, labels, cu, refs, dtype, head, loss):
    """(loss, losses, chosen logps, dH, dW, db) of the oracles, evaluated in `dtype` from leaves cast to it."""
    leaves = [t.detach().to(dtype).requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    h, w, *rest = leaves
    if dtype == torch.float64:
        out = logps_oracle.linear_logps(h, w, labels, bias=rest[0] if rest else None, cu_seqlens=cu,
                                        **head)
        logps, counts = out.logps, out.counts
    else:  # plain eager in the inputs' dtype: full logits, log_softmax, gather
        z = h @ w.T + (rest[0] if rest else 0)
        if head.get("softcap") is not None:
            z = head["softcap"] * torch.tanh(z / head["softcap"])
        z = z / head.get("temperature", 1.0)
        scored = labels != -100
        token = torch.log_softmax(z, -1).gather(1, labels.clamp(min=0)[:, None]).squeeze(1) * scored
        if head.get("token_weights") is not None:
            token = token * head["token_weights"].to(dtype)
        seq = torch.repeat_interleave(torch.arange(len(cu) - 1), cu.diff())
        logps = torch.zeros(len(cu) - 1, dtype=dtype).index_add(0, seq, token)
        counts = torch.zeros(len(cu) - 1, dtype=torch.int64).index_add(0, seq, scored.long())
    pairs = logps.shape[0] // 2
    loss_dtype = torch.float64 if dtype == torch.float64 else torch.float32
    res = loss_oracle.preference_loss(logps[:pairs], logps[pairs:], refs[0], refs[1], chosen_counts=counts[:pairs],
                                      rejected_counts=counts[pairs:], dtype=loss_dtype, **loss)
    grads = torch.autograd.grad(res.loss, leaves)
    return (res.loss, res.losses, logps[:pairs], *grads)


def _kept(hidden, weight, bias, labels, cu, refs, head, loss, budget, scale=1.0):
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight) + ((bias,) if bias is not None else ())]
    out = linear_preference_loss(leaves[0], leaves[1], labels, refs[0], refs[1], cu_seqlens=cu,
                                 bias=leaves[2] if bias is not None else None, memory_budget=budget, path="kept",
                                 **head, **loss)
    (out.loss * scale).backward()
    return (out.loss, out.losses, out.chosen_logps, *(t.grad.double() / scale for t in leaves))


CASES = [
    (torch.float32, {}, {"loss_type": "sigmoid", "beta": 0.3}, False),
    (torch.float32, {"softcap": 3.0, "temperature": 0.7}, {"loss_type": "ipo", "beta": 0.2}, True),
    (torch.bfloat16, {}, {"loss_type": ["sigmoid", "simpo"], "loss_weights": [0.5, 1.5], "beta": 0.4}, True),
    (torch.float16, {"temperature": 1.3}, {"loss_type": "robust", "label_smoothing": 0.1}, False),
    (torch.float64, {"softcap": 2.5}, {"loss_type": "sigmoid_norm", "beta": 0.5}, True),
]


@pytest.mark.parametrize("dtype,head,loss,bias", CASES)
@pytest.mark.parametrize("weighted", [False, True])
def test_kept_within_twice_eager_error(dtype, head, loss, bias, weighted):
    hidden, weight, b, labels, cu, refs = _case(dtype, seed=len(str(loss)) + 7 * weighted, bias=bias)
    if weighted:  # LD-DPO style per-row weights
        head = dict(head, token_weights=_token_weights(labels, 4))
    fast = _kept(hidden, weight, b, labels, cu, refs, head, loss, _budget(2), scale=-0.37)
    truth = _reference(hidden, weight, b, labels, cu, refs, torch.float64, head, loss)
    eager = _reference(hidden, weight, b, labels, cu, refs, dtype, head, loss)
    for name, f, e, t in zip(("loss", "losses", "chosen_logps", "dH", "dW", "db"), fast, eager, truth):
        assert_within_eager(name, f, e, t, dtype)
    assert fast[3][cu[ALL_IGNORED]:cu[ALL_IGNORED + 1]].abs().max() == 0  # all-ignored rows: no gradient


@pytest.mark.parametrize("budget_pairs", [1, 3, 100])
def test_kept_equals_composed(budget_pairs):
    hidden, weight, b, labels, cu, refs = _case(torch.float32, seed=5, bias=True)
    head, loss = {"softcap": 4.0}, {"loss_type": "sigmoid", "beta": 0.25}
    kept = _kept(hidden, weight, b, labels, cu, refs, head, loss, _budget(budget_pairs))
    leaves = [t.detach().clone().requires_grad_() for t in (hidden, weight, b)]
    out = linear_preference_loss(leaves[0], leaves[1], labels, refs[0], refs[1], cu_seqlens=cu, bias=leaves[2],
                                 path="composed", backend="cpp", **head, **loss)
    out.loss.backward()
    for name, k, c in zip(("loss", "losses", "chosen_logps", "dH", "dW", "db"), kept,
                          (out.loss, out.losses, out.chosen_logps, *(t.grad for t in leaves))):
        torch.testing.assert_close(k.double(), c.double(), rtol=2e-5, atol=1e-6, msg=name)


def test_kept_bits_independent_of_threads():
    hidden, weight, b, labels, cu, refs = _case(torch.float32, seed=9, bias=True)
    args = (hidden, weight, b, labels, cu, refs, {}, {"loss_type": "hinge"}, _budget(2))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = _kept(*args)
        torch.set_num_threads(2)
        two = _kept(*args)
    finally:
        torch.set_num_threads(threads)
    for a, c in zip(one, two):
        assert torch.equal(a, c)


def test_kept_traces_fullgraph():
    hidden, weight, b, labels, cu, refs = _case(torch.float32, seed=3)

    def step(h, w):
        return linear_preference_loss(h, w, labels, refs[0], refs[1], cu_seqlens=cu, memory_budget=_budget(2),
                                      path="kept").loss

    leaves = [t.clone().requires_grad_() for t in (hidden, weight)]
    torch.compile(step, fullgraph=True, backend="aot_eager")(*leaves).backward()
    eager = _kept(hidden, weight, None, labels, cu, refs, {}, {}, _budget(2))
    for got, want in zip((leaves[0].grad.double(), leaves[1].grad.double()), eager[3:5]):
        torch.testing.assert_close(got, want, rtol=0, atol=0)  # aot_eager runs the same kernels


def test_auto_rule_follows_chunk_rows():
    budget = 64 << 20
    assert chunk_rows(64, 151936, budget) == 64 and chunk_rows(256, 32000, budget) == 512
    assert kept_path_wins(2048, 8, 32000, budget)  # 2 pairs of 256 rows per chunk
    assert not kept_path_wins(512, 8, 151936, budget)  # one 64-row pair per chunk
    assert not kept_path_wins(512, 8, 151936, 256 << 20)  # 384 rows per chunk, but V = 151936
    assert not kept_path_wins(10_000, 1, 32000, budget)  # not even one pair fits
    pair_rows = KEPT_MIN_CHUNK_ROWS // 2
    assert kept_path_wins(pair_rows * 8, 8, KEPT_MAX_VOCAB, 2 * pair_rows * KEPT_MAX_VOCAB * 4)
    assert not kept_path_wins(pair_rows * 8, 8, KEPT_MAX_VOCAB, 2 * pair_rows * KEPT_MAX_VOCAB * 4 - 1)
    assert not kept_path_wins(pair_rows * 8, 8, KEPT_MAX_VOCAB + 1, 1 << 40)
    # native bf16 GEMMs make the composed path the faster one for half-precision inputs
    assert kept_path_wins(2048, 8, 32000, budget, torch.float64)
    assert not kept_path_wins(2048, 8, 32000, budget, torch.bfloat16)
    assert not kept_path_wins(2048, 8, 32000, budget, torch.float16)


@pytest.mark.parametrize("kwargs,match", [
    ({"loss_type": "aot", "path": "kept"}, "aot"),
    ({"loss_type": ["sigmoid", "sft"], "path": "kept"}, "sft"),
    ({"path": "sideways"}, "path"),
    ({"memory_budget": 0}, "memory_budget"),
    ({"memory_budget": 1000, "path": "kept"}, "memory_budget"),
])
def test_bad_arguments_raise_naming_them(kwargs, match):
    hidden, weight, _, labels, cu, refs = _case(torch.float32, seed=1)
    with pytest.raises(ValueError, match=match):
        linear_preference_loss(hidden.requires_grad_(), weight.requires_grad_(), labels, refs[0], refs[1],
                               cu_seqlens=cu, **kwargs)


def test_odd_sequence_count_raises():
    hidden, weight, _, labels, cu, refs = _case(torch.float32, seed=1)
    with pytest.raises(ValueError, match="cu_seqlens"):
        linear_preference_loss(hidden[:int(cu[-2])], weight, labels[:int(cu[-2])], cu_seqlens=cu[:-1])


def test_padded_input_and_no_grad_match_composed():
    gen = torch.Generator().manual_seed(21)
    hidden = torch.randn(6, 5, DIM, generator=gen)  # [2B, T, D]: 3 pairs
    weight = torch.randn(VOCAB, DIM, generator=gen) * 0.6
    labels = torch.randint(0, VOCAB, (6, 5), generator=gen)
    labels[:, :2] = -100
    labels[4] = -100  # an all-ignored rejected response
    kwargs = dict(loss_type="simpo", beta=2.0, memory_budget=2 * 10 * VOCAB * 4)
    with torch.no_grad():
        kept = linear_preference_loss(hidden, weight, labels, path="kept", **kwargs)
    composed = linear_preference_loss(hidden, weight, labels, path="composed", backend="cpp", **kwargs)
    for k, c in zip(kept, composed):
        torch.testing.assert_close(k, c, rtol=2e-6, atol=1e-6)


def test_opcheck_kept_op():
    hidden, weight, _, labels, cu, refs = _case(torch.float32, seed=2)
    op = torch.ops.fastpref.kept_preference_loss
    args = (hidden.requires_grad_(), weight.requires_grad_(), None, labels, cu, None, refs[0], refs[1], None, None,
            None, "sigmoid", [], [0.1, 0.0, 0.5, 0.05, 0.5], "reverse_kl", -100, 1.0, 0.0, _budget(2), True)
    torch.library.opcheck(op, args)
