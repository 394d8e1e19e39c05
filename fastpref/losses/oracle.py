"""Float64 ground truth of :func:`fastpref.preference_loss`, written independently of the op it checks.

Every loss type is written out here by hand from DESIGN.md and TRL 1.16's ``DPOTrainer._compute_loss``; nothing
is read from the loss table, and neither the argument checks nor any backend is called (give it valid inputs).
The formulas run in ``dtype`` (float64 by default) with plain PyTorch ops, and autograd gives the gradients (Δ
detached). The tests also run it in the inputs' own precision (``dtype=torch.float32``) as the "plain PyTorch in
the same dtype" baseline of their error rule. σ is written exp(log σ(x)) and 1 − σ(x) as σ(−x): the same values,
with derivatives that stay exact in the tails, so the float64 truth is exact there too. aot's sorts are stable
(tied values keep pair order, as in every backend), which fixes its subgradient at ties.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpref.losses.output import PreferenceLossOutput

Tensor = torch.Tensor


def _sig(x: Tensor) -> Tensor:
    return torch.exp(F.logsigmoid(x))


@dataclass
class _Batch:
    """One call's inputs in the working dtype: π (policy), ref (reference), r = π − ref, s = f(r)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    score_chosen: Tensor
    score_rejected: Tensor
    n_chosen: Tensor | None
    n_rejected: Tensor | None
    counts_chosen: Tensor | None
    offset: Tensor
    tau: Tensor | None
    delta: Tensor | None
    beta: float
    eps: float
    lam: float
    gamma: float
    discopop_tau: float

    @property
    def ratio_chosen(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def ratio_rejected(self) -> Tensor:
        return self.rejected - self.ref_rejected

    @property
    def logits(self) -> Tensor:
        """β·(s_w − s_l) − o, the logit of the sigmoid-family types."""
        return self.beta * (self.score_chosen - self.score_rejected) - self.offset


def _smoothed(z: Tensor, eps: float) -> Tensor:
    return -(1 - eps) * F.logsigmoid(z) - eps * F.logsigmoid(-z)


def _sigmoid(b: _Batch) -> Tensor:
    return -F.logsigmoid(b.logits)


def _hinge(b: _Batch) -> Tensor:
    return torch.relu(1 - b.logits)


def _ipo(b: _Batch) -> Tensor:
    margin = b.score_chosen / b.n_chosen - b.score_rejected / b.n_rejected
    return (margin - 1 / (2 * b.beta)) ** 2


def _sigmoid_norm(b: _Batch) -> Tensor:
    margin = b.score_chosen / b.n_chosen - b.score_rejected / b.n_rejected
    return -F.logsigmoid(b.beta * margin - b.offset)


def _robust(b: _Batch) -> Tensor:
    z = b.logits
    return (-(1 - b.eps) * F.logsigmoid(z) + b.eps * F.logsigmoid(-z)) / (1 - 2 * b.eps)


def _exo_pair(b: _Batch) -> Tensor:
    z = b.logits
    return (_sig(z) * (F.logsigmoid(z) - math.log1p(-b.eps))
            + _sig(-z) * (F.logsigmoid(-z) - math.log(b.eps)))


def _nca_pair(b: _Batch) -> Tensor:
    chosen, rejected = b.beta * b.ratio_chosen, b.beta * b.ratio_rejected
    return -F.logsigmoid(chosen) - 0.5 * F.logsigmoid(-chosen) - 0.5 * F.logsigmoid(-rejected)


def _bco_pair(b: _Batch) -> Tensor:
    return -F.logsigmoid(b.beta * b.ratio_chosen) - F.logsigmoid(-b.beta * b.ratio_rejected)


def _sppo_hard(b: _Batch) -> Tensor:
    return (b.ratio_chosen - 0.5 / b.beta) ** 2 + (b.ratio_rejected + 0.5 / b.beta) ** 2


def _aot(b: _Batch) -> Tensor:
    policy = torch.sort(b.chosen - b.rejected, stable=True).values
    reference = torch.sort(b.ref_chosen - b.ref_rejected, stable=True).values
    return _smoothed(b.beta * (policy - reference), b.eps)


def _aot_unpaired(b: _Batch) -> Tensor:
    gap = torch.sort(b.ratio_chosen, stable=True).values - torch.sort(b.ratio_rejected, stable=True).values
    return _smoothed(b.beta * gap, b.eps)


def _apo_zero(b: _Batch) -> Tensor:
    return _sig(-b.beta * b.ratio_chosen) + _sig(b.beta * b.ratio_rejected)  # 1 − σ(βr_w) + σ(βr_l)


def _apo_down(b: _Batch) -> Tensor:
    chosen, rejected = b.beta * b.ratio_chosen, b.beta * b.ratio_rejected
    return _sig(chosen) + _sig(-(chosen - rejected))  # σ(βr_w) + 1 − σ(β(r_w − r_l))


def _discopop(b: _Batch) -> Tensor:
    z = b.logits
    keep = _sig(-z / b.discopop_tau)  # 1 − σ(z/τ)
    return -F.logsigmoid(z) * keep + torch.exp(F.logsigmoid(z / b.discopop_tau) - z)  # + σ(z/τ)·e^(−z)


def _sft(b: _Batch) -> Tensor:
    return (-b.chosen.sum() / b.counts_chosen.sum()).expand_as(b.chosen)


def _cdpo(b: _Batch) -> Tensor:
    return _smoothed(b.logits, b.eps)


def _simpo(b: _Batch) -> Tensor:
    z = b.beta * (b.chosen / b.n_chosen - b.rejected / b.n_rejected) - b.gamma - b.offset
    return _smoothed(z, b.eps)


def _rdpo(b: _Batch) -> Tensor:
    z = b.logits
    return -b.tau * F.logsigmoid(z) - (1 - b.tau) * F.logsigmoid(-z)


def _sr_dpo(b: _Batch) -> Tensor:
    h = b.ratio_chosen - b.ratio_rejected
    return -F.logsigmoid(b.beta * h - b.lam * b.delta - b.offset)


def _sr_ipo(b: _Batch) -> Tensor:
    h = b.ratio_chosen - b.ratio_rejected
    return (h - b.lam * b.delta - 1 / (2 * b.beta)) ** 2


def _odds(logps: Tensor, n: Tensor) -> Tensor:
    """log(p/(1 − p)) of the mean token probability p = e^m, m = logps/n capped at −1e-6 (m = 0 would be +∞)."""
    m = torch.clamp(logps / n, max=-1e-6)
    return m - torch.log(1 - torch.exp(m))


def _orpo(b: _Batch) -> Tensor:
    return -b.beta * F.logsigmoid(_odds(b.chosen, b.n_chosen) - _odds(b.rejected, b.n_rejected))


def _asft(b: _Batch) -> Tensor:
    return -F.logsigmoid(b.beta * _odds(b.chosen, b.n_chosen)) - F.logsigmoid(-b.beta * _odds(b.rejected, b.n_rejected))


def _ipo_sum(b: _Batch) -> Tensor:
    return (b.score_chosen - b.score_rejected - 1 / (2 * b.beta)) ** 2


FORMULAS = {
    "sigmoid": _sigmoid, "hinge": _hinge, "ipo": _ipo, "sigmoid_norm": _sigmoid_norm, "robust": _robust,
    "exo_pair": _exo_pair, "nca_pair": _nca_pair, "bco_pair": _bco_pair, "sppo_hard": _sppo_hard, "aot": _aot,
    "aot_unpaired": _aot_unpaired, "apo_zero": _apo_zero, "apo_down": _apo_down, "discopop": _discopop,
    "sft": _sft, "cdpo": _cdpo, "simpo": _simpo, "odpo": _sigmoid, "rdpo": _rdpo, "sr_dpo": _sr_dpo,
    "sr_ipo": _sr_ipo, "orpo": _orpo, "asft": _asft, "ipo_sum": _ipo_sum,
}


def _score(ratio: Tensor, kind: str, alpha: float, clamp: float) -> Tensor:
    """TRL's f-divergence scores f'(π/π_ref) written in r = log(π/π_ref)."""
    if kind == "forward_kl":
        return 1 - torch.exp(-ratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(ratio)
    if kind == "alpha_divergence" and abs(alpha - 1.0) >= 1e-6:
        return (torch.exp(torch.clamp((alpha - 1.0) * ratio, max=clamp)) - 1.0) / (alpha - 1.0)
    return ratio


def preference_loss(chosen_logps, rejected_logps, ref_chosen_logps=None, ref_rejected_logps=None, *,
                    loss_type="sigmoid", beta=0.1, loss_weights=None, label_smoothing=0.0, chosen_counts=None,
                    rejected_counts=None, aug_chosen_logps=None, aug_rejected_logps=None, aug_ref_chosen_logps=None,
                    aug_ref_rejected_logps=None, refine_lambda=0.5, tau=None, offset=None, weights=None,
                    simpo_gamma=0.5, discopop_tau=0.05, f_divergence_type="reverse_kl", f_alpha_divergence_coef=0.5,
                    refinement="prompt", dtype=torch.float64) -> PreferenceLossOutput:
    """The arguments of :func:`fastpref.preference_loss` (valid ones), evaluated in `dtype`; outputs in `dtype`."""
    def cast(x):
        return None if x is None else x.to(dtype)

    chosen, rejected = cast(chosen_logps), cast(rejected_logps)
    zeros = torch.zeros_like(chosen)
    ref_chosen = zeros if ref_chosen_logps is None else cast(ref_chosen_logps)
    ref_rejected = zeros if ref_rejected_logps is None else cast(ref_rejected_logps)
    clamp = 11.0 if chosen_logps.dtype == torch.float16 else 80.0  # TRL's clamp of (α − 1)·r
    names = [loss_type] if isinstance(loss_type, str) else list(loss_type)
    if refinement == "naive":  # Δ_naive: the plain implicit reward margin, no gradient
        delta = beta * ((chosen - ref_chosen) - (rejected - ref_rejected))
    elif aug_chosen_logps is not None:
        delta = beta * ((cast(aug_chosen_logps) - cast(aug_ref_chosen_logps))
                        - (cast(aug_rejected_logps) - cast(aug_ref_rejected_logps)))
    else:
        delta = None
    batch = _Batch(
        chosen=chosen, rejected=rejected, ref_chosen=ref_chosen, ref_rejected=ref_rejected,
        score_chosen=_score(chosen - ref_chosen, f_divergence_type, f_alpha_divergence_coef, clamp),
        score_rejected=_score(rejected - ref_rejected, f_divergence_type, f_alpha_divergence_coef, clamp),
        n_chosen=None if chosen_counts is None else cast(chosen_counts).clamp(min=1),
        n_rejected=None if rejected_counts is None else cast(rejected_counts).clamp(min=1),
        counts_chosen=cast(chosen_counts), offset=zeros if offset is None else cast(offset), tau=cast(tau),
        delta=None if delta is None else delta.detach(), beta=beta, eps=label_smoothing, lam=refine_lambda,
        gamma=simpo_gamma, discopop_tau=discopop_tau)
    losses = torch.zeros_like(chosen)
    for name, weight in zip(names, loss_weights or [1.0] * len(names)):
        losses = losses + weight * FORMULAS[name](batch)
    if weights is not None:
        losses = losses * cast(weights)
    chosen_rewards = (beta * (chosen - ref_chosen)).detach()
    rejected_rewards = (beta * (rejected - ref_rejected)).detach()
    return PreferenceLossOutput(loss=losses.mean(), losses=losses, chosen_rewards=chosen_rewards,
                                rejected_rewards=rejected_rewards, margins=chosen_rewards - rejected_rewards)
