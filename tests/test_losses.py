"""fastpref.preference_loss on every backend present, against the independent float64 oracle
(fastpref.losses.oracle).

Fresh random log-probs of realistic size (−300…−5), an odd number of pairs, reference log-probs that require
grad, and non-uniform upstream gradients on both ``loss`` and ``losses``. Error rule (:func:`assert_matches_oracle`):
against the oracle in float64, a backend's error may not exceed twice the error of plain PyTorch in the same
precision (the oracle's own formulas evaluated in float32 for 16/32-bit inputs) plus a small relative tolerance
(1e-6 for float32 results, 1e-10 for float64 ones, the rounding of 16-bit gradients).
"""

from __future__ import annotations

import math
import os
import subprocess
import sys

import pytest
import torch
from conftest import available_backends

import fastpref
from fastpref.losses import oracle as loss_oracle
from fastpref.losses import LOSS_DEFINITIONS, LOSS_TYPES, bt_tau, odpo_offset

BACKENDS = available_backends()
NUM_PAIRS = 13
AUG_KEYS = ("aug_chosen_logps", "aug_rejected_logps", "aug_ref_chosen_logps", "aug_ref_rejected_logps")
SMOOTHING = {"robust": 0.2, "exo_pair": 0.05, "cdpo": 0.15, "simpo": 0.1, "aot": 0.1, "aot_unpaired": 0.25}
OUTPUT_FIELDS = ("loss", "losses", "chosen_rewards", "rejected_rewards", "margins")
# relative tolerance of the error rule, by the dtype of the checked result
RTOL = {torch.float64: 1e-10, torch.float32: 1e-6, torch.float16: 1e-3, torch.bfloat16: 8e-3}


def _logps(gen, n, dtype=torch.float32):
    return (-5 - 295 * torch.rand(n, generator=gen, dtype=torch.float64)).to(dtype)


def _case(loss_types, seed, *, num_pairs=NUM_PAIRS, ratio_scale=None, dtype=torch.float32, offset=False,
          weights=False, refinement="prompt"):
    """Tensors (policy and reference log-probs as leaves) and keyword arguments covering `loss_types`' needs."""
    gen = torch.Generator().manual_seed(seed)
    chosen, rejected = _logps(gen, num_pairs, dtype), _logps(gen, num_pairs, dtype)
    if ratio_scale is None:
        ref_chosen, ref_rejected = _logps(gen, num_pairs, dtype), _logps(gen, num_pairs, dtype)
    else:  # a policy close to its reference (|r| ~ ratio_scale), where the f-divergence scores stay finite
        ref_chosen = (chosen.double() + ratio_scale * torch.randn(num_pairs, generator=gen, dtype=torch.float64))
        ref_rejected = (rejected.double() + ratio_scale * torch.randn(num_pairs, generator=gen, dtype=torch.float64))
        ref_chosen, ref_rejected = ref_chosen.to(dtype), ref_rejected.to(dtype)
    tensors = {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": ref_chosen,
               "ref_rejected_logps": ref_rejected}
    kwargs = {"chosen_counts": torch.randint(0, 300, (num_pairs,), generator=gen),
              "rejected_counts": torch.randint(1, 300, (num_pairs,), generator=gen)}
    names = [loss_types] if isinstance(loss_types, str) else loss_types
    if "rdpo" in names:
        kwargs["tau"] = torch.rand(num_pairs, generator=gen)
    if "odpo" in names or offset:
        kwargs["offset"] = 3 * torch.rand(num_pairs, generator=gen)
    if weights:
        kwargs["weights"] = 0.2 + 2 * torch.rand(num_pairs, generator=gen)
    if any(LOSS_DEFINITIONS[n].refined for n in names):
        if refinement == "prompt":
            for key in AUG_KEYS:
                tensors[key] = _logps(gen, num_pairs, dtype)
        kwargs["refinement"] = refinement
    used = [SMOOTHING[n] for n in names if n in SMOOTHING]
    if used:
        kwargs["label_smoothing"] = min(used)
    kwargs["loss_type"] = loss_types
    return tensors, kwargs


def run_loss(fn, tensors, kwargs, upstream, **extra):
    """Loss outputs and the gradient of Σ upstream·(loss, losses) with respect to every tensor input."""
    leaves = {k: v.detach().clone().requires_grad_() for k, v in tensors.items()}
    out = fn(**leaves, **kwargs, **extra)
    grad_loss, grad_losses = upstream
    objective = grad_loss * out.loss + (grad_losses * out.losses).sum()
    grads = torch.autograd.grad(objective, list(leaves.values()), allow_unused=True, materialize_grads=True)
    return out, dict(zip(leaves, grads))


def _upstream(seed, num_pairs=NUM_PAIRS):
    gen = torch.Generator().manual_seed(seed + 1000)
    return torch.tensor(0.7, dtype=torch.float64), torch.randn(num_pairs, generator=gen, dtype=torch.float64)


def eager_dtype(dtype: torch.dtype) -> torch.dtype:
    """The precision of "plain PyTorch in the same dtype": float64 for float64 inputs, float32 otherwise (the
    precision every backend computes in)."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def check_error(name, got, eager, want, floor=0.0):
    """|got − want| ≤ 2·|eager − want| + rtol·(|want| + max|want|) + floor, elementwise (rtol by got's dtype)."""
    rtol = RTOL[got.dtype]
    got, eager, want = got.double(), eager.double(), want.double()
    assert torch.isfinite(got).all() or not torch.isfinite(want).all(), f"{name}: non-finite values {got}"
    err = (got - want).abs()
    scale = want.abs().max() if want.numel() else want.new_zeros(())
    bound = 2 * (eager - want).abs() + rtol * (want.abs() + scale) + floor + torch.finfo(torch.float32).tiny
    worst = int((err - bound).argmax()) if err.dim() else 0
    assert bool((err <= bound).all()), (f"{name}: error {err.flatten()[worst]:.3g} > bound "
                                        f"{bound.flatten()[worst]:.3g} (got {got.flatten()[worst]:.10g}, "
                                        f"want {want.flatten()[worst]:.10g}, eager {eager.flatten()[worst]:.10g})")


def roundoff_floors(tensors, kwargs, upstream) -> tuple[float, float]:
    """(values, gradients): a few units of roundoff of the terms a formula adds, O(Σ|w_k|) for values and
    O(β·G·Σ|w_k|) for gradients. Where those terms cancel (apo_down's σ'(x) − σ'(x − y) at small β) any float32
    evaluation is off by that much, and plain PyTorch's own error may be far smaller by luck; the tail tests
    (_strict) run without these floors, so relative accuracy where nothing cancels stays pinned."""
    dtype = eager_dtype(tensors["chosen_logps"].dtype)
    unit = 4 * torch.finfo(dtype).eps
    names = [kwargs["loss_type"]] if isinstance(kwargs["loss_type"], str) else kwargs["loss_type"]
    loss_weight = sum(abs(w) for w in (kwargs.get("loss_weights") or [1.0] * len(names)))
    weights = kwargs.get("weights")
    loss_weight *= 1.0 if weights is None else float(weights.abs().max())
    grad_loss, grad_losses = upstream
    num_pairs = tensors["chosen_logps"].shape[0]
    upstream_scale = abs(float(grad_loss)) / num_pairs + float(grad_losses.abs().max())
    return unit * loss_weight, unit * loss_weight * kwargs.get("beta", 0.1) * upstream_scale


def assert_matches_oracle(tensors, kwargs, backend, upstream, strict=False):
    """Values and gradients of `backend` against the float64 oracle, by the error rule of the module docstring
    (plus :func:`roundoff_floors` unless `strict`); dtypes: outputs float64 for float64 inputs (float32
    otherwise), gradients in each input's dtype."""
    dtype = tensors["chosen_logps"].dtype
    truth, truth_grads = run_loss(loss_oracle.preference_loss, tensors, kwargs, upstream)
    eager, eager_grads = run_loss(loss_oracle.preference_loss, tensors, {**kwargs, "dtype": eager_dtype(dtype)},
                                  upstream)
    fast, fast_grads = run_loss(fastpref.preference_loss, tensors, kwargs, upstream, backend=backend)
    value_floor, grad_floor = (0.0, 0.0) if strict else roundoff_floors(tensors, kwargs, upstream)
    for field in OUTPUT_FIELDS:
        assert getattr(fast, field).dtype == eager_dtype(dtype), f"{field}: {getattr(fast, field).dtype}"
        check_error(field, getattr(fast, field), getattr(eager, field), getattr(truth, field), value_floor)
    for key in truth_grads:
        assert fast_grads[key].dtype == tensors[key].dtype, key
        check_error(f"d/d{key}", fast_grads[key], eager_grads[key], truth_grads[key], grad_floor)
    for key in AUG_KEYS:
        if key in fast_grads:
            assert torch.equal(fast_grads[key], torch.zeros_like(fast_grads[key])), f"{key} got a gradient"
    return fast, fast_grads


def _assert_close_to_oracle(tensors, kwargs, backend, seed):
    return assert_matches_oracle(tensors, kwargs, backend, _upstream(seed, tensors["chosen_logps"].shape[0]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", LOSS_TYPES)
def test_every_loss_type_matches_oracle(backend, loss_type):
    seed = LOSS_TYPES.index(loss_type)
    tensors, kwargs = _case(loss_type, seed)
    _assert_close_to_oracle(tensors, kwargs, backend, seed)


MODIFIED = [n for n, d in LOSS_DEFINITIONS.items() if d.takes_offset or d.takes_weights]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", MODIFIED)
def test_offset_and_weights(backend, loss_type):
    definition = LOSS_DEFINITIONS[loss_type]
    seed = 100 + LOSS_TYPES.index(loss_type)
    tensors, kwargs = _case(loss_type, seed, offset=definition.takes_offset, weights=definition.takes_weights)
    _assert_close_to_oracle(tensors, kwargs, backend, seed)


F_TYPES = [n for n, d in LOSS_DEFINITIONS.items() if d.f_divergence]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("divergence,alpha", [("forward_kl", 1.0), ("js_divergence", 1.0),
                                              ("alpha_divergence", 0.5), ("alpha_divergence", 1.7),
                                              ("alpha_divergence", 1.0)])
def test_f_divergences(backend, divergence, alpha):
    for i, loss_type in enumerate(F_TYPES):
        seed = 200 + i
        tensors, kwargs = _case(loss_type, seed, ratio_scale=3.0, offset=LOSS_DEFINITIONS[loss_type].takes_offset)
        kwargs.update(f_divergence_type=divergence, f_alpha_divergence_coef=alpha)
        _assert_close_to_oracle(tensors, kwargs, backend, seed)


def test_alpha_divergence_clamp_matches_oracle():
    """(α−1)·r above 80 is clamped (TRL): the score saturates and its gradient is 0 there."""
    tensors, kwargs = _case("sigmoid", 7, ratio_scale=None)
    kwargs.update(f_divergence_type="alpha_divergence", f_alpha_divergence_coef=2.0, beta=1e-30)
    for backend in BACKENDS:
        _assert_close_to_oracle(tensors, kwargs, backend, 7)


COMBINATIONS = [
    (["sigmoid", "sft"], [1.0, 0.6]),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0]),  # MPO
    (["sr_dpo", "sft", "hinge"], [1.0, 0.3, 0.5]),
    (["aot", "aot_unpaired", "sigmoid"], [0.5, 0.5, 1.0]),
    (["rdpo", "odpo", "simpo", "sigmoid_norm"], [1.0, 2.0, 0.5, 0.3]),  # one offset for all four
    (["sigmoid", "sigmoid"], [0.25, 0.75]),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_types,loss_weights", COMBINATIONS, ids=lambda v: "+".join(map(str, v)))
def test_combinations_with_loss_weights(backend, loss_types, loss_weights):
    seed = 300 + len(loss_types)
    can_weight = all(LOSS_DEFINITIONS[n].takes_weights for n in loss_types)
    tensors, kwargs = _case(loss_types, seed, weights=can_weight)
    kwargs["loss_weights"] = loss_weights
    _assert_close_to_oracle(tensors, kwargs, backend, seed)
    # the backend's combined loss = Σ_k w_k·(the oracle's loss of type k alone)
    fast = fastpref.preference_loss(**tensors, **kwargs, backend=backend)
    total = 0.0
    for name, weight in zip(loss_types, loss_weights):
        single = {k: v for k, v in kwargs.items() if k not in ("loss_type", "loss_weights", "label_smoothing")}
        if name in SMOOTHING:
            single["label_smoothing"] = kwargs["label_smoothing"]
        if name != "rdpo":
            single.pop("tau", None)
        own = {k: v for k, v in tensors.items() if LOSS_DEFINITIONS[name].refined or not k.startswith("aug_")}
        if not LOSS_DEFINITIONS[name].refined:
            single.pop("refinement", None)
        total += weight * loss_oracle.preference_loss(**own, loss_type=name, **single).loss
    torch.testing.assert_close(fast.loss.double(), total, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("num_pairs", [1, 2, 37, 301])
def test_batch_sizes_with_reference_free(backend, num_pairs):
    """Reference-free calls (refs None) and sizes around the edge cases, sorted and batch types included."""
    tensors, kwargs = _case(["sigmoid", "aot_unpaired", "sft"], 400 + num_pairs, num_pairs=num_pairs)
    tensors = {k: v for k, v in tensors.items() if not k.startswith("ref_")}
    kwargs["loss_weights"] = [1.0, 0.5, 0.3]
    _assert_close_to_oracle(tensors, kwargs, backend, 400 + num_pairs)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16, torch.float64])
def test_input_dtypes(backend, dtype):
    """Half inputs: float32 arithmetic and results, gradients in the input dtype. float64 inputs: float64 results
    and gradients at float64 precision (the error rule's float64 tolerance), on every backend that takes them."""
    if backend == "triton" and dtype == torch.bfloat16 and torch.cuda.is_available() is False:
        pytest.skip("the Triton interpreter computes bf16 wrongly; checked on the GPU")
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("the triton backend refuses float64 (test_triton_refuses_float64)")
    tensors, kwargs = _case(["sigmoid", "ipo", "sr_dpo"], 500, dtype=dtype)
    kwargs["loss_weights"] = [1.0, 0.1, 0.5]
    assert_matches_oracle(tensors, kwargs, backend, _upstream(500))


def _precision_case(dtype=torch.float64):
    """chosen −3000.0004 vs ref −3000.0 at β = 10: the reward is −0.004, which only float64 log-ratios keep."""
    chosen = torch.tensor([-3000.0004, -1234.5678901], dtype=dtype)
    ref = torch.tensor([-3000.0, -1234.5678900], dtype=dtype)
    return chosen, ref


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"] + [None])
def test_float64_log_ratios_before_rounding(backend):
    chosen, ref = _precision_case()
    rejected = chosen - 1.0
    out = fastpref.preference_loss(chosen, rejected, ref, ref - 1.0, beta=10.0, backend=backend)
    want = 10.0 * (chosen - ref)
    assert out.chosen_rewards.dtype == torch.float64 and out.loss.dtype == torch.float64
    torch.testing.assert_close(out.chosen_rewards, want, rtol=1e-9, atol=0)
    assert abs(float(out.chosen_rewards[0]) + 0.004) < 1e-9


def test_triton_refuses_float64(monkeypatch):
    """The Triton kernel computes in float32: explicit float64 requests raise (naming the fix), and backend=None
    on CUDA float64 tensors falls back to torch instead of rounding."""
    if "triton" not in BACKENDS:
        pytest.skip("no triton")
    chosen, ref = _precision_case()
    with pytest.raises(TypeError, match="float32 only.*backend='torch'"):
        fastpref.preference_loss(chosen, chosen - 1.0, ref, ref - 1.0, backend="triton")
    monkeypatch.setenv("FASTPREF_BACKEND", "triton")
    with pytest.raises(TypeError, match="float32 only"):
        fastpref.preference_loss(chosen, chosen - 1.0, ref, ref - 1.0)
    monkeypatch.delenv("FASTPREF_BACKEND")
    from fastpref.losses import api

    monkeypatch.setattr(api, "resolve_backend", lambda backend, device: "triton")  # what CUDA tensors get
    out = fastpref.preference_loss(chosen, chosen - 1.0, ref, ref - 1.0, beta=10.0)
    assert out.chosen_rewards.dtype == torch.float64
    assert abs(float(out.chosen_rewards[0]) + 0.004) < 1e-9


def _strict(tensors, kwargs, backend, upstream=None):
    num_pairs = tensors["chosen_logps"].shape[0]
    upstream = upstream or (torch.tensor(1.0, dtype=torch.float64), torch.zeros(num_pairs, dtype=torch.float64))
    return assert_matches_oracle(tensors, kwargs, backend, upstream, strict=True)


def _logit_case(z, beta=1.0, num_pairs=5):
    """Pairs with logit β·h = z exactly (log-ratios representable in float32)."""
    chosen = torch.full((num_pairs,), -20.0) - torch.arange(num_pairs, dtype=torch.float32)
    rejected = chosen - z / beta
    zeros = torch.zeros(num_pairs)
    return {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": zeros,
            "ref_rejected_logps": zeros.clone()}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type,eps", [("cdpo", 0.0), ("cdpo", 0.1), ("aot", 0.0), ("simpo", 0.0),
                                           ("robust", 0.0), ("sigmoid", 0.0)])
def test_gradient_tails_do_not_cancel(backend, loss_type, eps):
    """At z = 20 the gradient is ≈ −(1 − ε)·e^(−20) + ε: σ(z) − (1 − ε) written out cancels to 0 (cdpo gave 0
    instead of −2.06e-9); the stable form keeps its relative accuracy."""
    tensors = _logit_case(20.0)
    kwargs = {"loss_type": loss_type, "beta": 1.0, "label_smoothing": eps}
    if loss_type == "simpo":
        kwargs.update(simpo_gamma=0.0, chosen_counts=torch.ones(5), rejected_counts=torch.ones(5))
        tensors = {k: v for k, v in tensors.items() if not k.startswith("ref_")}
    _strict(tensors, kwargs, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rdpo_gradient_tail(backend):
    """∂ℓ/∂z = σ(z) − τ cancels at τ = 1, z = 20: (1 − τ)·σ(z) − τ·σ(−z) does not."""
    tensors = _logit_case(20.0)
    _strict(tensors, {"loss_type": "rdpo", "beta": 1.0, "tau": torch.ones(5)}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_robust_near_half_smoothing(backend):
    """robust divides by 1 − 2ε: at ε = 0.4999 rounding ε to float32 first costs 1.3e-4 relative."""
    tensors = _logit_case(0.7)
    _strict(tensors, {"loss_type": "robust", "beta": 1.0, "label_smoothing": 0.4999}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_robust_terms_do_not_cancel(backend):
    """At ε → ½ robust's two terms (1 − ε)·sp(−z)/(1 − 2ε) and ε·sp(z)/(1 − 2ε) are ~2500× larger than ℓ and
    cancel (1.8e-5 relative in float32, as in TRL's own form); written sp(−z) − z·ε/(1 − 2ε) the loss keeps float32
    accuracy: checked at 1e-6 relative over a grid of logits, tighter than the plain-PyTorch rule."""
    num_pairs = 64
    chosen = torch.full((num_pairs,), -20.0)
    rejected = chosen - torch.linspace(0.001, 1.0, num_pairs)
    zeros = torch.zeros(num_pairs)
    eps = 0.4999
    out = fastpref.preference_loss(chosen, rejected, zeros, zeros, loss_type="robust", beta=1.0,
                                   label_smoothing=eps, backend=backend)
    z = (chosen - rejected).double()
    want = torch.nn.functional.softplus(-z) - eps / (1 - 2 * eps) * z
    torch.testing.assert_close(out.losses.double(), want, rtol=1e-6, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["apo_down", "apo_zero"])
def test_apo_tails(backend, loss_type):
    """apo_down's 1 − σ(β(r_w − r_l)) and apo_zero's 1 − σ(βr_w) cancel as σ → 1; σ(−x) does not."""
    num_pairs = 5
    chosen = torch.full((num_pairs,), -30.0)
    tensors = {"chosen_logps": chosen, "rejected_logps": chosen - 25.0, "ref_chosen_logps": chosen - 30.0,
               "ref_rejected_logps": chosen - 30.0}  # βr_w = 30, βr_l = 5
    _strict(tensors, {"loss_type": loss_type, "beta": 1.0}, backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_dpo_with_zero_lambda_is_sigmoid(backend):
    tensors, kwargs = _case("sr_dpo", 600)
    out, grads = run_loss(fastpref.preference_loss, tensors, {**kwargs, "refine_lambda": 0.0}, _upstream(600),
                      backend=backend)
    plain = {k: v for k, v in tensors.items() if not k.startswith("aug_")}
    want, want_grads = run_loss(fastpref.preference_loss, plain, {"loss_type": "sigmoid"}, _upstream(600),
                            backend=backend)
    torch.testing.assert_close(out.losses, want.losses, rtol=1e-6, atol=1e-7)
    for key, grad in want_grads.items():
        torch.testing.assert_close(grads[key], grad, rtol=1e-6, atol=1e-8)
    for key in AUG_KEYS:
        assert torch.equal(grads[key], torch.zeros_like(grads[key]))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["sr_dpo", "sr_ipo"])
def test_naive_refinement(backend, loss_type):
    """refinement="naive": Δ = sg(βh). Values use (1 − λ)·βh, gradients flow through βh only."""
    seed = 700
    tensors, kwargs = _case(loss_type, seed, refinement="naive")
    fast, _ = _assert_close_to_oracle(tensors, kwargs, backend, seed)
    if loss_type == "sr_dpo":
        h = (tensors["chosen_logps"].double() - tensors["ref_chosen_logps"].double()
             - tensors["rejected_logps"].double() + tensors["ref_rejected_logps"].double())
        want = torch.nn.functional.softplus(-(1 - 0.5) * 0.1 * h)
        torch.testing.assert_close(fast.losses.double(), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_stop_gradient_through_refinement(backend):
    """Changing the aug_* inputs changes the loss but never the gradient's path: ∂L/∂aug_* is exactly zero."""
    tensors, kwargs = _case(["sr_dpo", "sr_ipo"], 800)
    kwargs["loss_weights"] = [1.0, 0.01]
    out, grads = run_loss(fastpref.preference_loss, tensors, kwargs, _upstream(800), backend=backend)
    for key in AUG_KEYS:
        assert torch.equal(grads[key], torch.zeros_like(grads[key]))
    shifted = {**tensors, "aug_chosen_logps": tensors["aug_chosen_logps"] + 5.0}
    out2, _ = run_loss(fastpref.preference_loss, shifted, kwargs, _upstream(800), backend=backend)
    assert not torch.allclose(out.losses, out2.losses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rdpo_gradient_vanishes_at_soft_label(backend):
    """∂ℓ/∂z = σ(z) − τ: with τ = σ(βh) every pair's gradient is zero (to float32 rounding of z)."""
    tensors, kwargs = _case("rdpo", 900, ratio_scale=20.0)
    h = (tensors["chosen_logps"].double() - tensors["ref_chosen_logps"].double()
         - tensors["rejected_logps"].double() + tensors["ref_rejected_logps"].double())
    kwargs["tau"] = torch.sigmoid(0.1 * h).float()
    _, grads = run_loss(fastpref.preference_loss, tensors, kwargs, _upstream(900), backend=backend)
    for grad in grads.values():
        assert grad.abs().max() < 1e-6
    kwargs["tau"] = (kwargs["tau"] + 0.1).clamp(max=1.0)
    _, grads = run_loss(fastpref.preference_loss, tensors, kwargs, _upstream(900), backend=backend)
    assert grads["chosen_logps"].abs().max() > 1e-3


def test_formulas_written_out():
    """The non-TRL types against their formulas written out by hand (DESIGN.md), in float64."""
    tensors, _ = _case("sigmoid", 1000)
    t = {k: v.double() for k, v in tensors.items()}
    gen = torch.Generator().manual_seed(1)
    beta, eps = 0.1, 0.15
    h = (t["chosen_logps"] - t["ref_chosen_logps"]) - (t["rejected_logps"] - t["ref_rejected_logps"])
    ls = torch.nn.functional.logsigmoid
    n_w, n_l = torch.randint(1, 90, (NUM_PAIRS,), generator=gen), torch.randint(1, 90, (NUM_PAIRS,), generator=gen)
    tau, offset = torch.rand(NUM_PAIRS, dtype=torch.float64), torch.rand(NUM_PAIRS, dtype=torch.float64)
    aug = [_logps(gen, NUM_PAIRS, torch.float64) for _ in range(4)]
    delta = beta * ((aug[0] - aug[2]) - (aug[1] - aug[3]))
    z_simpo = beta * (t["chosen_logps"] / n_w - t["rejected_logps"] / n_l) - 0.5
    expected = {
        "cdpo": ({"label_smoothing": eps}, -(1 - eps) * ls(beta * h) - eps * ls(-beta * h)),
        "simpo": ({"label_smoothing": eps, "chosen_counts": n_w, "rejected_counts": n_l},
                  -(1 - eps) * ls(z_simpo) - eps * ls(-z_simpo)),
        "odpo": ({"offset": offset}, -ls(beta * h - offset)),
        "rdpo": ({"tau": tau}, -tau * ls(beta * h) - (1 - tau) * ls(-beta * h)),
        "sr_dpo": ({"refine_lambda": 0.3, **dict(zip(AUG_KEYS, aug))}, -ls(beta * h - 0.3 * delta)),
        "sr_ipo": ({"refine_lambda": 0.3, **dict(zip(AUG_KEYS, aug))}, (h - 0.3 * delta - 1 / (2 * beta)) ** 2),
    }
    for name, (extra, want) in expected.items():
        got = loss_oracle.preference_loss(**t, loss_type=name, beta=beta, **extra)
        torch.testing.assert_close(got.losses, want, rtol=1e-12, atol=1e-12)
    # simpo ignores the reference log-probs
    no_ref = {k: v for k, v in t.items() if not k.startswith("ref_")}
    got = loss_oracle.preference_loss(**no_ref, loss_type="simpo", label_smoothing=eps, chosen_counts=n_w,
                                    rejected_counts=n_l)
    torch.testing.assert_close(got.losses, expected["simpo"][1], rtol=1e-12, atol=1e-12)


def test_cpp_layout_matches_the_table(monkeypatch):
    """The C++ kernel's loss codes, slots, scalars and f-divergences (its enums, reported by
    torch.ops.fastpref.preference_loss_layout) are the table's; a table change the kernel lacks is reported."""
    if "cpp" not in BACKENDS:
        pytest.skip("fastpref._C is not built")
    from fastpref.losses import cpp_backend

    assert cpp_backend.layout_drift() == []
    monkeypatch.setattr(cpp_backend, "LOSS_TYPES", (*cpp_backend.LOSS_TYPES[1:], cpp_backend.LOSS_TYPES[0]))
    monkeypatch.setattr(cpp_backend, "SCALARS", cpp_backend.SCALARS[:-1])
    assert [d.split(":")[0] for d in cpp_backend.layout_drift()] == ["losses", "scalars"]


def test_triton_layout_comes_from_the_table():
    pytest.importorskip("triton")
    from fastpref.kernels import preference_loss as kernel
    from fastpref.losses.table import LOSS_CODES, PAIR_SLOTS

    for name, code in LOSS_CODES.items():
        if hasattr(kernel, name.upper()):
            assert getattr(kernel, name.upper()).value == code, name
    assert kernel.DELTA.value == PAIR_SLOTS.index("delta") and kernel.WEIGHTS.value == PAIR_SLOTS.index("weights")


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastpref.kernels.preference_loss import SETTINGS, preference_loss_kernel as kernel
from fastpref.losses.table import LOSS_CODES, PAIR_SLOTS

codes = tuple(LOSS_CODES.values())
names = kernel.arg_names
signature = {}
for name in names:
    if name.endswith("_ptr"):
        signature[name] = "*i64" if "rank" in name else "*fp32"
    elif name == "loss_weights":
        signature[name] = tuple("fp32" for _ in codes)
    elif name == "settings":
        signature[name] = tuple("fp32" for _ in SETTINGS)
    else:
        signature[name] = "constexpr" if name.isupper() else ("i32" if name == "num_pairs" else "fp32")
for divergence, present, backward in ((3, True, False), (2, False, True)):
    slots = tuple(present or k < 2 or name.endswith("counts") for k, name in enumerate(PAIR_SLOTS))
    constants = dict(CODES=codes, DIVERGENCE=divergence, PRESENT=slots, HAS_SFT=True, BACKWARD=backward,
                     HAS_GRAD_LOSSES=present, BLOCK=256)
    source = ASTSource(fn=kernel, signature=signature,
                       constexprs={(names.index(n),): v for n, v in constants.items()})
    assert ".entry" in triton.compile(source, target=GPUTarget("cuda", 90, 32)).asm["ptx"]
print("compiled")
"""


def test_triton_kernel_compiles_for_sm90():
    """The real Triton compiler (not the interpreter) lowers the kernel with every loss type to PTX for sm_90,
    forward and backward, without a GPU: the interpreter accepts Python the compiler may refuse."""
    pytest.importorskip("triton")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=600, check=False)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr:
        pytest.skip("no ptxas in this triton install")
    assert done.returncode == 0 and "compiled" in done.stdout, done.stderr[-3000:]


def test_every_definition_has_formula_and_paper():
    for name, definition in LOSS_DEFINITIONS.items():
        assert "ℓ" in definition.formula, name
        assert "20" in definition.formula or "TRL" in definition.formula, name  # a year or TRL's own variant


def test_helpers():
    score_w = torch.tensor([3.0, 7.5, 1.0])
    score_l = torch.tensor([1.0, 2.5, 0.5])
    torch.testing.assert_close(odpo_offset(score_w, score_l, alpha=0.5), 0.5 * torch.log(score_w - score_l))
    torch.testing.assert_close(bt_tau(score_w, score_l, temperature=2.0), torch.sigmoid((score_w - score_l) / 2))
    with pytest.raises(ValueError, match="score_chosen > score_rejected"):
        odpo_offset(score_l, score_w)
    with pytest.raises(ValueError, match="temperature"):
        bt_tau(score_w, score_l, temperature=0.0)
    with pytest.raises(ValueError, match="must match"):
        bt_tau(score_w, score_l[:2])


def test_backend_resolution(monkeypatch):
    tensors = _good()
    with pytest.raises(ValueError, match="backend must be one of"):
        fastpref.preference_loss(**tensors, backend="cuda")
    from fastpref.losses.fused import CompiledLossKernels

    def no_fused(*_args):
        raise AssertionError("FASTPREF_BACKEND=torch must not reach the compiled backends")

    monkeypatch.setattr(CompiledLossKernels, "run", no_fused)
    monkeypatch.setenv("FASTPREF_BACKEND", "torch")
    fastpref.preference_loss(**tensors)
    monkeypatch.delenv("FASTPREF_BACKEND")
    if "cpp" in BACKENDS:  # default on CPU tensors
        with pytest.raises(AssertionError, match="must not reach"):
            fastpref.preference_loss(**tensors)


def test_one_fused_op_each_way(monkeypatch):
    """The cpp backend runs one compiled op forward and one backward, and nothing else that computes."""
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    if "cpp" not in BACKENDS:
        pytest.skip("fastpref._C is not built")
    from torch.utils._python_dispatch import TorchDispatchMode

    class Count(TorchDispatchMode):
        def __init__(self):
            super().__init__()
            self.ops = []

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            self.ops.append(str(func.overloadpacket))
            return func(*args, **(kwargs or {}))

    for loss_types, extra in ((["sigmoid", "sft", "aot"], set()), (["sigmoid", "sr_dpo"], {"aten.sub", "aten.mul"})):
        tensors, kwargs = _case(loss_types, 1200)
        leaves = {k: v.requires_grad_() for k, v in tensors.items()}
        with Count() as forward_ops:
            out = fastpref.preference_loss(**leaves, **kwargs, backend="cpp")
        with Count() as backward_ops:
            out.loss.backward()
        # besides the fused op only Δ's few elementwise ops (refinement_delta, computed once for every backend)
        computing = [op for op in forward_ops.ops if op not in {"aten.detach", *extra}]
        assert computing == ["fastpref.preference_loss_fwd"], forward_ops.ops
        assert [op for op in backward_ops.ops if op.startswith("fastpref")] == ["fastpref.preference_loss_bwd"], \
            backward_ops.ops


def test_compiled_ops_pass_opcheck():
    """torch.ops.fastpref.preference_loss_{fwd,bwd}: schema, fake kernels and dispatch (torch.library.opcheck)."""
    if "cpp" not in BACKENDS:
        pytest.skip("fastpref._C is not built")
    from fastpref.losses.fused import fused_problem
    from fastpref.losses.inputs import LossArguments, check_preference_loss_args

    tensors, kwargs = _case(["sigmoid", "aot", "sft"], 1250)
    problem = check_preference_loss_args(LossArguments(
        *tensors.values(), loss_type=kwargs["loss_type"], loss_weights=[1.0, 0.5, 0.2],
        label_smoothing=kwargs["label_smoothing"], chosen_counts=kwargs["chosen_counts"],
        rejected_counts=kwargs["rejected_counts"]))
    fused = fused_problem(problem, presort=False)
    settings = (list(fused.codes), list(fused.loss_weights), fused.params.scalars(), 0)
    torch.library.opcheck(torch.ops.fastpref.preference_loss_fwd.default, (fused.slots, *settings))
    torch.library.opcheck(torch.ops.fastpref.preference_loss_bwd.default,
                          (fused.slots, *settings, torch.tensor(0.5), torch.randn(NUM_PAIRS)))


# ---- bad input ---------------------------------------------------------------------------------------------

def _good():
    tensors, _ = _case("sigmoid", 1300)
    return tensors


@pytest.mark.parametrize("change,error,match", [
    ({"loss_type": "dpo"}, ValueError, "unknown loss_type 'dpo'; valid types are: sigmoid, hinge"),
    ({"loss_type": []}, TypeError, "loss_type"),
    ({"loss_type": "rdpo"}, ValueError, "'rdpo' requires tau"),
    ({"loss_type": "odpo"}, ValueError, "'odpo' requires offset"),
    ({"loss_type": "sr_dpo"}, ValueError, r"requires aug_chosen_logps.*refinement='naive'"),
    ({"loss_type": "ipo"}, ValueError, "'ipo' requires chosen_counts, rejected_counts"),
    ({"loss_type": "sft"}, ValueError, "'sft' requires chosen_counts"),
    ({"beta": 0.0}, ValueError, "beta must be finite and > 0"),
    ({"beta": float("nan")}, ValueError, "beta"),
    ({"beta": "0.1"}, TypeError, "beta must be a number"),
    ({"loss_type": "rdpo", "tau": torch.full((NUM_PAIRS,), 1.5)}, ValueError, r"tau must lie in \[0, 1\]"),
    ({"loss_type": "robust", "label_smoothing": 0.5}, ValueError, r"\[0.0, 0.5\) for loss_type 'robust'"),
    ({"loss_type": "exo_pair"}, ValueError, r"\(0.0, 1.0\) for loss_type 'exo_pair'"),
    ({"loss_type": "cdpo", "label_smoothing": 1.5}, ValueError, "label_smoothing must lie in"),
    ({"label_smoothing": 0.1}, ValueError, "has no effect on loss types"),
    ({"loss_weights": [1.0, 2.0]}, ValueError, "loss_weights has 2 entries for 1 loss types"),
    ({"f_divergence_type": "kl"}, ValueError, "f_divergence_type must be one of"),
    ({"loss_type": "nca_pair", "f_divergence_type": "js_divergence"}, ValueError, "applies only to loss types"),
    ({"refinement": "cheap"}, ValueError, "refinement must be one of"),
    ({"loss_type": "ipo", "offset": torch.zeros(NUM_PAIRS), "chosen_counts": torch.ones(NUM_PAIRS),
      "rejected_counts": torch.ones(NUM_PAIRS)}, ValueError, "take none"),
    ({"loss_type": "aot", "weights": torch.ones(NUM_PAIRS)}, ValueError, "sort the batch"),
    ({"tau": torch.rand(NUM_PAIRS)}, ValueError, "tau is used only by"),
    ({"weights": torch.ones(NUM_PAIRS + 1)}, ValueError, r"weights must have shape \(13,\)"),
    ({"offset": torch.ones(NUM_PAIRS, dtype=torch.long)}, TypeError, "offset must be a float tensor"),
    ({"weights": torch.ones(NUM_PAIRS, requires_grad=True)}, ValueError, "weights.detach"),
    ({"discopop_tau": 0.0}, ValueError, "discopop_tau"),
])
def test_bad_arguments(change, error, match):
    with pytest.raises(error, match=match):
        fastpref.preference_loss(**{**_good(), **change})


@pytest.mark.parametrize("key,value,error,match", [
    ("rejected_logps", lambda t: t[:-1], ValueError, r"rejected_logps must have shape \(13,\)"),
    ("ref_chosen_logps", lambda t: t.double(), TypeError, "ref_chosen_logps dtype torch.float64 must equal"),
    ("ref_rejected_logps", lambda t: None, ValueError, "give both ref_chosen_logps and ref_rejected_logps"),
    ("chosen_logps", lambda t: t[None], ValueError, "1-D"),
    ("chosen_logps", lambda t: t[:0], ValueError, "B >= 1"),
    ("chosen_logps", lambda t: t.long(), TypeError, "chosen_logps must be float16"),
    ("chosen_logps", lambda t: t.tolist(), TypeError, "chosen_logps must be a torch.Tensor"),
    ("rejected_logps", lambda t: t.to("meta"), ValueError, "rejected_logps is on meta"),
])
def test_bad_tensors(key, value, error, match):
    tensors = _good()
    tensors[key] = value(tensors[key])
    with pytest.raises(error, match=match):
        fastpref.preference_loss(**tensors)


@pytest.mark.parametrize("key", ["chosen_logps", "ref_rejected_logps", "offset"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_inputs(key, bad, monkeypatch):
    tensors = _good()
    tensors["offset"] = torch.rand(NUM_PAIRS)
    tensors[key] = tensors[key].clone()
    tensors[key][NUM_PAIRS // 2] = bad
    with pytest.raises(ValueError, match=f"{key} holds NaN or infinite values"):
        fastpref.preference_loss(**tensors)
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")  # the switch removes the check (and its host sync)
    fastpref.preference_loss(**tensors, backend="torch")


@pytest.mark.parametrize("backend", BACKENDS)
def test_unchecked_nan_is_memory_safe(backend, monkeypatch):
    """With the value checks off, a NaN (even inside aot's batch sort) gives NaN results, never a crash."""
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    tensors, kwargs = _case(["aot", "aot_unpaired", "sigmoid"], 1350)
    tensors["chosen_logps"][3] = float("nan")
    out, _ = run_loss(fastpref.preference_loss, tensors, kwargs, _upstream(1350), backend=backend)
    assert torch.isnan(out.loss)


def test_counts_checks():
    tensors = _good()
    bad = torch.full((NUM_PAIRS,), -1)
    with pytest.raises(ValueError, match="chosen_counts must be >= 0"):
        fastpref.preference_loss(**tensors, loss_type="ipo", chosen_counts=bad, rejected_counts=bad.abs())
    with pytest.raises(ValueError, match="sum to 0"):
        fastpref.preference_loss(**tensors, loss_type="sft", chosen_counts=torch.zeros(NUM_PAIRS, dtype=torch.long))
    with pytest.raises(TypeError, match="chosen_counts must be an integer or a float tensor"):
        fastpref.preference_loss(**tensors, loss_type="sft", chosen_counts=torch.ones(NUM_PAIRS, dtype=torch.bool))


def test_aug_inputs_come_in_fours_and_only_where_used():
    tensors = _good()
    aug = _logps(torch.Generator().manual_seed(3), NUM_PAIRS)
    with pytest.raises(ValueError, match="set of four"):
        fastpref.preference_loss(**tensors, loss_type="sr_dpo", aug_chosen_logps=aug)
    four = dict.fromkeys(AUG_KEYS, aug)
    with pytest.raises(ValueError, match="used only by loss types 'sr_dpo'/'sr_ipo'"):
        fastpref.preference_loss(**tensors, **four)
    with pytest.raises(ValueError, match="used only by"):
        fastpref.preference_loss(**tensors, **four, loss_type="sr_dpo", refinement="naive")


@pytest.mark.gpu
def test_cuda_no_host_sync_and_matches_cpu(monkeypatch):
    """On CUDA (triton backend) the op never synchronizes with the host once value checks are off."""
    tensors, kwargs = _case(["sigmoid", "aot", "sft"], 1400, num_pairs=301)
    kwargs["loss_weights"] = [1.0, 0.5, 0.2]
    cuda = {k: v.cuda().requires_grad_() for k, v in tensors.items()}
    cuda_kwargs = {k: (v.cuda() if isinstance(v, torch.Tensor) else v) for k, v in kwargs.items()}
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    try:
        fastpref.preference_loss(**cuda, **cuda_kwargs).loss.backward()  # compile outside the check
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        out = fastpref.preference_loss(**cuda, **cuda_kwargs)
        out.loss.backward()
    finally:
        torch.cuda.set_sync_debug_mode("default")
    want = loss_oracle.preference_loss(**tensors, **kwargs)
    torch.testing.assert_close(out.losses.cpu().double(), want.losses, rtol=1e-5, atol=1e-5)
    assert math.isfinite(float(out.loss))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_traces_under_torch_compile_fullgraph(backend, dtype, monkeypatch):
    """The public op traces whole (fullgraph=True) once value checks are off; values match eager."""
    monkeypatch.setenv("FASTPREF_SKIP_VALUE_CHECKS", "1")
    tensors, kwargs = _case(["sigmoid", "sft", "sr_dpo", "aot"], 1500, dtype=dtype)
    kwargs["loss_weights"] = [1.0, 0.2, 0.5, 0.3]

    def step(**leaves):
        out = fastpref.preference_loss(**leaves, **kwargs, backend=backend)
        return out.loss, out.losses

    eager = step(**tensors)  # the first call imports the backend, outside the trace
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(**tensors)
    for got, want in zip(compiled, eager):
        assert got.dtype == want.dtype == eager_dtype(dtype)
        torch.testing.assert_close(got, want)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("loss_type", ["aot", "aot_unpaired"])
def test_aot_ties_keep_pair_order(backend, loss_type):
    """Tied sorted values (the batch has many equal log-ratios) make aot non-differentiable; every backend and
    the oracle take the subgradient of the stable sort (ties keep pair order), so non-uniform upstream gradients
    land on the same pairs."""
    gen = torch.Generator().manual_seed(1600)
    num_pairs = 17
    chosen = _logps(gen, num_pairs)
    rejected = _logps(gen, num_pairs)
    ratios = torch.tensor([0.0, 0.5, -0.5])[torch.randint(0, 3, (num_pairs,), generator=gen)]
    tensors = {"chosen_logps": chosen, "rejected_logps": rejected, "ref_chosen_logps": chosen - ratios,
               "ref_rejected_logps": rejected - ratios.flip(0)}
    if loss_type == "aot":
        tensors["rejected_logps"] = chosen - ratios
        tensors["ref_rejected_logps"] = tensors["ref_chosen_logps"] - ratios.flip(0)
    assert_matches_oracle(tensors, {"loss_type": loss_type, "beta": 0.5}, backend, _upstream(1600, num_pairs))
