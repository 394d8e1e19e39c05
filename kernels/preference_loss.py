"""Triton kernel of :func:`fastpref.preference_loss` (the "triton" backend), shipped as
``fastpref.kernels.preference_loss``.

One program walks the B pairs in blocks of ``BLOCK``. Forward (``BACKWARD=False``) writes the per-pair losses
Σ_k w_k·weights_i·ℓ_k,i, their mean, and TRL's detached rewards β·r_w, β·r_l and margins. Backward
(``BACKWARD=True``) recomputes the same per-pair terms and writes ∂L/∂chosen, ∂L/∂rejected, ∂L/∂ref_chosen,
∂L/∂ref_rejected for the upstream gradient G_i = ∂L/∂loss / B + ∂L/∂losses_i. The loss types of a call are the
compile-time tuple ``CODES`` (codes = positions in the table of ``fastpref/losses/table.py``, whose
docstrings give every formula and paper); each expands into its own straight-line code, nothing else is
compiled in. Batch statistics (sft's token mean) take one extra sweep in the same program; the aot types get
their batch already sorted (values and each pair's rank) from ``fastpref/losses/fused.py`` and only gather.

Notation: r_w = chosen − ref_chosen, r_l = rejected − ref_rejected, s = f(r) (f-divergence score), n the token
counts (clamped to ≥ 1), o the offset, Δ the Sr-DPO refinement (no gradient). Arithmetic in float32.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Loss codes: positions in fastpref.losses.table.LOSS_DEFINITIONS (a test checks they agree).
SIGMOID = tl.constexpr(0)
HINGE = tl.constexpr(1)
IPO = tl.constexpr(2)
SIGMOID_NORM = tl.constexpr(3)
ROBUST = tl.constexpr(4)
EXO_PAIR = tl.constexpr(5)
NCA_PAIR = tl.constexpr(6)
BCO_PAIR = tl.constexpr(7)
SPPO_HARD = tl.constexpr(8)
AOT = tl.constexpr(9)
AOT_UNPAIRED = tl.constexpr(10)
APO_ZERO = tl.constexpr(11)
APO_DOWN = tl.constexpr(12)
DISCOPOP = tl.constexpr(13)
SFT = tl.constexpr(14)
CDPO = tl.constexpr(15)
SIMPO = tl.constexpr(16)
ODPO = tl.constexpr(17)
RDPO = tl.constexpr(18)
SR_DPO = tl.constexpr(19)
SR_IPO = tl.constexpr(20)

LOSS_CODES = {name.lower(): value.value for name, value in dict(globals()).items()
              if isinstance(value, tl.constexpr) and name.isupper()}

# f-divergence codes (fastpref/losses/fused.py DIVERGENCE_CODES)
FORWARD_KL = tl.constexpr(1)
JS_DIVERGENCE = tl.constexpr(2)
ALPHA_DIVERGENCE = tl.constexpr(3)


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
def _logit_loss(CODE: tl.constexpr, z, tau, beta, eps, discopop_tau, exo_keep, exo_flip):
    """φ(z) and φ'(z) of the logit-shaped types (for ipo/sr_ipo z is the margin u: φ = (u − 1/(2β))²)."""
    if CODE == HINGE:
        return tl.maximum(1.0 - z, 0.0), tl.where(z < 1.0, -1.0, 0.0)
    elif CODE == ROBUST:
        phi = ((1.0 - eps) * _softplus(-z) - eps * _softplus(z)) / (1.0 - 2.0 * eps)
        return phi, (-(1.0 - eps) * _sigmoid(-z) - eps * _sigmoid(z)) / (1.0 - 2.0 * eps)
    elif CODE == EXO_PAIR:
        q_w = _sigmoid(z)
        q_l = _sigmoid(-z)
        phi = q_w * (-_softplus(-z) - exo_keep) + q_l * (-_softplus(z) - exo_flip)
        return phi, q_w * q_l * (z - exo_keep + exo_flip)
    elif CODE == DISCOPOP:
        m = _sigmoid(z / discopop_tau)
        em = tl.exp(-_softplus(-z / discopop_tau) - z)  # m·e^(−z) without overflow
        sp = _softplus(-z)
        dphi = -(1.0 - m) * _sigmoid(-z) - m * (1.0 - m) / discopop_tau * sp - em + em * (1.0 - m) / discopop_tau
        return (1.0 - m) * sp + em, dphi
    elif (CODE == CDPO) or (CODE == SIMPO) or (CODE == AOT) or (CODE == AOT_UNPAIRED):
        return (1.0 - eps) * _softplus(-z) + eps * _softplus(z), _sigmoid(z) - (1.0 - eps)
    elif CODE == RDPO:
        return tau * _softplus(-z) + (1.0 - tau) * _softplus(z), _sigmoid(z) - tau
    elif (CODE == IPO) or (CODE == SR_IPO):
        u = z - 0.5 / beta
        return u * u, 2.0 * u
    else:  # SIGMOID, SIGMOID_NORM, ODPO, SR_DPO
        return _softplus(-z), -_sigmoid(-z)


@triton.jit
def _reward_loss(CODE: tl.constexpr, x, y, beta):
    """ℓ(x, y) and its partials for the types built on the two rewards x = c·r_w, y = c·r_l."""
    if CODE == NCA_PAIR:
        loss = _softplus(-x) + 0.5 * _softplus(x) + 0.5 * _softplus(y)
        return loss, -_sigmoid(-x) + 0.5 * _sigmoid(x), 0.5 * _sigmoid(y)
    elif CODE == BCO_PAIR:
        return _softplus(-x) + _softplus(y), -_sigmoid(-x), _sigmoid(y)
    elif CODE == APO_ZERO:
        sx = _sigmoid(x)
        sy = _sigmoid(y)
        return 1.0 - sx + sy, -sx * (1.0 - sx), sy * (1.0 - sy)
    elif CODE == APO_DOWN:
        sx = _sigmoid(x)
        sd = _sigmoid(x - y)
        return sx + 1.0 - sd, sx * (1.0 - sx) - sd * (1.0 - sd), sd * (1.0 - sd)
    else:  # SPPO_HARD, with x = r_w, y = r_l
        u = x - 0.5 / beta
        w = y + 0.5 / beta
        return u * u + w * w, 2.0 * u, 2.0 * w


@triton.jit
def _pair_term(CODE: tl.constexpr, cw, cl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l, offset, tau, delta,
               beta, eps, lam, gamma, discopop_tau, exo_keep, exo_flip):
    """ℓ of one pair type and ∂ℓ/∂(chosen, rejected, ref_chosen, ref_rejected)."""
    if (CODE == NCA_PAIR) or (CODE == BCO_PAIR) or (CODE == APO_ZERO) or (CODE == APO_DOWN) or (CODE == SPPO_HARD):
        c = 1.0 if CODE == SPPO_HARD else beta
        loss, dx, dy = _reward_loss(CODE, c * r_w, c * r_l, beta)
        return loss, c * dx, c * dy, -c * dx, -c * dy
    else:
        if (CODE == IPO) or (CODE == SIGMOID_NORM):
            c = 1.0 if CODE == IPO else beta
            z = c * (s_w / n_w - s_l / n_l)
            if CODE == SIGMOID_NORM:
                z = z - offset
            dz_cw = c * ds_w / n_w
            dz_cl = -c * ds_l / n_l
            dz_rw = -dz_cw
            dz_rl = -dz_cl
        elif CODE == SIMPO:
            z = beta * (cw / n_w - cl / n_l) - gamma - offset
            dz_cw = beta / n_w
            dz_cl = -beta / n_l
            dz_rw = 0.0 * z
            dz_rl = 0.0 * z
        elif (CODE == SR_DPO) or (CODE == SR_IPO):
            c = beta if CODE == SR_DPO else 1.0
            z = c * (r_w - r_l) - lam * delta
            if CODE == SR_DPO:
                z = z - offset
            dz_cw = c + 0.0 * z
            dz_cl = -dz_cw
            dz_rw = -dz_cw
            dz_rl = dz_cw
        else:  # SIGMOID, HINGE, ROBUST, EXO_PAIR, DISCOPOP, CDPO, ODPO, RDPO: z = β·(s_w − s_l) − o
            z = beta * (s_w - s_l) - offset
            dz_cw = beta * ds_w
            dz_cl = -beta * ds_l
            dz_rw = -dz_cw
            dz_rl = -dz_cl
        phi, dphi = _logit_loss(CODE, z, tau, beta, eps, discopop_tau, exo_keep, exo_flip)
        return phi, dphi * dz_cw, dphi * dz_cl, dphi * dz_rw, dphi * dz_rl


@triton.jit
def _load(ptr, offs, mask, PRESENT: tl.constexpr, absent):
    if PRESENT:
        return tl.load(ptr + offs, mask=mask, other=absent).to(tl.float32)
    else:
        return tl.zeros(offs.shape, tl.float32) + absent


@triton.jit
def preference_loss_kernel(
    chosen_ptr, rejected_ptr, ref_chosen_ptr, ref_rejected_ptr, chosen_counts_ptr, rejected_counts_ptr,
    aug_chosen_ptr, aug_rejected_ptr, aug_ref_chosen_ptr, aug_ref_rejected_ptr, tau_ptr, offset_ptr, weights_ptr,
    aot_first_ptr, aot_second_ptr, aot_first_rank_ptr, aot_second_rank_ptr,
    aotu_first_ptr, aotu_second_ptr, aotu_first_rank_ptr, aotu_second_rank_ptr,
    losses_ptr, loss_ptr, chosen_rewards_ptr, rejected_rewards_ptr, margins_ptr,
    grad_loss_ptr, grad_losses_ptr, d_chosen_ptr, d_rejected_ptr, d_ref_chosen_ptr, d_ref_rejected_ptr,
    num_pairs, beta, eps, lam, gamma, discopop_tau, alpha, alpha_clamp, exo_keep, exo_flip, loss_weights,
    CODES: tl.constexpr, DIVERGENCE: tl.constexpr, NAIVE: tl.constexpr, HAS_REF: tl.constexpr,
    HAS_COUNTS: tl.constexpr, HAS_AUG: tl.constexpr, HAS_TAU: tl.constexpr, HAS_OFFSET: tl.constexpr,
    HAS_WEIGHTS: tl.constexpr, HAS_SFT: tl.constexpr, BACKWARD: tl.constexpr, HAS_GRAD_LOSSES: tl.constexpr,
    BLOCK: tl.constexpr,
):
    lanes = tl.arange(0, BLOCK)
    if BACKWARD:
        mean_grad = tl.load(grad_loss_ptr).to(tl.float32) / num_pairs

    # sft's batch statistic: forward its loss −Σ chosen / Σ n_w; backward its ∂L/∂chosen_j per unit loss
    # weight, −Σ_i G_i·weights_i / Σ n_w (the same for every pair)
    sft_stat = 0.0
    if HAS_SFT:
        total = tl.zeros([BLOCK], tl.float32)
        tokens = tl.zeros([BLOCK], tl.float32)
        for start in range(0, num_pairs, BLOCK):
            offs = start + lanes
            in_batch = offs < num_pairs
            tokens += _load(chosen_counts_ptr, offs, in_batch, True, 0.0)
            if BACKWARD:
                g = mean_grad + _load(grad_losses_ptr, offs, in_batch, HAS_GRAD_LOSSES, 0.0)
                total += tl.where(in_batch, g * _load(weights_ptr, offs, in_batch, HAS_WEIGHTS, 1.0), 0.0)
            else:
                total += _load(chosen_ptr, offs, in_batch, True, 0.0)
        sft_stat = -tl.sum(total, 0) / tl.sum(tokens, 0)

    loss_sum = tl.zeros([BLOCK], tl.float32)
    for start in range(0, num_pairs, BLOCK):
        offs = start + lanes
        in_batch = offs < num_pairs
        cw = _load(chosen_ptr, offs, in_batch, True, 0.0)
        cl = _load(rejected_ptr, offs, in_batch, True, 0.0)
        rw = _load(ref_chosen_ptr, offs, in_batch, HAS_REF, 0.0)
        rl = _load(ref_rejected_ptr, offs, in_batch, HAS_REF, 0.0)
        r_w = cw - rw
        r_l = cl - rl
        s_w, ds_w = _score(r_w, DIVERGENCE, alpha, alpha_clamp)
        s_l, ds_l = _score(r_l, DIVERGENCE, alpha, alpha_clamp)
        n_w = tl.maximum(_load(chosen_counts_ptr, offs, in_batch, HAS_COUNTS, 1.0), 1.0)
        n_l = tl.maximum(_load(rejected_counts_ptr, offs, in_batch, HAS_COUNTS, 1.0), 1.0)
        offset = _load(offset_ptr, offs, in_batch, HAS_OFFSET, 0.0)
        tau = _load(tau_ptr, offs, in_batch, HAS_TAU, 0.0)
        pair_weight = _load(weights_ptr, offs, in_batch, HAS_WEIGHTS, 1.0)
        if NAIVE:
            delta = beta * (r_w - r_l)
        else:
            aug_w = _load(aug_chosen_ptr, offs, in_batch, HAS_AUG, 0.0) - _load(aug_ref_chosen_ptr, offs, in_batch,
                                                                                HAS_AUG, 0.0)
            aug_l = _load(aug_rejected_ptr, offs, in_batch, HAS_AUG, 0.0) - _load(aug_ref_rejected_ptr, offs,
                                                                                  in_batch, HAS_AUG, 0.0)
            delta = beta * (aug_w - aug_l)
        if BACKWARD:
            scale = (mean_grad + _load(grad_losses_ptr, offs, in_batch, HAS_GRAD_LOSSES, 0.0)) * pair_weight
            g_cw = tl.zeros([BLOCK], tl.float32)
            g_cl = tl.zeros([BLOCK], tl.float32)
            g_rw = tl.zeros([BLOCK], tl.float32)
            g_rl = tl.zeros([BLOCK], tl.float32)
        else:
            total = tl.zeros([BLOCK], tl.float32)
        for k in tl.static_range(len(CODES)):
            weight = loss_weights[k]
            if CODES[k] == SFT:
                if BACKWARD:
                    g_cw += weight * sft_stat
                else:
                    total += weight * sft_stat
            elif (CODES[k] == AOT) or (CODES[k] == AOT_UNPAIRED):
                first_ptr = aot_first_ptr if CODES[k] == AOT else aotu_first_ptr
                second_ptr = aot_second_ptr if CODES[k] == AOT else aotu_second_ptr
                if BACKWARD:
                    # pair j sits at position rank_first[j] of the first sorted quantity, rank_second[j] of the other
                    first_rank_ptr = aot_first_rank_ptr if CODES[k] == AOT else aotu_first_rank_ptr
                    second_rank_ptr = aot_second_rank_ptr if CODES[k] == AOT else aotu_second_rank_ptr
                    at_first = tl.load(first_rank_ptr + offs, mask=in_batch, other=0)
                    at_second = tl.load(second_rank_ptr + offs, mask=in_batch, other=0)
                    z_first = beta * (_load(first_ptr, at_first, in_batch, True, 0.0)
                                      - _load(second_ptr, at_first, in_batch, True, 0.0))
                    z_second = beta * (_load(first_ptr, at_second, in_batch, True, 0.0)
                                       - _load(second_ptr, at_second, in_batch, True, 0.0))
                    _, d_first = _logit_loss(CODES[k], z_first, tau, beta, eps, discopop_tau, exo_keep, exo_flip)
                    _, d_second = _logit_loss(CODES[k], z_second, tau, beta, eps, discopop_tau, exo_keep, exo_flip)
                    d_first *= weight * beta * (mean_grad + _load(grad_losses_ptr, at_first, in_batch,
                                                                  HAS_GRAD_LOSSES, 0.0))
                    d_second *= weight * beta * (mean_grad + _load(grad_losses_ptr, at_second, in_batch,
                                                                   HAS_GRAD_LOSSES, 0.0))
                    if CODES[k] == AOT:  # first = chosen − rejected, second = ref_chosen − ref_rejected
                        g_cw += d_first
                        g_cl -= d_first
                        g_rw -= d_second
                        g_rl += d_second
                    else:  # first = chosen − ref_chosen, second = rejected − ref_rejected
                        g_cw += d_first
                        g_rw -= d_first
                        g_cl -= d_second
                        g_rl += d_second
                else:
                    z = beta * (_load(first_ptr, offs, in_batch, True, 0.0) - _load(second_ptr, offs, in_batch, True,
                                                                                    0.0))
                    phi, _ = _logit_loss(CODES[k], z, tau, beta, eps, discopop_tau, exo_keep, exo_flip)
                    total += weight * phi
            else:
                phi, d_cw, d_cl, d_rw, d_rl = _pair_term(CODES[k], cw, cl, r_w, r_l, s_w, ds_w, s_l, ds_l, n_w, n_l,
                                                         offset, tau, delta, beta, eps, lam, gamma, discopop_tau,
                                                         exo_keep, exo_flip)
                if BACKWARD:
                    g_cw += scale * weight * d_cw
                    g_cl += scale * weight * d_cl
                    g_rw += scale * weight * d_rw
                    g_rl += scale * weight * d_rl
                else:
                    total += weight * phi
        if BACKWARD:
            tl.store(d_chosen_ptr + offs, g_cw, mask=in_batch)
            tl.store(d_rejected_ptr + offs, g_cl, mask=in_batch)
            tl.store(d_ref_chosen_ptr + offs, g_rw, mask=in_batch)
            tl.store(d_ref_rejected_ptr + offs, g_rl, mask=in_batch)
        else:
            total = total * pair_weight
            tl.store(losses_ptr + offs, total, mask=in_batch)
            loss_sum += tl.where(in_batch, total, 0.0)
            tl.store(chosen_rewards_ptr + offs, beta * r_w, mask=in_batch)
            tl.store(rejected_rewards_ptr + offs, beta * r_l, mask=in_batch)
            tl.store(margins_ptr + offs, beta * r_w - beta * r_l, mask=in_batch)
    if not BACKWARD:
        tl.store(loss_ptr, tl.sum(loss_sum, 0) / num_pairs)
