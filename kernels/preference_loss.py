"""Triton kernel of :func:`fastpref.preference_loss` (the "triton" backend), shipped as
``fastpref.kernels.preference_loss``.

One program walks the B pairs in blocks of ``BLOCK``. Forward (``BACKWARD=False``) writes the per-pair losses
Σ_k w_k·weights_i·ℓ_k,i, their mean, and TRL's detached rewards β·r_w, β·r_l and margins. Backward
(``BACKWARD=True``) recomputes the same per-pair terms and writes ∂L/∂chosen, ∂L/∂rejected, ∂L/∂ref_chosen,
∂L/∂ref_rejected for the upstream gradient G_i = ∂L/∂loss / B + ∂L/∂losses_i. The loss types of a call are the
compile-time tuple ``CODES``; each expands into its own straight-line code, nothing else is compiled in. Batch
statistics (sft's token mean) take one extra sweep in the same program; the aot types get their batch already
sorted (values and each pair's rank) from ``fastpref/losses/fused.py`` and only gather.

The layout comes from the loss table (``fastpref/losses/table.py``): loss codes, f-divergence codes and the
per-pair slots (``PRESENT`` says which are given) are imported from it. Formulas and papers: the table's
docstrings. Notation: r_w = chosen − ref_chosen, r_l = rejected − ref_rejected, s = f(r) (f-divergence score),
n the token counts (clamped to ≥ 1), o the offset, Δ the Sr-DPO refinement (an input, no gradient). Arithmetic in
float32 in forms that do not cancel (σ(−z), never 1 − σ(z)); the coefficients derived from the settings
(``settings``, see :data:`SETTINGS`) are computed in float64 by the caller.
"""

from __future__ import annotations

import triton
import triton.language as tl

from fastpref.losses.table import F_DIVERGENCES, LOSS_CODES, PAIR_SLOTS
from fastpref.losses.table import MAX_MEAN_LOGP as MAX_MEAN_LOGP_VALUE

SIGMOID = tl.constexpr(LOSS_CODES["sigmoid"])
HINGE = tl.constexpr(LOSS_CODES["hinge"])
IPO = tl.constexpr(LOSS_CODES["ipo"])
SIGMOID_NORM = tl.constexpr(LOSS_CODES["sigmoid_norm"])
ROBUST = tl.constexpr(LOSS_CODES["robust"])
EXO_PAIR = tl.constexpr(LOSS_CODES["exo_pair"])
NCA_PAIR = tl.constexpr(LOSS_CODES["nca_pair"])
BCO_PAIR = tl.constexpr(LOSS_CODES["bco_pair"])
SPPO_HARD = tl.constexpr(LOSS_CODES["sppo_hard"])
AOT = tl.constexpr(LOSS_CODES["aot"])
AOT_UNPAIRED = tl.constexpr(LOSS_CODES["aot_unpaired"])
APO_ZERO = tl.constexpr(LOSS_CODES["apo_zero"])
APO_DOWN = tl.constexpr(LOSS_CODES["apo_down"])
DISCOPOP = tl.constexpr(LOSS_CODES["discopop"])
SFT = tl.constexpr(LOSS_CODES["sft"])
CDPO = tl.constexpr(LOSS_CODES["cdpo"])
SIMPO = tl.constexpr(LOSS_CODES["simpo"])
RDPO = tl.constexpr(LOSS_CODES["rdpo"])
SR_DPO = tl.constexpr(LOSS_CODES["sr_dpo"])
SR_IPO = tl.constexpr(LOSS_CODES["sr_ipo"])
ORPO = tl.constexpr(LOSS_CODES["orpo"])
ASFT = tl.constexpr(LOSS_CODES["asft"])
IPO_SUM = tl.constexpr(LOSS_CODES["ipo_sum"])
MAX_MEAN_LOGP = tl.constexpr(MAX_MEAN_LOGP_VALUE)

FORWARD_KL = tl.constexpr(F_DIVERGENCES.index("forward_kl"))
JS_DIVERGENCE = tl.constexpr(F_DIVERGENCES.index("js_divergence"))
ALPHA_DIVERGENCE = tl.constexpr(F_DIVERGENCES.index("alpha_divergence"))

# positions of the per-pair slots in PRESENT (and of their pointers in the kernel's argument list)
REF_CHOSEN = tl.constexpr(PAIR_SLOTS.index("ref_chosen"))
CHOSEN_COUNTS = tl.constexpr(PAIR_SLOTS.index("chosen_counts"))
DELTA = tl.constexpr(PAIR_SLOTS.index("delta"))
TAU = tl.constexpr(PAIR_SLOTS.index("tau"))
OFFSET = tl.constexpr(PAIR_SLOTS.index("offset"))
WEIGHTS = tl.constexpr(PAIR_SLOTS.index("weights"))

# The kernel's `settings` tuple, in this order: β, λ, γ (simpo), α and its clamp (alpha divergence), 1 − ε and ε
# (cdpo, simpo, aot), ε/(1 − 2ε) (robust), log(1 − ε) and log ε (exo_pair), 1/(2β), 1/τ_d.
SETTINGS = ("beta", "refine_lambda", "simpo_gamma", "alpha", "alpha_clamp", "keep", "flip", "robust_slope",
            "exo_keep", "exo_flip", "ipo_target", "inv_discopop_tau")


@triton.jit
def _log1p(u):
    """log(1 + u) accurate for small u in float32 (Goldberg's correction of log(1 + u))."""
    w = 1.0 + u
    exact = w == 1.0
    return tl.where(exact, u, tl.log(w) * (u / tl.where(exact, 1.0, w - 1.0)))


@triton.jit
def _sigmoid(x):
    """σ(x) computed from e^(−|x|), so no intermediate overflows."""
    e = tl.exp(-tl.abs(x))
    return tl.where(x >= 0, 1.0 / (1.0 + e), e / (1.0 + e))


@triton.jit
def _softplus(x):
    """sp(x) = log(1 + eˣ) without overflow."""
    return tl.maximum(x, 0.0) + _log1p(tl.exp(-tl.abs(x)))


@triton.jit
def _score(r, DIVERGENCE: tl.constexpr, alpha, alpha_clamp):
    """TRL's f-divergence score s = f(r) and ds/dr: reverse_kl r; forward_kl 1 − e^(−r); js log 2 + log σ(r);
    alpha (e^(min((α−1)r, c)) − 1)/(α−1)."""
    if DIVERGENCE == FORWARD_KL:
        e = tl.exp(-r)
        return 1.0 - e, e
    elif DIVERGENCE == JS_DIVERGENCE:
        return 0.6931471805599453 - _softplus(-r), _sigmoid(-r)
    elif DIVERGENCE == ALPHA_DIVERGENCE:
        t = (alpha - 1.0) * r
        e = tl.exp(tl.minimum(t, alpha_clamp))
        return (e - 1.0) / (alpha - 1.0), tl.where(t > alpha_clamp, 0.0, e)
    else:
        return r, r * 0.0 + 1.0


@triton.jit
def _discopop(z, inv_tau):
    """DiscoPOP: m = σ(z/τ), ℓ = (1 − m)·sp(−z) + m·e^(−z) with 1 − m = σ(−z/τ), m·e^(−z) = e^(log σ(z/τ) − z)."""
    m = _sigmoid(z * inv_tau)
    keep = _sigmoid(-z * inv_tau)
    em = tl.exp(-_softplus(-z * inv_tau) - z)
    sp = _softplus(-z)
    return keep * sp + em, -keep * _sigmoid(-z) - m * keep * inv_tau * sp + em * keep * inv_tau - em


@triton.jit
def _logit_loss(CODE: tl.constexpr, z, tau, settings):
    """φ(z) and φ'(z) of the logit-shaped types (for ipo/sr_ipo z is the margin u: φ = (u − 1/(2β))²)."""
    _b, _l, _g, _a, _c, keep, flip, robust_slope, exo_keep, exo_flip, ipo_target, inv_tau = settings
    if CODE == HINGE:
        return tl.maximum(1.0 - z, 0.0), tl.where(z < 1.0, -1.0, 0.0)
    elif CODE == ROBUST:  # ((1 − ε)·sp(−z) − ε·sp(z))/(1 − 2ε) = sp(−z) − z·ε/(1 − 2ε): no cancelling terms
        return _softplus(-z) - robust_slope * z, -_sigmoid(-z) - robust_slope
    elif CODE == EXO_PAIR:
        q_w = _sigmoid(z)
        q_l = _sigmoid(-z)
        phi = q_w * (-_softplus(-z) - exo_keep) + q_l * (-_softplus(z) - exo_flip)
        return phi, q_w * q_l * (z - exo_keep + exo_flip)
    elif CODE == DISCOPOP:
        return _discopop(z, inv_tau)
    elif (CODE == CDPO) or (CODE == SIMPO) or (CODE == AOT) or (CODE == AOT_UNPAIRED):
        return keep * _softplus(-z) + flip * _softplus(z), flip * _sigmoid(z) - keep * _sigmoid(-z)
    elif CODE == RDPO:
        return tau * _softplus(-z) + (1.0 - tau) * _softplus(z), (1.0 - tau) * _sigmoid(z) - tau * _sigmoid(-z)
    elif CODE == ORPO:
        return _b * _softplus(-z), -_b * _sigmoid(-z)
    elif (CODE == IPO) or (CODE == SR_IPO) or (CODE == IPO_SUM):
        u = z - ipo_target
        return u * u, 2.0 * u
    else:  # SIGMOID, SIGMOID_NORM, ODPO, SR_DPO
        return _softplus(-z), -_sigmoid(-z)


@triton.jit
def _reward_loss(CODE: tl.constexpr, x, y, ipo_target):
    """ℓ(x, y) and its partials for the types built on the two rewards x = c·r_w, y = c·r_l."""
    if CODE == NCA_PAIR:
        loss = _softplus(-x) + 0.5 * _softplus(x) + 0.5 * _softplus(y)
        return loss, 0.5 * _sigmoid(x) - _sigmoid(-x), 0.5 * _sigmoid(y)
    elif CODE == BCO_PAIR:
        return _softplus(-x) + _softplus(y), -_sigmoid(-x), _sigmoid(y)
    elif CODE == APO_ZERO:  # 1 − σ(x) + σ(y) = σ(−x) + σ(y)
        return _sigmoid(-x) + _sigmoid(y), -_sigmoid(x) * _sigmoid(-x), _sigmoid(y) * _sigmoid(-y)
    elif CODE == APO_DOWN:  # σ(x) + 1 − σ(x − y) = σ(x) + σ(y − x)
        g = _sigmoid(x - y) * _sigmoid(y - x)
        return _sigmoid(x) + _sigmoid(y - x), _sigmoid(x) * _sigmoid(-x) - g, g
    else:  # SPPO_HARD, with x = r_w, y = r_l
        u = x - ipo_target
        w = y + ipo_target
        return u * u + w * w, 2.0 * u, 2.0 * w


@triton.jit
def _log_odds(logps, n):
    """L = m − log(1 − eᵐ), m = logps/n capped at MAX_MEAN_LOGP (m = 0 is +∞), and dL/d(logps) (0 above the cap);
    1 − eᵐ = −expm1(m), from e^(m/2)·2·sinh(−m/2) so it stays exact near m = 0 in float32."""
    raw = logps / n
    m = tl.minimum(raw, MAX_MEAN_LOGP)
    one_minus = tl.where(m > -0.5, -2.0 * tl.exp(0.5 * m) * _sinh(0.5 * m), 1.0 - tl.exp(m))
    return m - tl.log(one_minus), tl.where(raw > MAX_MEAN_LOGP, 0.0, 1.0 / (n * one_minus))


@triton.jit
def _sinh(x):
    """sinh(x) for |x| ≤ ¼ by its Taylor series to x⁹ (relative error below float32's)."""
    x2 = x * x
    return x * (1.0 + x2 / 6.0 * (1.0 + x2 / 20.0 * (1.0 + x2 / 42.0 * (1.0 + x2 / 72.0))))


@triton.jit
def _pair_term(CODE: tl.constexpr, pair, settings):
    """ℓ of one pair type and ∂ℓ/∂(chosen, rejected, ref_chosen, ref_rejected)."""
    cw, cl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l, offset, tau, delta = pair
    beta, lam, gamma, _a, _c, _k, _f, _rs, _ek, _ef, ipo_target, _t = settings
    if (CODE == NCA_PAIR) or (CODE == BCO_PAIR) or (CODE == APO_ZERO) or (CODE == APO_DOWN) or (CODE == SPPO_HARD):
        c = 1.0 if CODE == SPPO_HARD else beta
        loss, dx, dy = _reward_loss(CODE, c * r_w, c * r_l, ipo_target)
        return loss, c * dx, c * dy, -c * dx, -c * dy
    elif CODE == ASFT:  # sp(−x) + sp(y) on x = β·L_w, y = β·L_l: bco_pair's form, reference-free
        l_w, dl_w = _log_odds(cw, n_w)
        l_l, dl_l = _log_odds(cl, n_l)
        loss, dx, dy = _reward_loss(BCO_PAIR, beta * l_w, beta * l_l, ipo_target)
        return loss, beta * dl_w * dx, beta * dl_l * dy, 0.0 * dx, 0.0 * dy
    else:
        if (CODE == IPO) or (CODE == SIGMOID_NORM):
            c = 1.0 if CODE == IPO else beta
            z = c * (s_w / n_w - s_l / n_l)
            if CODE == SIGMOID_NORM:
                z = z - offset
            dz_cw = c * ds_w / n_w
            dz_cl = -c * ds_l / n_l
        elif CODE == SIMPO:
            z = beta * (cw / n_w - cl / n_l) - gamma - offset
            dz_cw = beta / n_w
            dz_cl = -beta / n_l
        elif CODE == ORPO:
            l_w, dz_cw = _log_odds(cw, n_w)
            l_l, dl_l = _log_odds(cl, n_l)
            z = l_w - l_l
            dz_cl = -dl_l
        elif CODE == IPO_SUM:
            z = s_w - s_l
            dz_cw = ds_w
            dz_cl = -ds_l
        elif (CODE == SR_DPO) or (CODE == SR_IPO):
            c = beta if CODE == SR_DPO else 1.0
            z = c * (r_w - r_l) - lam * delta
            if CODE == SR_DPO:
                z = z - offset
            dz_cw = c + 0.0 * z
            dz_cl = -dz_cw
        else:  # SIGMOID, HINGE, ROBUST, EXO_PAIR, DISCOPOP, CDPO, ODPO, RDPO: z = β·(s_w − s_l) − o
            z = beta * (s_w - s_l) - offset
            dz_cw = beta * ds_w
            dz_cl = -beta * ds_l
        phi, dphi = _logit_loss(CODE, z, tau, settings)
        ref_factor = 0.0 if (CODE == SIMPO) or (CODE == ORPO) else -1.0  # ∂z/∂ref = −∂z/∂policy, except the
        # reference-free types
        return phi, dphi * dz_cw, dphi * dz_cl, ref_factor * dphi * dz_cw, ref_factor * dphi * dz_cl


@triton.jit
def _load(ptr, offs, mask, PRESENT: tl.constexpr, absent):
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=absent).to(tl.float32)
    else:
        return tl.zeros(offs.shape, tl.float32) + absent


@triton.jit
def _load_pair(inputs, offs, mask, settings, PRESENT: tl.constexpr, DIVERGENCE: tl.constexpr):
    """The per-pair quantities of one block (see `_pair_term`), absent slots at their neutral values."""
    alpha = settings[3]
    alpha_clamp = settings[4]
    cw = _load(inputs[0], offs, mask, True, 0.0)
    cl = _load(inputs[1], offs, mask, True, 0.0)
    r_w = cw - _load(inputs[REF_CHOSEN], offs, mask, PRESENT[REF_CHOSEN], 0.0)
    r_l = cl - _load(inputs[REF_CHOSEN + 1], offs, mask, PRESENT[REF_CHOSEN + 1], 0.0)
    s_w, ds_w = _score(r_w, DIVERGENCE, alpha, alpha_clamp)
    s_l, ds_l = _score(r_l, DIVERGENCE, alpha, alpha_clamp)
    n_w = tl.maximum(_load(inputs[CHOSEN_COUNTS], offs, mask, PRESENT[CHOSEN_COUNTS], 1.0), 1.0)
    n_l = tl.maximum(_load(inputs[CHOSEN_COUNTS + 1], offs, mask, PRESENT[CHOSEN_COUNTS + 1], 1.0), 1.0)
    offset = _load(inputs[OFFSET], offs, mask, PRESENT[OFFSET], 0.0)
    tau = _load(inputs[TAU], offs, mask, PRESENT[TAU], 0.0)
    delta = _load(inputs[DELTA], offs, mask, PRESENT[DELTA], 0.0)
    return cw, cl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l, offset, tau, delta


@triton.jit
def _sft_statistic(inputs, upstream, num_pairs, PRESENT: tl.constexpr, BACKWARD: tl.constexpr,
                   HAS_GRAD_LOSSES: tl.constexpr, BLOCK: tl.constexpr):
    """sft's batch statistic: forward its loss −Σ chosen / Σ n_w; backward its ∂L/∂chosen_j per unit loss weight,
    −Σ_i G_i·weights_i / Σ n_w (the same for every pair). `upstream` = (grad_losses_ptr, ∂L/∂loss / B)."""
    grad_losses_ptr, mean_grad = upstream
    lanes = tl.arange(0, BLOCK)
    total = tl.zeros([BLOCK], tl.float32)
    tokens = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + lanes
        in_batch = offs < num_pairs
        tokens += _load(inputs[CHOSEN_COUNTS], offs, in_batch, True, 0.0)
        if BACKWARD:
            g = mean_grad + _load(grad_losses_ptr, offs, in_batch, HAS_GRAD_LOSSES, 0.0)
            total += tl.where(in_batch, g * _load(inputs[WEIGHTS], offs, in_batch, PRESENT[WEIGHTS], 1.0), 0.0)
        else:
            total += _load(inputs[0], offs, in_batch, True, 0.0)
    return -tl.sum(total, 0) / tl.sum(tokens, 0)


@triton.jit
def _aot_logit(values_ptr, second_ptr, at, mask, beta):
    return beta * (_load(values_ptr, at, mask, True, 0.0) - _load(second_ptr, at, mask, True, 0.0))


@triton.jit
def _aot_term(CODE: tl.constexpr, ranked, offs, mask, tau, settings, weight, upstream,
              HAS_GRAD_LOSSES: tl.constexpr):
    """An aot type for the block `offs`: φ at sorted positions `offs` (forward), and ∂/∂(chosen, rejected,
    ref_chosen, ref_rejected) of pairs `offs` (backward): pair j sits at position rank_first[j] of the first sorted
    quantity and rank_second[j] of the second. `ranked` = (first sorted, second sorted, first rank, second rank)."""
    first_ptr, second_ptr, first_rank_ptr, second_rank_ptr = ranked
    grad_losses_ptr, mean_grad = upstream
    beta = settings[0]
    phi, _ = _logit_loss(CODE, _aot_logit(first_ptr, second_ptr, offs, mask, beta), tau, settings)
    at_first = tl.load(first_rank_ptr + offs, mask=mask, other=0)
    at_second = tl.load(second_rank_ptr + offs, mask=mask, other=0)
    _, d_first = _logit_loss(CODE, _aot_logit(first_ptr, second_ptr, at_first, mask, beta), tau, settings)
    _, d_second = _logit_loss(CODE, _aot_logit(first_ptr, second_ptr, at_second, mask, beta), tau, settings)
    d_first *= weight * beta * (mean_grad + _load(grad_losses_ptr, at_first, mask, HAS_GRAD_LOSSES, 0.0))
    d_second *= weight * beta * (mean_grad + _load(grad_losses_ptr, at_second, mask, HAS_GRAD_LOSSES, 0.0))
    if CODE == AOT:  # first = chosen − rejected, second = ref_chosen − ref_rejected
        return phi, d_first, -d_first, -d_second, d_second
    else:  # first = chosen − ref_chosen, second = rejected − ref_rejected
        return phi, d_first, -d_second, -d_first, d_second


@triton.jit
def preference_loss_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, chosen_counts_ptr, rejected_counts_ptr,
    delta_ptr, tau_ptr, offset_ptr, weights_ptr,
    aot_first_ptr, aot_second_ptr, aot_first_rank_ptr, aot_second_rank_ptr,
    aotu_first_ptr, aotu_second_ptr, aotu_first_rank_ptr, aotu_second_rank_ptr,
    losses_ptr, loss_ptr, chosen_rewards_ptr, rejected_rewards_ptr, margins_ptr,
    grad_loss_ptr, grad_losses_ptr, d_chosen_ptr, d_rejected_ptr, d_ref_chosen_ptr, d_ref_rejected_ptr,
    num_pairs, settings, loss_weights,
    CODES: tl.constexpr, DIVERGENCE: tl.constexpr, PRESENT: tl.constexpr, HAS_SFT: tl.constexpr,
    BACKWARD: tl.constexpr, HAS_GRAD_LOSSES: tl.constexpr, BLOCK: tl.constexpr,
):
    # the per-pair inputs in the order of fastpref.losses.table.PAIR_SLOTS; PRESENT[k] says whether slot k is given
    inputs = (chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, chosen_counts_ptr, rejected_counts_ptr,
              delta_ptr, tau_ptr, offset_ptr, weights_ptr)
    aot_batch = (aot_first_ptr, aot_second_ptr, aot_first_rank_ptr, aot_second_rank_ptr)
    aotu_batch = (aotu_first_ptr, aotu_second_ptr, aotu_first_rank_ptr, aotu_second_rank_ptr)
    beta = settings[0]
    lanes = tl.arange(0, BLOCK)
    mean_grad = 0.0
    if BACKWARD:
        mean_grad = tl.load(grad_loss_ptr).to(tl.float32) / num_pairs
    upstream = (grad_losses_ptr, mean_grad)
    sft_stat = 0.0
    if HAS_SFT:
        sft_stat = _sft_statistic(inputs, upstream, num_pairs, PRESENT, BACKWARD, HAS_GRAD_LOSSES, BLOCK)

    loss_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + lanes
        in_batch = offs < num_pairs
        pair = _load_pair(inputs, offs, in_batch, settings, PRESENT, DIVERGENCE)
        tau = pair[11]
        pair_weight = _load(weights_ptr, offs, in_batch, PRESENT[WEIGHTS], 1.0)
        scale = (mean_grad + _load(grad_losses_ptr, offs, in_batch, HAS_GRAD_LOSSES, 0.0)) * pair_weight
        g_cw = tl.zeros([BLOCK], tl.float32)
        g_cl = tl.zeros([BLOCK], tl.float32)
        g_rw = tl.zeros([BLOCK], tl.float32)
        g_rl = tl.zeros([BLOCK], tl.float32)
        total = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(len(CODES)):
            weight = loss_weights[k]
            if CODES[k] == SFT:
                total += weight * sft_stat
                g_cw += weight * sft_stat
            elif (CODES[k] == AOT) or (CODES[k] == AOT_UNPAIRED):
                if CODES[k] == AOT:
                    phi, d_cw, d_cl, d_rw, d_rl = _aot_term(AOT, aot_batch, offs, in_batch, tau, settings, weight,
                                                            upstream, HAS_GRAD_LOSSES)
                else:
                    phi, d_cw, d_cl, d_rw, d_rl = _aot_term(AOT_UNPAIRED, aotu_batch, offs, in_batch, tau, settings,
                                                            weight, upstream, HAS_GRAD_LOSSES)
                total += weight * phi
                g_cw += d_cw
                g_cl += d_cl
                g_rw += d_rw
                g_rl += d_rl
            else:
                phi, d_cw, d_cl, d_rw, d_rl = _pair_term(CODES[k], pair, settings)
                total += weight * phi
                g_cw += scale * weight * d_cw
                g_cl += scale * weight * d_cl
                g_rw += scale * weight * d_rw
                g_rl += scale * weight * d_rl
        if BACKWARD:
            tl.store(d_chosen_ptr + offs, g_cw, mask=in_batch)
            tl.store(d_rejected_ptr + offs, g_cl, mask=in_batch)
            tl.store(d_ref_chosen_ptr + offs, g_rw, mask=in_batch)
            tl.store(d_ref_rejected_ptr + offs, g_rl, mask=in_batch)
        else:
            total = total * pair_weight
            tl.store(losses_ptr + offs, total, mask=in_batch)
            loss_sum += tl.where(in_batch, total, 0.0)
            r_w = pair[2]
            r_l = pair[3]
            tl.store(chosen_rewards_ptr + offs, beta * r_w, mask=in_batch)
            tl.store(rejected_rewards_ptr + offs, beta * r_l, mask=in_batch)
            tl.store(margins_ptr + offs, beta * r_w - beta * r_l, mask=in_batch)
    if not BACKWARD:
        tl.store(loss_ptr, tl.sum(loss_sum, 0) / num_pairs)
