"""fastpref.listwise_loss against the loop oracle, DPO's sigmoid at K = 2, ties, masks, gradients, compile."""

import pytest
import torch

import fastpref
from fastpref.losses.listwise_oracle import listwise_loss_reference

TYPES = ("plackett_luce", "lambda_rank")


def _inputs(batch, k, dtype=torch.float64, seed=0):
    gen = torch.Generator().manual_seed(seed)
    policy = (-torch.rand(batch, k, generator=gen, dtype=torch.float64) * 30 - 1).to(dtype).requires_grad_()
    ref = (-torch.rand(batch, k, generator=gen, dtype=torch.float64) * 30 - 1).to(dtype)
    scores = torch.randint(0, 5, (batch, k), generator=gen).double() + torch.rand(batch, k, generator=gen).round()
    return policy, ref, scores


@pytest.mark.parametrize("loss_type", TYPES)
@pytest.mark.parametrize("with_ref", [True, False])
def test_matches_loop_oracle_with_ragged_mask(loss_type, with_ref):
    policy, ref, scores = _inputs(7, 5)
    ref = ref if with_ref else None
    mask = torch.rand(7, 5, generator=torch.Generator().manual_seed(3)) > 0.3
    mask[0] = False
    mask[1] = torch.tensor([False, False, True, False, False])
    out = fastpref.listwise_loss(policy, ref, scores, loss_type, beta=0.3, mask=mask)
    loss, losses = listwise_loss_reference(policy, ref, scores, loss_type, 0.3, mask)
    torch.testing.assert_close(out.losses, losses, rtol=1e-12, atol=1e-12)
    assert out.loss.dtype == torch.float64 and out.losses[:2].abs().max() == 0
    upstream = torch.linspace(0.5, 2.0, 7, dtype=torch.float64)
    grad, = torch.autograd.grad((out.losses * upstream).sum(), policy)
    expected, = torch.autograd.grad((losses * upstream).sum(), policy)
    torch.testing.assert_close(grad, expected, rtol=1e-10, atol=1e-12)
    assert grad[~mask].abs().max() == 0


@pytest.mark.parametrize("loss_type", TYPES)
def test_k2_equals_sigmoid_dpo(loss_type):
    policy, ref, scores = _inputs(9, 2, seed=1)
    scores[:, 0] = torch.where(scores[:, 0] == scores[:, 1], scores[:, 0] + 1, scores[:, 0])
    out = fastpref.listwise_loss(policy, ref, scores, loss_type, beta=0.2)
    first_wins = scores[:, 0] > scores[:, 1]
    chosen = torch.where(first_wins, policy[:, 0], policy[:, 1])
    rejected = torch.where(first_wins, policy[:, 1], policy[:, 0])
    ref_chosen = torch.where(first_wins, ref[:, 0], ref[:, 1])
    ref_rejected = torch.where(first_wins, ref[:, 1], ref[:, 0])
    dpo = fastpref.preference_loss(chosen, rejected, ref_chosen, ref_rejected, loss_type="sigmoid", beta=0.2,
                                   backend="torch")
    torch.testing.assert_close(out.losses, dpo.losses, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(torch.autograd.grad(out.loss, policy)[0], torch.autograd.grad(dpo.loss, policy)[0])


def test_ties():
    policy = torch.tensor([[-1.0, -3.0, -2.0]], dtype=torch.float64)
    tied = torch.tensor([[1.0, 1.0, 1.0]], dtype=torch.float64)
    assert fastpref.listwise_loss(policy, None, tied, "lambda_rank", beta=1.0).loss == 0
    # Plackett-Luce orders ties by column: the same value as scores that strictly decrease.
    strict = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    torch.testing.assert_close(fastpref.listwise_loss(policy, None, tied, "plackett_luce", beta=1.0).loss,
                               fastpref.listwise_loss(policy, None, strict, "plackett_luce", beta=1.0).loss)
    # lambda_rank: the tied pair (columns 0, 1) adds nothing, so only the pairs with column 2 count.
    partial = torch.tensor([[2.0, 2.0, 1.0]], dtype=torch.float64)
    loss = fastpref.listwise_loss(policy, None, partial, "lambda_rank", beta=1.0).loss
    torch.testing.assert_close(loss, listwise_loss_reference(policy, None, partial, "lambda_rank", 1.0)[1][0])


def test_lambda_rank_is_shift_invariant_in_scores():
    policy, ref, scores = _inputs(4, 6, seed=2)
    a = fastpref.listwise_loss(policy, ref, scores, "lambda_rank").losses
    b = fastpref.listwise_loss(policy, ref, scores + 40.0, "lambda_rank").losses
    torch.testing.assert_close(a, b)


@pytest.mark.parametrize("loss_type", TYPES)
def test_gradcheck(loss_type):
    policy, ref, scores = _inputs(3, 4, seed=4)
    scores = torch.tensor([[3.0, 1.0, 2.0, 0.0], [1.0, 1.0, 0.0, 2.0], [0.0, 4.0, 1.0, 2.0]], dtype=torch.float64)
    mask = torch.tensor([[True, True, True, True], [True, False, True, True], [True, True, False, False]])
    ref = ref.requires_grad_()
    assert torch.autograd.gradcheck(
        lambda p, r: fastpref.listwise_loss(p, r, scores, loss_type, beta=0.5, mask=mask).losses,
        (policy.detach().requires_grad_(), ref))


@pytest.mark.parametrize("loss_type", TYPES)
def test_float32_out_for_float32_in(loss_type):
    policy, ref, scores = _inputs(3, 4, dtype=torch.float32)
    out = fastpref.listwise_loss(policy, ref, scores, loss_type)
    assert out.loss.dtype == out.losses.dtype == out.rewards.dtype == torch.float32


def test_empty_batch():
    out = fastpref.listwise_loss(torch.zeros(0, 3), None, torch.zeros(0, 3), "plackett_luce")
    assert out.loss == 0 and out.losses.shape == (0,)


@pytest.mark.parametrize("kwargs, name", [
    (dict(policy_logps=torch.zeros(3)), "policy_logps"),
    (dict(ref_logps=torch.zeros(2, 4)), "ref_logps"),
    (dict(scores=torch.zeros(2, 2)), "scores"),
    (dict(mask=torch.ones(2, 3)), "mask"),
    (dict(loss_type="sigmoid"), "loss_type"),
    (dict(beta=0.0), "beta"),
    (dict(policy_logps=torch.tensor([[0.0, float("nan"), 0.0], [0.0, 0.0, 0.0]])), "policy_logps"),
    (dict(scores=torch.tensor([[0.0, float("inf"), 0.0], [0.0, 0.0, 0.0]])), "scores"),
])
def test_bad_input_names_argument(kwargs, name):
    args = dict(policy_logps=torch.zeros(2, 3), ref_logps=None, scores=torch.zeros(2, 3), loss_type="lambda_rank",
                beta=0.1, mask=None)
    args.update(kwargs)
    with pytest.raises(ValueError, match=name):
        fastpref.listwise_loss(**args)


def test_absent_entries_may_hold_nan():
    policy = torch.tensor([[-1.0, float("nan"), -2.0]], dtype=torch.float64, requires_grad=True)
    mask = torch.tensor([[True, False, True]])
    out = fastpref.listwise_loss(policy, None, torch.tensor([[1.0, 5.0, 0.0]]), "plackett_luce", mask=mask)
    out.loss.backward()
    assert torch.isfinite(out.loss) and torch.isfinite(policy.grad).all()


@pytest.mark.parametrize("loss_type", TYPES)
def test_traces_fullgraph(loss_type):
    policy, ref, scores = _inputs(3, 4, dtype=torch.float32)
    mask = torch.tensor([[True, True, False, True]] * 3)
    compiled = torch.compile(lambda p, r, s, m: fastpref.listwise_loss(p, r, s, loss_type, 0.1, m).loss,
                             fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(policy, ref, scores, mask),
                               fastpref.listwise_loss(policy, ref, scores, loss_type, 0.1, mask).loss)
