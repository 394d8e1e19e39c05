"""The odds-ratio types (orpo, asft) and ipo_sum: TRL's experimental ORPO, hand-written float64 formulas, the
m → 0⁻ edge (an empty or near-certain response) on every backend."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from conftest import available_backends

import fastpref
from fastpref.losses import oracle as loss_oracle

trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")

BACKENDS = available_backends()
NUM_PAIRS = 11


def _case(seed: int, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    counts_w = torch.randint(1, 60, (NUM_PAIRS,), generator=gen)
    counts_l = torch.randint(1, 60, (NUM_PAIRS,), generator=gen)
    mean_w = -3 * torch.rand(NUM_PAIRS, generator=gen, dtype=torch.float64) - 1e-3
    mean_l = -3 * torch.rand(NUM_PAIRS, generator=gen, dtype=torch.float64) - 1e-3
    chosen = (mean_w * counts_w).to(dtype).requires_grad_()
    rejected = (mean_l * counts_l).to(dtype).requires_grad_()
    return chosen, rejected, counts_w, counts_l


@pytest.mark.parametrize("beta", [0.1, 1.7])
def test_orpo_matches_trl(beta):
    """TRL's ORPOTrainer.odds_ratio_loss takes mean token log-probs and returns β·log σ(log odds ratio), which its
    loss subtracts: fastpref's per-pair orpo loss is its negative, with the same gradient."""
    chosen, rejected, n_w, n_l = _case(3)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    trl_losses = -trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen / n_w, rejected / n_l)[0]
    up = torch.linspace(0.3, 1.9, NUM_PAIRS, dtype=torch.float64)
    want = torch.autograd.grad((trl_losses * up).sum(), (chosen, rejected))
    for backend in BACKENDS + ["oracle"]:
        if backend == "triton":
            continue  # float32 only: checked against the oracle in test_losses.py
        op = loss_oracle.preference_loss if backend == "oracle" else fastpref.preference_loss
        extra = {} if backend == "oracle" else {"backend": backend}
        out = op(chosen, rejected, loss_type="orpo", beta=beta, chosen_counts=n_w, rejected_counts=n_l, **extra)
        torch.testing.assert_close(out.losses, trl_losses.to(out.losses.dtype), rtol=1e-6, atol=1e-9)
        got = torch.autograd.grad((out.losses * up).sum(), (chosen, rejected))
        for g, w in zip(got, want):
            torch.testing.assert_close(g, w, rtol=1e-6, atol=1e-9)


def test_written_out():
    """orpo, asft and ipo_sum against their formulas written out here (float64)."""
    chosen, rejected, n_w, n_l = _case(5)
    ref_w, ref_l = chosen.detach() + 0.7, rejected.detach() - 0.4
    beta = 0.3
    ls = torch.nn.functional.logsigmoid
    odds_w = chosen / n_w - torch.log1p(-torch.exp(chosen / n_w))
    odds_l = rejected / n_l - torch.log1p(-torch.exp(rejected / n_l))
    h = (chosen - ref_w) - (rejected - ref_l)
    expected = {"orpo": -beta * ls(odds_w - odds_l), "asft": -ls(beta * odds_w) - ls(-beta * odds_l),
                "ipo_sum": (h - 1 / (2 * beta)) ** 2}
    for name, want in expected.items():
        got = loss_oracle.preference_loss(chosen, rejected, ref_w, ref_l, loss_type=name, beta=beta,
                                          chosen_counts=n_w, rejected_counts=n_l)
        torch.testing.assert_close(got.losses, want, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["orpo", "asft"])
def test_mean_logp_near_zero(backend, loss_type):
    """m = 0 (an empty response: log-prob 0, count 0) and m just below 0 give finite losses and gradients that
    match the oracle; log(1 − eᵐ) as log1p(−eᵐ) or without the cap is −∞ there."""
    chosen = torch.tensor([0.0, -1e-7, -3e-5, -2.0, -1e-3], requires_grad=True)
    rejected = torch.tensor([-4.0, 0.0, -1e-4, -8e-6, -30.0], requires_grad=True)
    n_w, n_l = torch.tensor([0, 1, 2, 5, 1]), torch.tensor([3, 0, 1, 1, 7])
    out = fastpref.preference_loss(chosen, rejected, loss_type=loss_type, beta=0.5, chosen_counts=n_w,
                                   rejected_counts=n_l, backend=backend)
    want = loss_oracle.preference_loss(chosen, rejected, loss_type=loss_type, beta=0.5, chosen_counts=n_w,
                                       rejected_counts=n_l)
    assert torch.isfinite(out.losses).all()
    torch.testing.assert_close(out.losses.double(), want.losses, rtol=1e-4, atol=1e-5)
    got = torch.autograd.grad(out.loss, (chosen, rejected))
    ref = torch.autograd.grad(want.loss, (chosen, rejected))
    for g, w in zip(got, ref):
        assert torch.isfinite(g).all()
        torch.testing.assert_close(g.double(), w.double(), rtol=1e-3, atol=1e-3)


def test_ipo_sum_is_ipo_at_unit_counts():
    """With every count 1 the length-normalized ipo is the paper's unnormalized ipo_sum."""
    chosen, rejected, _, _ = _case(7)
    ones = torch.ones(NUM_PAIRS)
    a = fastpref.preference_loss(chosen, rejected, chosen + 1, rejected - 2, loss_type="ipo_sum", beta=0.2)
    b = fastpref.preference_loss(chosen, rejected, chosen + 1, rejected - 2, loss_type="ipo", beta=0.2,
                                 chosen_counts=ones, rejected_counts=ones)
    torch.testing.assert_close(a.losses, b.losses)
