"""Property (fuzz) suite of fastpref.preference_loss: hypothesis draws whole calls and checks values and gradients
of every backend against the independent float64 oracle with the error rule of tests/test_losses.py.

Drawn: one to three loss types (repeats allowed) with loss_weights; B = 1, odd and even sizes; float32/float64;
log-prob magnitudes from realistic to large (−1e4), policies near or far from the reference; β; label smoothing
anywhere in the valid interval (edges such as ε → ½ for robust included); offsets, per-pair weights, token counts
(0 included), τ in [0, 1] (ends included), both refinement modes, the four f-divergences, reference-free calls;
non-uniform upstream gradients on loss and losses. The triton backend runs under the interpreter with small B
and is expected to refuse float64 with a TypeError.

Fixed seed (derandomized), bounded budget in CI; ``FASTPREF_FUZZ_EXAMPLES=N`` runs N examples per backend.
"""

from __future__ import annotations

import os

import pytest
import torch
from conftest import available_backends
from test_losses import AUG_KEYS, assert_matches_oracle

import fastpref
from fastpref.losses import LOSS_DEFINITIONS, LOSS_TYPES

hypothesis = pytest.importorskip("hypothesis")
st = hypothesis.strategies

BACKENDS = available_backends()
DEFAULT_EXAMPLES = {"torch": 60, "cpp": 60, "triton": 25}
F_DIVERGENCES = (("forward_kl", 0.5), ("js_divergence", 0.5), ("alpha_divergence", 0.5),
                 ("alpha_divergence", 1.7), ("alpha_divergence", 1.0))


def _examples(backend: str) -> int:
    return int(os.environ.get("FASTPREF_FUZZ_EXAMPLES", DEFAULT_EXAMPLES[backend]))


def _smoothing(draw, definitions) -> float:
    """ε inside every drawn type's interval (0 when none uses it), edges and near-edges favoured."""
    specs = [d.smoothing for d in definitions if d.smoothing is not None]
    if not specs:
        return 0.0
    low = max(s[0] for s in specs)
    high = min(s[1] for s in specs)
    low_open = any(s[0] == low and not s[2] for s in specs)
    high_open = any(s[1] == high and not s[3] for s in specs)
    lo = low + 1e-4 if low_open else low
    hi = high - 1e-4 if high_open else high
    return draw(st.sampled_from([lo, hi, (lo + hi) / 2]) | st.floats(lo, hi))


def _valid_combination(names) -> bool:
    """odpo requires an offset, which every other type of the call must then accept."""
    return "odpo" not in names or all(LOSS_DEFINITIONS[n].takes_offset or LOSS_DEFINITIONS[n].kind == "batch"
                                      for n in names)


def _logps(gen, num_pairs, scale, dtype):
    return (-scale * (0.02 + torch.rand(num_pairs, generator=gen, dtype=torch.float64))).to(dtype)


@st.composite
def loss_calls(draw, max_pairs: int):
    """(tensors, kwargs, upstream) of one valid preference_loss call."""
    names = draw(st.lists(st.sampled_from(LOSS_TYPES), min_size=1, max_size=3).filter(_valid_combination))
    definitions = [LOSS_DEFINITIONS[n] for n in names]
    num_pairs = draw(st.sampled_from([1, 2, 3, 7, 16, 17]) | st.integers(1, max_pairs))
    dtype = draw(st.sampled_from([torch.float32, torch.float64]))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    f_type, f_alpha = ("reverse_kl", 0.5)
    if all(d.f_divergence for d in definitions) and draw(st.booleans()):
        f_type, f_alpha = draw(st.sampled_from(F_DIVERGENCES))
    scale = draw(st.sampled_from([300.0, 1e4]))  # log-prob magnitude
    # policy-reference distance: near (f-divergences need |r| small enough for e^(±r)), moderate or far
    spread = draw(st.sampled_from([1e-3, 0.1, 3.0] if f_type != "reverse_kl" else [1e-3, 0.1, 3.0, 30.0, None]))
    chosen, rejected = _logps(gen, num_pairs, scale, dtype), _logps(gen, num_pairs, scale, dtype)
    tensors = {"chosen_logps": chosen, "rejected_logps": rejected}
    reference_free = draw(st.booleans())
    if not reference_free and spread is None:
        tensors["ref_chosen_logps"] = _logps(gen, num_pairs, scale, dtype)
        tensors["ref_rejected_logps"] = _logps(gen, num_pairs, scale, dtype)
    elif not reference_free:
        for key, policy in (("ref_chosen_logps", chosen), ("ref_rejected_logps", rejected)):
            noise = spread * torch.randn(num_pairs, generator=gen, dtype=torch.float64)
            tensors[key] = (policy.double() + noise).to(dtype)
    if reference_free and f_type != "reverse_kl":
        f_type = "reverse_kl"  # log-ratios are then the log-probs themselves: e^(−r) overflows
    kwargs = {"loss_type": names, "loss_weights": draw(st.lists(st.floats(0.1, 2.0), min_size=len(names),
                                                                max_size=len(names))),
              "beta": draw(st.sampled_from([0.01, 0.1, 1.0]) | st.floats(0.01, 10.0)),
              "label_smoothing": _smoothing(draw, definitions), "f_divergence_type": f_type,
              "f_alpha_divergence_coef": f_alpha}
    low_count = 1 if "sft" in names else 0
    kwargs["chosen_counts"] = torch.randint(low_count, 300, (num_pairs,), generator=gen)
    kwargs["rejected_counts"] = torch.randint(0, 300, (num_pairs,), generator=gen)
    if "rdpo" in names:
        tau = torch.rand(num_pairs, generator=gen, dtype=torch.float64)
        tau[: num_pairs // 3] = torch.tensor([0.0, 1.0] * num_pairs, dtype=torch.float64)[: num_pairs // 3]
        kwargs["tau"] = tau.to(dtype)
    if "odpo" in names or (all(d.takes_offset or d.kind == "batch" for d in definitions) and draw(st.booleans())):
        kwargs["offset"] = (3 * torch.randn(num_pairs, generator=gen, dtype=torch.float64)).to(dtype)
    if all(d.takes_weights for d in definitions) and draw(st.booleans()):
        kwargs["weights"] = (2 * torch.rand(num_pairs, generator=gen, dtype=torch.float64)).to(dtype)
    if any(d.refined for d in definitions):
        kwargs["refinement"] = draw(st.sampled_from(["prompt", "naive"]))
        kwargs["refine_lambda"] = draw(st.sampled_from([0.0, 0.5, 1.0]))
        if kwargs["refinement"] == "prompt":
            for key in AUG_KEYS:
                tensors[key] = _logps(gen, num_pairs, scale, dtype)
    if "simpo" in names:
        kwargs["simpo_gamma"] = draw(st.sampled_from([0.0, 0.5, 2.0]))
    if "discopop" in names:
        kwargs["discopop_tau"] = draw(st.sampled_from([0.05, 1.0]))
    upstream = (torch.tensor(draw(st.floats(-2.0, 2.0)), dtype=torch.float64),
                torch.randn(num_pairs, generator=gen, dtype=torch.float64))
    return tensors, kwargs, upstream


def _check(tensors, kwargs, upstream, backend):
    if backend == "triton" and tensors["chosen_logps"].dtype == torch.float64:
        with pytest.raises(TypeError, match="float32 only"):
            fastpref.preference_loss(**tensors, **kwargs, backend=backend)
        return
    assert_matches_oracle(tensors, kwargs, backend, upstream)


@pytest.mark.parametrize("backend", BACKENDS)
def test_preference_loss_fuzz(backend):
    max_pairs = 40 if backend == "triton" else 300
    settings = hypothesis.settings(max_examples=_examples(backend), deadline=None, derandomize=True, database=None,
                                   suppress_health_check=list(hypothesis.HealthCheck), print_blob=True)

    @settings
    @hypothesis.given(call=loss_calls(max_pairs))
    def run(call):
        _check(*call, backend)

    run()
