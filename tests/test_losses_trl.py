"""fastpref.preference_loss agrees with TRL 1.16's own DPOTrainer loss code for its fifteen loss types.

TRL computes its loss inside ``DPOTrainer._compute_loss`` (no standalone function in 1.16). We call that method on
a bare trainer object carrying only the attributes it reads, with a stand-in model whose per-token log-probs are
a leaf tensor: the loss value and its gradient (with respect to the per-token log-probs, i.e. the sequence
log-probs) are TRL's own, for a batch of realistic random log-probs. The float64 oracle is checked the same way
("oracle" below), so the ground truth of tests/test_losses.py is TRL's for these types.
"""

from __future__ import annotations

from collections import defaultdict
from types import SimpleNamespace

import pytest
import torch
from conftest import available_backends

import fastpref
from fastpref.losses import TRL_LOSS_TYPES
from fastpref.losses import oracle as loss_oracle

trl_dpo = pytest.importorskip("trl.trainer.dpo_trainer")

BACKENDS = available_backends()


class _StandInModel:
    """Returns fixed per-token log-probs as TRL's fused-LM-head forward would."""

    training = True

    def __init__(self, token_logps: torch.Tensor):
        self.token_logps = token_logps

    def __call__(self, **_kwargs):
        zeros = torch.zeros_like(self.token_logps.detach())
        return SimpleNamespace(log_probs=self.token_logps, entropy=zeros, mean_logits=zeros,
                               is_top1=torch.zeros_like(zeros, dtype=torch.bool), log_sum_sq_probs=zeros)


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def gather_for_metrics(x):
        return x

    @staticmethod
    def gather(x):
        return x


def _trl_trainer(loss_types, loss_weights, beta, label_smoothing, f_divergence_type, f_alpha, model):
    trainer = trl_dpo.DPOTrainer.__new__(trl_dpo.DPOTrainer)
    trainer.__dict__.update(
        model=model, accelerator=_Accelerator(), aux_loss_enabled=False, ld_alpha=None, precompute_ref_logps=True,
        f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha, loss_types=list(loss_types),
        loss_weights=list(loss_weights), beta=beta, label_smoothing=label_smoothing, use_weighting=False,
        args=SimpleNamespace(discopop_tau=0.05), _metrics={"train": defaultdict(list), "eval": defaultdict(list)},
        _total_train_tokens=0, _tp_size=1,
    )
    return trainer


def _batch(num_pairs: int, seed: int, ratio_scale: float):
    """Per-token log-probs whose sums are realistic sequence log-probs, and TRL's input dict."""
    gen = torch.Generator().manual_seed(seed)
    rows = 2 * num_pairs
    prompt = torch.randint(1, 6, (rows,), generator=gen)
    counts = torch.randint(3, 40, (rows,), generator=gen)
    steps = int((prompt + counts).max())
    positions = torch.arange(steps)
    completion_mask = ((positions >= prompt[:, None]) & (positions < (prompt + counts)[:, None])).long()
    shift_mask = completion_mask[:, 1:].double()
    # values exactly representable in float32, so only the arithmetic differs between the two sides
    logps = (-5 - 295 * torch.rand(rows, generator=gen, dtype=torch.float64)).float().double()
    # per-token log-probs on the shifted completion rows, summing to logps (uneven split)
    raw = torch.rand(rows, steps - 1, generator=gen, dtype=torch.float64) * shift_mask
    token_logps = (raw / raw.sum(1, keepdim=True) * logps[:, None]).requires_grad_()
    ref = (logps + ratio_scale * torch.randn(rows, generator=gen, dtype=torch.float64)).float().double()
    inputs = {
        "input_ids": torch.ones(rows, steps, dtype=torch.long), "attention_mask": torch.ones(rows, steps),
        "completion_mask": completion_mask,
        "ref_chosen_logps": ref[:num_pairs], "ref_rejected_logps": ref[num_pairs:],
    }
    return token_logps, inputs, logps, ref, shift_mask


CASES = [([t], [1.0], {}) for t in TRL_LOSS_TYPES if t != "exo_pair"] + [
    (["robust"], [1.0], {"label_smoothing": 0.2}),
    (["exo_pair"], [1.0], {"label_smoothing": 1e-3}),
    (["aot"], [1.0], {"label_smoothing": 0.1}),
    (["aot_unpaired"], [1.0], {"label_smoothing": 0.3}),
    (["sigmoid", "sft"], [1.0, 0.7], {}),  # RPO
    (["sigmoid", "bco_pair", "sft"], [0.8, 0.2, 1.0], {}),  # MPO-style mix
    (["hinge", "ipo"], [1.0, 0.25], {"beta": 0.3}),
] + [
    ([t], [1.0], {"f_divergence_type": f, "f_alpha_divergence_coef": 0.5})
    for t in ("sigmoid", "sigmoid_norm", "hinge", "ipo", "robust", "discopop")
    for f in ("forward_kl", "js_divergence", "alpha_divergence")
]


@pytest.mark.parametrize("backend", [*BACKENDS, "oracle"])
@pytest.mark.parametrize("loss_types,loss_weights,options", CASES,
                         ids=lambda v: "+".join(v) if isinstance(v, list) and isinstance(v[0], str) else None)
def test_matches_trl_dpo_trainer(backend, loss_types, loss_weights, options):
    beta = options.get("beta", 0.1)
    eps = options.get("label_smoothing", 0.0)
    f_type = options.get("f_divergence_type", "reverse_kl")
    f_alpha = options.get("f_alpha_divergence_coef", 0.5)
    num_pairs = 9
    dtype = torch.float32 if f_type == "alpha_divergence" else torch.float64  # TRL 1.16 has no float64 clamp
    ratio_scale = 2.0 if f_type != "reverse_kl" else 20.0  # forward_kl's e^(−r) overflows for |r| ≫ 80
    token_logps, inputs, logps, ref, shift_mask = _batch(num_pairs, seed=len(loss_types) * 31 + len(CASES),
                                                     ratio_scale=ratio_scale)
    token_logps = token_logps.detach().to(dtype).requires_grad_()
    inputs["ref_chosen_logps"], inputs["ref_rejected_logps"] = ref[:num_pairs].to(dtype), ref[num_pairs:].to(dtype)
    trainer = _trl_trainer(loss_types, loss_weights, beta, eps, f_type, f_alpha, _StandInModel(token_logps))
    trl_loss = trainer._compute_loss(trainer.model, inputs, return_outputs=False)
    trl_loss.backward()
    # TRL's gradient is the same on every completion row of a sequence: the gradient of its log-prob sum
    counts = shift_mask.sum(1).long()
    trl_grad = (token_logps.grad.double() * shift_mask).sum(1) / counts

    policy = logps.float().requires_grad_()
    kwargs = {} if backend == "oracle" else {"backend": backend}
    loss_fn = loss_oracle.preference_loss if backend == "oracle" else fastpref.preference_loss
    out = loss_fn(
        policy[:num_pairs], policy[num_pairs:], ref[:num_pairs].float(), ref[num_pairs:].float(),
        loss_type=loss_types, loss_weights=loss_weights, beta=beta, label_smoothing=eps,
        chosen_counts=counts[:num_pairs], rejected_counts=counts[num_pairs:], f_divergence_type=f_type,
        f_alpha_divergence_coef=f_alpha, **kwargs)
    out.loss.backward()
    torch.testing.assert_close(out.loss.double(), trl_loss.detach().double(), rtol=2e-5, atol=2e-5)
    torch.testing.assert_close(policy.grad.double(), trl_grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(out.chosen_rewards.double(), beta * (logps[:num_pairs] - ref[:num_pairs]),
                               rtol=1e-5, atol=1e-5)
