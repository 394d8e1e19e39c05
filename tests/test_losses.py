"""fastpref.preference_loss on every backend present, against the float64 oracle (fastpref.reference).

Fresh random log-probs of realistic size (−300…−5), an odd number of pairs, reference log-probs that require
grad, and non-uniform upstream gradients on both ``loss`` and ``losses``. Error rule: the backend's error
against float64 may not exceed twice the error of the same formulas in eager float32 PyTorch plus a small
tolerance.
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


def _run(fn, tensors, kwargs, upstream, **extra):
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


def _assert_close_to_oracle(tensors, kwargs, backend, seed, atol=1e-5):
    upstream = _upstream(seed, tensors["chosen_logps"].shape[0])
    oracle, oracle_grads = _run(loss_oracle.preference_loss, tensors, kwargs, upstream)
    eager, eager_grads = _run(fastpref.preference_loss, tensors, kwargs, upstream, backend="torch")
    fast, fast_grads = _run(fastpref.preference_loss, tensors, kwargs, upstream, backend=backend)

    def check(name, got, eager_value, want):
        assert got.dtype == torch.float32 or got.dtype == want.dtype, name
        got, eager_value, want = got.double(), eager_value.double(), want.double()
        assert torch.isfinite(got).all(), f"{name}: non-finite values"
        err = (got - want).abs()
        bound = 2 * (eager_value - want).abs() + atol * (1 + want.abs())
        worst = int((err - bound).argmax()) if err.dim() else 0
        assert bool((err <= bound).all()), (f"{name}: error {err.flatten()[worst]:.3g} > bound "
                                            f"{bound.flatten()[worst]:.3g} (got {got.flatten()[worst]:.8g}, "
                                            f"want {want.flatten()[worst]:.8g})")

    for field in ("loss", "losses", "chosen_rewards", "rejected_rewards", "margins"):
        check(field, getattr(fast, field), getattr(eager, field), getattr(oracle, field))
    for key in oracle_grads:
        check(f"d/d{key}", fast_grads[key], eager_grads[key], oracle_grads[key])
    for key in AUG_KEYS:
        if key in fast_grads:
            assert torch.equal(fast_grads[key], torch.zeros_like(fast_grads[key])), f"{key} got a gradient"
    return fast, fast_grads


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
    # Σ_k w_k·mean_i(weights_i·ℓ_k,i), from the oracle's single types
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
    want = loss_oracle.preference_loss(**tensors, **kwargs).loss
    torch.testing.assert_close(want, total, rtol=1e-12, atol=1e-12)


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
    """Half and double inputs: float32 arithmetic, results float32, gradients in the input dtype."""
    if backend == "triton" and dtype == torch.bfloat16 and torch.cuda.is_available() is False:
        pytest.skip("the Triton interpreter computes bf16 wrongly; checked on the GPU")
    tensors, kwargs = _case(["sigmoid", "ipo"], 500, dtype=dtype)
    out, grads = _run(fastpref.preference_loss, tensors, kwargs, _upstream(500), backend=backend)
    oracle, oracle_grads = _run(loss_oracle.preference_loss, tensors, kwargs, _upstream(500))
    assert out.loss.dtype == torch.float32 and grads["chosen_logps"].dtype == dtype
    torch.testing.assert_close(out.losses.double(), oracle.losses, rtol=1e-5, atol=1e-4)
    for key, grad in grads.items():
        torch.testing.assert_close(grad.double(), oracle_grads[key].double(), rtol=2e-2 if dtype != torch.float64 else 1e-5,
                                   atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sr_dpo_with_zero_lambda_is_sigmoid(backend):
    tensors, kwargs = _case("sr_dpo", 600)
    out, grads = _run(fastpref.preference_loss, tensors, {**kwargs, "refine_lambda": 0.0}, _upstream(600),
                      backend=backend)
    plain = {k: v for k, v in tensors.items() if not k.startswith("aug_")}
    want, want_grads = _run(fastpref.preference_loss, plain, {"loss_type": "sigmoid"}, _upstream(600),
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
    out, grads = _run(fastpref.preference_loss, tensors, kwargs, _upstream(800), backend=backend)
    for key in AUG_KEYS:
        assert torch.equal(grads[key], torch.zeros_like(grads[key]))
    shifted = {**tensors, "aug_chosen_logps": tensors["aug_chosen_logps"] + 5.0}
    out2, _ = _run(fastpref.preference_loss, shifted, kwargs, _upstream(800), backend=backend)
    assert not torch.allclose(out.losses, out2.losses)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rdpo_gradient_vanishes_at_soft_label(backend):
    """∂ℓ/∂z = σ(z) − τ: with τ = σ(βh) every pair's gradient is zero (to float32 rounding of z)."""
    tensors, kwargs = _case("rdpo", 900, ratio_scale=20.0)
    h = (tensors["chosen_logps"].double() - tensors["ref_chosen_logps"].double()
         - tensors["rejected_logps"].double() + tensors["ref_rejected_logps"].double())
    kwargs["tau"] = torch.sigmoid(0.1 * h).float()
    _, grads = _run(fastpref.preference_loss, tensors, kwargs, _upstream(900), backend=backend)
    for grad in grads.values():
        assert grad.abs().max() < 1e-6
    kwargs["tau"] = (kwargs["tau"] + 0.1).clamp(max=1.0)
    _, grads = _run(fastpref.preference_loss, tensors, kwargs, _upstream(900), backend=backend)
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


def test_kernel_codes_match_the_table():
    pytest.importorskip("triton")
    from fastpref.kernels.preference_loss import LOSS_CODES

    assert LOSS_CODES == {name: d.code for name, d in LOSS_DEFINITIONS.items()}


_COMPILE_SCRIPT = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from fastpref.kernels.preference_loss import LOSS_CODES, preference_loss_kernel as kernel

codes = tuple(LOSS_CODES.values())
names = kernel.arg_names
signature = {}
for name in names:
    if name.endswith("_ptr"):
        signature[name] = "*i64" if "rank" in name else "*fp32"
    elif name == "loss_weights":
        signature[name] = tuple("fp32" for _ in codes)
    else:
        signature[name] = "constexpr" if name.isupper() else ("i32" if name == "num_pairs" else "fp32")
for divergence, naive, present, backward in ((3, False, True, False), (2, True, False, True)):
    constants = dict(CODES=codes, DIVERGENCE=divergence, NAIVE=naive, HAS_REF=present, HAS_COUNTS=True,
                     HAS_AUG=present, HAS_TAU=True, HAS_OFFSET=present, HAS_WEIGHTS=present, HAS_SFT=True,
                     BACKWARD=backward, HAS_GRAD_LOSSES=present, BLOCK=256)
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
    from fastpref.losses import api

    def no_fused(*_args):
        raise AssertionError("FASTPREF_BACKEND=torch must not reach the compiled backends")

    monkeypatch.setattr(api, "run_fused", no_fused)
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

    tensors, kwargs = _case(["sigmoid", "sft", "sr_dpo"], 1200)
    leaves = {k: v.requires_grad_() for k, v in tensors.items()}
    with Count() as forward_ops:
        out = fastpref.preference_loss(**leaves, **kwargs, backend="cpp")
    with Count() as backward_ops:
        out.loss.backward()
    assert [op for op in forward_ops.ops if op != "aten.detach"] == ["fastpref.preference_loss_fwd"]
    assert [op for op in backward_ops.ops if op.startswith("fastpref")] == ["fastpref.preference_loss_bwd"], \
        backward_ops.ops


def test_compiled_ops_pass_opcheck():
    """torch.ops.fastpref.preference_loss_{fwd,bwd}: schema, fake kernels and dispatch (torch.library.opcheck)."""
    if "cpp" not in BACKENDS:
        pytest.skip("fastpref._C is not built")
    from fastpref.losses.fused import fused_problem
    from fastpref.losses.inputs import check_preference_loss_args

    tensors, kwargs = _case(["sigmoid", "aot", "sft"], 1250)
    problem = check_preference_loss_args(
        *tensors.values(), loss_type=kwargs["loss_type"], beta=0.1, loss_weights=[1.0, 0.5, 0.2],
        label_smoothing=kwargs["label_smoothing"], chosen_counts=kwargs["chosen_counts"],
        rejected_counts=kwargs["rejected_counts"], aug=(None,) * 4, refine_lambda=0.5, tau=None, offset=None,
        weights=None, simpo_gamma=0.5, discopop_tau=0.05, f_divergence_type="reverse_kl",
        f_alpha_divergence_coef=1.0, refinement="prompt")
    fused = fused_problem(problem, presort=False)
    settings = (list(fused.codes), list(fused.loss_weights), [0.1, 0.1, 0.5, 0.5, 0.05, 1.0, 80.0], 0, False)
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
    out, _ = _run(fastpref.preference_loss, tensors, kwargs, _upstream(1350), backend=backend)
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
