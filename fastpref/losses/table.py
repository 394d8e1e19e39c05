"""The preference-loss table: one small declarative entry per loss type.

Each entry is a function ℓ(terms, params) → [B] written with plain torch ops on the per-pair quantities of
:class:`PairTerms`; its docstring gives the formula and the paper. The "torch" backend evaluates these functions
(autograd gives their gradients); the compiled kernels (``csrc/preference_loss_cpu.cpp``,
``kernels/preference_loss.py``) implement the same formulas with hand-written derivatives and select them by
:attr:`LossDefinition.code`. The table also says what each type needs (inputs, label-smoothing range, whether an
offset, per-pair weights or an f-divergence apply, whether it is refined or reference-free), which
:mod:`fastpref.losses.inputs` enforces. The compiled kernels' layout comes from here too: loss codes (positions
in the table), :data:`F_DIVERGENCES` codes (positions), the order of the per-pair inputs (:data:`PAIR_SLOTS`) and
of the scalar settings (:data:`SCALARS`); the Triton kernel imports them, the C++ kernel reports its own through
``torch.ops.fastpref.preference_loss_layout`` and a test compares. The float64 oracle
(:mod:`fastpref.losses.oracle`) reads none of this.

Notation: r_w = chosen − ref_chosen, r_l = rejected − ref_rejected (log-ratios; ref = 0 when absent),
s_w = f(r_w), s_l = f(r_l) the f-divergence scores (f = identity for reverse_kl), h = r_w − r_l,
n_w, n_l the response token counts (clamped to ≥ 1), ε = label_smoothing, sp(x) = log(1 + eˣ) = −log σ(−x),
o = the per-pair offset (0 when absent), Δ the Sr-DPO refinement term (no gradient).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

Tensor = torch.Tensor

F_DIVERGENCES = ("reverse_kl", "forward_kl", "js_divergence", "alpha_divergence")  # code = position
REFINEMENTS = ("prompt", "naive")
# The compiled kernels' per-pair inputs [B], in this order (absent ones are None); "delta" is Δ (no gradient).
PAIR_SLOTS = ("chosen", "rejected", "ref_chosen", "ref_rejected", "chosen_counts", "rejected_counts", "delta",
              "tau", "offset", "weights")
# The compiled kernels' scalar settings, in this order (fields of LossParams, the divergence as its code).
SCALARS = ("beta", "label_smoothing", "refine_lambda", "simpo_gamma", "discopop_tau", "f_alpha_divergence_coef",
           "alpha_clamp")


@dataclass(frozen=True)
class LossParams:
    """The scalar settings of one call."""

    beta: float
    label_smoothing: float = 0.0
    refine_lambda: float = 0.5
    simpo_gamma: float = 0.5
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5
    alpha_clamp: float = 80.0  # TRL clamps (α−1)·r at 11 for float16 inputs, 80 otherwise

    @property
    def divergence_code(self) -> int:
        """Position in F_DIVERGENCES; alpha_divergence with |α − 1| < 1e-6 is the reverse KL (TRL)."""
        if self.f_divergence_type == "alpha_divergence" and abs(self.f_alpha_divergence_coef - 1.0) < 1e-6:
            return 0
        return F_DIVERGENCES.index(self.f_divergence_type)

    def scalars(self) -> list[float]:
        """The settings in the order of SCALARS."""
        return [float(getattr(self, name)) for name in SCALARS]


@dataclass
class PairTerms:
    """Per-pair quantities [B] shared by every loss type, in one dtype. Optional ones are None when absent;
    counts are the raw token counts (length-normalized types clamp them to ≥ 1, as TRL does)."""

    chosen: Tensor
    rejected: Tensor
    ref_chosen: Tensor
    ref_rejected: Tensor
    chosen_scores: Tensor
    rejected_scores: Tensor
    chosen_counts: Tensor | None
    rejected_counts: Tensor | None
    offset: Tensor
    tau: Tensor | None
    refinement: Tensor | None

    @property
    def chosen_logratios(self) -> Tensor:
        return self.chosen - self.ref_chosen

    @property
    def rejected_logratios(self) -> Tensor:
        return self.rejected - self.ref_rejected


def refinement_delta(beta: float, aug_chosen: Tensor, aug_rejected: Tensor, aug_ref_chosen: Tensor | None,
                     aug_ref_rejected: Tensor | None) -> Tensor:
    """Sr-DPO's refinement term (Yu et al. 2024, arXiv:2405.21040, eq. 12), without gradient:
    Δ = β·[(aug_w − aug_ref_w) − (aug_l − aug_ref_l)] (an absent reference counts 0), in float32 for 16/32-bit
    inputs, float64 for float64. refinement="naive" is the same formula on the plain log-probs: Δ = sg(βh)."""
    dtype = torch.float64 if aug_chosen.dtype == torch.float64 else torch.float32

    def ratio(policy: Tensor, ref: Tensor | None) -> Tensor:
        policy = policy.detach().to(dtype)
        return policy if ref is None else policy - ref.detach().to(dtype)

    return beta * (ratio(aug_chosen, aug_ref_chosen) - ratio(aug_rejected, aug_ref_rejected))


def f_divergence_score(logratio: Tensor, params: LossParams) -> Tensor:
    """TRL's f-divergence scores f'(t) at t = π/π_ref, written in r = log t (Wang et al. 2023, arXiv:2309.16240).

    reverse_kl: r;  forward_kl: 1 − e^(−r);  js_divergence: log 2 + log σ(r);
    alpha_divergence: (e^(min((α−1)·r, c)) − 1)/(α−1) (r itself when |α − 1| < 1e-6).
    """
    kind = params.f_divergence_type
    if kind == "reverse_kl":
        return logratio
    if kind == "forward_kl":
        return 1 - torch.exp(-logratio)
    if kind == "js_divergence":
        return math.log(2) + F.logsigmoid(logratio)
    alpha = params.f_alpha_divergence_coef
    if abs(alpha - 1.0) < 1e-6:
        return logratio
    exponent = torch.clamp((alpha - 1.0) * logratio, max=params.alpha_clamp)
    return (torch.exp(exponent) - 1.0) / (alpha - 1.0)


def _softplus(x: Tensor) -> Tensor:
    """sp(x) = log(1 + eˣ), exact in every range (F.softplus turns linear above x = 20)."""
    return torch.logaddexp(x, torch.zeros_like(x))


def _sigmoid(x: Tensor) -> Tensor:
    """σ(x) = e^(−sp(−x)): its autograd derivative σ(x)·σ(−x) stays exact in both tails (torch.sigmoid's,
    σ·(1 − σ), is 0 once σ rounds to 1)."""
    return torch.exp(-_softplus(-x))


def _smoothed(z: Tensor, eps: float) -> Tensor:
    """(1 − ε)·sp(−z) + ε·sp(z): the logistic loss with label smoothing ε."""
    return (1 - eps) * _softplus(-z) + eps * _softplus(z)


@dataclass(frozen=True)
class LossDefinition:
    """One loss type: its formula (``per_pair``) and what it needs.

    kind: "pair" (ℓ_i depends on pair i only), "sorted" (ℓ_i pairs the i-th smallest values of two batch-sorted
    quantities: aot), "batch" (one batch statistic for every pair: sft).
    smoothing: the valid label_smoothing interval (low, high, low_closed, high_closed), or None when the type
    ignores label_smoothing.
    """

    name: str
    code: int
    per_pair: Callable[[PairTerms, LossParams], Tensor]
    kind: str = "pair"
    requires: tuple[str, ...] = ()
    smoothing: tuple[float, float, bool, bool] | None = None
    takes_offset: bool = False
    f_divergence: bool = False
    refined: bool = False  # reads Δ: the aug_* log-probs (or refinement="naive")
    reference_free: bool = False  # reads no reference log-probs

    @property
    def formula(self) -> str:
        return (self.per_pair.__doc__ or "").strip()

    @property
    def takes_weights(self) -> bool:
        """Per-pair weights apply unless the loss sorts the batch (position i is then not pair i)."""
        return self.kind != "sorted"


LOSS_DEFINITIONS: dict[str, LossDefinition] = {}

_COUNTS = ("chosen_counts", "rejected_counts")
_AUG = ("aug_chosen_logps", "aug_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")


def loss(name: str, **spec) -> Callable:
    """Register the decorated formula as loss type `name`; its code is its position in the table."""

    def register(fn: Callable[[PairTerms, LossParams], Tensor]):
        LOSS_DEFINITIONS[name] = LossDefinition(name=name, code=len(LOSS_DEFINITIONS), per_pair=fn, **spec)
        return fn

    return register


def _score_logit(t: PairTerms, p: LossParams) -> Tensor:
    return p.beta * (t.chosen_scores - t.rejected_scores) - t.offset


def _per_token(value: Tensor, counts: Tensor) -> Tensor:
    return value / counts.clamp(min=1)


def _avg_score_margin(t: PairTerms) -> Tensor:
    return _per_token(t.chosen_scores, t.chosen_counts) - _per_token(t.rejected_scores, t.rejected_counts)


# ---- TRL 1.16's fifteen ------------------------------------------------------------------------------------


@loss("sigmoid", takes_offset=True, f_divergence=True)
def sigmoid(t: PairTerms, p: LossParams) -> Tensor:
    """DPO (Rafailov et al. 2023, arXiv:2305.18290): ℓ = −log σ(z), z = β·(s_w − s_l) − o."""
    return _softplus(-_score_logit(t, p))


@loss("hinge", takes_offset=True, f_divergence=True)
def hinge(t: PairTerms, p: LossParams) -> Tensor:
    """SLiC (Zhao et al. 2023, arXiv:2305.10425): ℓ = max(0, 1 − z), z = β·(s_w − s_l) − o."""
    return torch.relu(1 - _score_logit(t, p))


@loss("ipo", requires=_COUNTS, f_divergence=True)
def ipo(t: PairTerms, p: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036), TRL's length-normalized form: ℓ = (s_w/n_w − s_l/n_l − 1/(2β))²."""
    return (_avg_score_margin(t) - 1 / (2 * p.beta)) ** 2


@loss("sigmoid_norm", requires=_COUNTS, takes_offset=True, f_divergence=True)
def sigmoid_norm(t: PairTerms, p: LossParams) -> Tensor:
    """Length-normalized DPO (TRL): ℓ = −log σ(z), z = β·(s_w/n_w − s_l/n_l) − o."""
    return _softplus(-(p.beta * _avg_score_margin(t) - t.offset))


@loss("robust", smoothing=(0.0, 0.5, True, False), takes_offset=True, f_divergence=True)
def robust(t: PairTerms, p: LossParams) -> Tensor:
    """Robust DPO (Chowdhury et al. 2024, arXiv:2403.00409): ℓ = ((1 − ε)·sp(−z) − ε·sp(z)) / (1 − 2ε),
    z = β·(s_w − s_l) − o."""
    z = _score_logit(t, p)
    eps = p.label_smoothing
    return _softplus(-z) - eps / (1 - 2 * eps) * z  # the same, as sp(z) = sp(−z) + z: no terms ~1/(1 − 2ε) cancel


@loss("exo_pair", smoothing=(0.0, 1.0, False, False), takes_offset=True, f_divergence=True)
def exo_pair(t: PairTerms, p: LossParams) -> Tensor:
    """EXO (Ji et al. 2024, arXiv:2402.00856, eq. 16): ℓ = σ(z)·(log σ(z) − log(1 − ε)) + σ(−z)·(log σ(−z) − log ε),
    z = β·(s_w − s_l) − o."""
    z = _score_logit(t, p)
    eps = p.label_smoothing
    return (_sigmoid(z) * (F.logsigmoid(z) - math.log1p(-eps))
            + _sigmoid(-z) * (F.logsigmoid(-z) - math.log(eps)))


@loss("nca_pair")
def nca_pair(t: PairTerms, p: LossParams) -> Tensor:
    """NCA (Chen et al. 2024, arXiv:2402.05369): ℓ = sp(−βr_w) + ½·sp(βr_w) + ½·sp(βr_l)."""
    a, b = p.beta * t.chosen_logratios, p.beta * t.rejected_logratios
    return _softplus(-a) + 0.5 * _softplus(a) + 0.5 * _softplus(b)


@loss("bco_pair")
def bco_pair(t: PairTerms, p: LossParams) -> Tensor:
    """BCO, paired form as in TRL 1.16 (Jung et al. 2024, arXiv:2404.04656; no running reward mean):
    ℓ = sp(−βr_w) + sp(βr_l)."""
    return _softplus(-p.beta * t.chosen_logratios) + _softplus(p.beta * t.rejected_logratios)


@loss("sppo_hard")
def sppo_hard(t: PairTerms, p: LossParams) -> Tensor:
    """SPPO, hard-label form (Wu et al. 2024, arXiv:2405.00675): ℓ = (r_w − 1/(2β))² + (r_l + 1/(2β))²."""
    return (t.chosen_logratios - 0.5 / p.beta) ** 2 + (t.rejected_logratios + 0.5 / p.beta) ** 2


@loss("aot", kind="sorted", smoothing=(0.0, 1.0, True, True))
def aot(t: PairTerms, p: LossParams) -> Tensor:
    """AOT, paired (Melnyk et al. 2024, arXiv:2406.05882): z_i = β·(sort(π_w − π_l)_i − sort(ref_w − ref_l)_i),
    ℓ_i = (1 − ε)·sp(−z_i) + ε·sp(z_i) (i is the sorted position, not the pair; sorts are stable: tied values keep
    pair order, which fixes the subgradient at ties)."""
    policy = torch.sort(t.chosen - t.rejected, stable=True).values
    reference = torch.sort(t.ref_chosen - t.ref_rejected, stable=True).values
    return _smoothed(p.beta * (policy - reference), p.label_smoothing)


@loss("aot_unpaired", kind="sorted", smoothing=(0.0, 1.0, True, True))
def aot_unpaired(t: PairTerms, p: LossParams) -> Tensor:
    """AOT, unpaired (Melnyk et al. 2024, arXiv:2406.05882): z_i = β·(sort(r_w)_i − sort(r_l)_i),
    ℓ_i = (1 − ε)·sp(−z_i) + ε·sp(z_i)."""
    chosen = torch.sort(t.chosen_logratios, stable=True).values
    rejected = torch.sort(t.rejected_logratios, stable=True).values
    return _smoothed(p.beta * (chosen - rejected), p.label_smoothing)


@loss("apo_zero")
def apo_zero(t: PairTerms, p: LossParams) -> Tensor:
    """APO-zero (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 7): ℓ = 1 − σ(βr_w) + σ(βr_l)
    (1 − σ(x) evaluated as σ(−x))."""
    return _sigmoid(-p.beta * t.chosen_logratios) + _sigmoid(p.beta * t.rejected_logratios)


@loss("apo_down")
def apo_down(t: PairTerms, p: LossParams) -> Tensor:
    """APO-down (D'Oosterlinck et al. 2024, arXiv:2408.06266, eq. 8): ℓ = σ(βr_w) + 1 − σ(β·(r_w − r_l))
    (1 − σ(x) evaluated as σ(−x))."""
    a, b = p.beta * t.chosen_logratios, p.beta * t.rejected_logratios
    return _sigmoid(a) + _sigmoid(b - a)


@loss("discopop", takes_offset=True, f_divergence=True)
def discopop(t: PairTerms, p: LossParams) -> Tensor:
    """DiscoPOP / LRML (Chris Lu et al. 2024, arXiv:2406.08414, eq. 5): z = β·(s_w − s_l) − o, m = σ(z/τ_d),
    ℓ = (1 − m)·sp(−z) + m·e^(−z)  (τ_d = discopop_tau; 1 − m as σ(−z/τ_d), m·e^(−z) as e^(log σ(z/τ_d) − z))."""
    z = _score_logit(t, p)
    return _sigmoid(-z / p.discopop_tau) * _softplus(-z) + torch.exp(F.logsigmoid(z / p.discopop_tau) - z)


@loss("sft", kind="batch", requires=("chosen_counts",), f_divergence=True, reference_free=True)
def sft(t: PairTerms, p: LossParams) -> Tensor:
    """SFT term of RPO (Pang et al. 2024, arXiv:2404.19733), TRL's batch token mean:
    ℓ_i = −Σ_j chosen_j / Σ_j n_w,j for every pair i."""
    value = -t.chosen.sum() / t.chosen_counts.sum()
    return value.expand_as(t.chosen)


# ---- beyond TRL --------------------------------------------------------------------------------------------


@loss("cdpo", smoothing=(0.0, 1.0, True, True), takes_offset=True, f_divergence=True)
def cdpo(t: PairTerms, p: LossParams) -> Tensor:
    """Conservative DPO (Mitchell 2023, "A note on DPO with noisy preferences"): ℓ = −(1 − ε)·log σ(z) − ε·log σ(−z),
    z = β·(s_w − s_l) − o."""
    return _smoothed(_score_logit(t, p), p.label_smoothing)


@loss("simpo", requires=_COUNTS, smoothing=(0.0, 1.0, True, True), takes_offset=True, reference_free=True)
def simpo(t: PairTerms, p: LossParams) -> Tensor:
    """SimPO (Meng et al. 2024, arXiv:2405.14734), reference-free: z = β·(π_w/n_w − π_l/n_l) − γ − o,
    ℓ = −(1 − ε)·log σ(z) − ε·log σ(−z)  (γ = simpo_gamma, absolute as in TRL's CPO)."""
    z = p.beta * (_per_token(t.chosen, t.chosen_counts) - _per_token(t.rejected, t.rejected_counts))
    z = z - p.simpo_gamma - t.offset
    return _smoothed(z, p.label_smoothing)


@loss("odpo", requires=("offset",), takes_offset=True, f_divergence=True)
def odpo(t: PairTerms, p: LossParams) -> Tensor:
    """ODPO (Amini et al. 2024, arXiv:2402.10571): ℓ = −log σ(β·(s_w − s_l) − o); o = α·log(score_w − score_l)
    is required (helper :func:`fastpref.losses.odpo_offset`)."""
    return _softplus(-_score_logit(t, p))


@loss("rdpo", requires=("tau",), takes_offset=True, f_divergence=True)
def rdpo(t: PairTerms, p: LossParams) -> Tensor:
    """rDPO soft-label DPO (Gallego 2024, arXiv:2402.08005): ℓ = −τ·log σ(z) − (1 − τ)·log σ(−z),
    z = β·(s_w − s_l) − o, τ ∈ [0, 1] per pair (helper :func:`fastpref.losses.bt_tau`); ∂ℓ/∂z = σ(z) − τ."""
    z = _score_logit(t, p)
    return t.tau * _softplus(-z) + (1 - t.tau) * _softplus(z)


@loss("sr_dpo", requires=_AUG, takes_offset=True, refined=True)
def sr_dpo(t: PairTerms, p: LossParams) -> Tensor:
    """Sr-DPO (Yu et al. 2024, arXiv:2405.21040, eq. 12): ℓ = −log σ(βh − λΔ − o), λ = refine_lambda,
    Δ = β·[(aug_w − aug_ref_w) − (aug_l − aug_ref_l)] without gradient (refinement="naive": Δ = sg(βh))."""
    h = t.chosen_logratios - t.rejected_logratios
    return _softplus(-(p.beta * h - p.refine_lambda * t.refinement - t.offset))


@loss("sr_ipo", requires=_AUG, refined=True)
def sr_ipo(t: PairTerms, p: LossParams) -> Tensor:
    """Sr-IPO (Yu et al. 2024, arXiv:2405.21040, Alg. 2): ℓ = (h − λΔ − 1/(2β))², Δ as in sr_dpo (sums, not
    averages)."""
    h = t.chosen_logratios - t.rejected_logratios
    return (h - p.refine_lambda * t.refinement - 1 / (2 * p.beta)) ** 2


# The odds-ratio types clamp the mean token log-prob m to ≤ this value: log(1 − eᵐ) is −∞ at m = 0 (an empty or
# all-ignored response); above the clamp the gradient is 0.
MAX_MEAN_LOGP = -1e-6


def _log_odds(logps: Tensor, counts: Tensor) -> Tensor:
    """log odds(y) = m − log(1 − eᵐ), m = min(logps/n, MAX_MEAN_LOGP), with log(1 − eᵐ) as log(−expm1(m))."""
    mean = _per_token(logps, counts).clamp(max=MAX_MEAN_LOGP)
    return mean - torch.log(-torch.expm1(mean))


@loss("orpo", requires=_COUNTS, reference_free=True)
def orpo(t: PairTerms, p: LossParams) -> Tensor:
    """ORPO's odds-ratio term (Hong et al. 2024, arXiv:2403.07691, eq. 6–7; TRL's ORPO): ℓ = −β·log σ(L_w − L_l),
    L = m − log(1 − eᵐ) the log odds, m = π/n the mean token log-prob (clamped to ≤ MAX_MEAN_LOGP). The full ORPO
    loss is loss_type=["sft", "orpo"]."""
    return p.beta * _softplus(-(_log_odds(t.chosen, t.chosen_counts) - _log_odds(t.rejected, t.rejected_counts)))


@loss("asft", requires=_COUNTS, reference_free=True)
def asft(t: PairTerms, p: LossParams) -> Tensor:
    """ASFT's pointwise odds term (Wang et al. 2024, arXiv:2409.10571) with the β of Gorbatovski et al. 2025
    ("The Differences Between Direct Alignment Algorithms are a Blur", arXiv:2502.01237):
    ℓ = −log σ(β·L_w) − log σ(−β·L_l), L the log odds as in orpo (β = 1 is the original ASFT; add "sft")."""
    return (_softplus(-p.beta * _log_odds(t.chosen, t.chosen_counts))
            + _softplus(p.beta * _log_odds(t.rejected, t.rejected_counts)))


@loss("ipo_sum", f_divergence=True)
def ipo_sum(t: PairTerms, p: LossParams) -> Tensor:
    """IPO (Azar et al. 2023, arXiv:2310.12036, eq. 17), the paper's unnormalized form: ℓ = (s_w − s_l − 1/(2β))²
    (= (h − 1/(2β))² for reverse_kl)."""
    return (t.chosen_scores - t.rejected_scores - 1 / (2 * p.beta)) ** 2


LOSS_TYPES: tuple[str, ...] = tuple(LOSS_DEFINITIONS)
LOSS_CODES: dict[str, int] = {name: d.code for name, d in LOSS_DEFINITIONS.items()}
REFINED_LOSS_TYPES: frozenset[str] = frozenset(n for n, d in LOSS_DEFINITIONS.items() if d.refined)
REFERENCE_FREE_LOSS_TYPES: frozenset[str] = frozenset(n for n, d in LOSS_DEFINITIONS.items() if d.reference_free)
TRL_LOSS_TYPES: tuple[str, ...] = (
    "sigmoid", "hinge", "ipo", "sigmoid_norm", "robust", "exo_pair", "nca_pair", "bco_pair", "sppo_hard", "aot",
    "aot_unpaired", "apo_zero", "apo_down", "discopop", "sft",
)
