"""Training metrics with TRL's keys, accumulated on the device: one ``.item()``-free update per micro-batch, one
gather and one host transfer per ``log`` call.

Keys: ``rewards/chosen``, ``rewards/rejected``, ``rewards/margins``, ``rewards/accuracies``, ``logps/chosen``,
``logps/rejected`` (TRL's meaning: per-pair means; rewards are β·(policy − reference)), and for Sr-DPO/Sr-IPO
``refine/delta_mean`` (mean Δ), ``refine/delta_accuracies`` (fraction of pairs with Δ > 0: the refinement
prompt's implicit reward ranks the chosen response first) and ``refine/logit_shift`` (mean λ·Δ, what the
refinement subtracts from the DPO logit). Listwise runs log ``rewards/mean``, ``rewards/top1_accuracies`` and
``rewards/pair_accuracies`` (:func:`listwise_metrics`).
Per token, as TRL 1.16 (from the policy pass's fused token statistics,
:class:`fastpref.logps.TokenStats`, no extra pass): ``entropy`` (mean over the completion tokens of both responses),
``logits/chosen`` and ``logits/rejected`` (mean over a response's tokens of the mean logit Σ_v z_v / V) and
``mean_token_accuracy`` (fraction of chosen tokens that are the top-1 prediction). ``num_tokens``: the training
tokens seen so far, prompt counted once per response (TRL's attention-mask count of [x, y_w] and [x, y_l]),
continued from the checkpoint's count on resume (:mod:`fastpref.trainer.checkpoints`)."""

from __future__ import annotations

import torch


def pair_metrics(loss_out, chosen_logps: torch.Tensor, rejected_logps: torch.Tensor,
                 delta: torch.Tensor | None, refine_lambda: float) -> dict[str, torch.Tensor]:
    """Per-pair metric values [B] (detached) of one micro-batch."""
    chosen_rewards = loss_out.chosen_rewards.detach().float()
    rejected_rewards = loss_out.rejected_rewards.detach().float()
    values = {
        "rewards/chosen": chosen_rewards,
        "rewards/rejected": rejected_rewards,
        "rewards/margins": chosen_rewards - rejected_rewards,
        "rewards/accuracies": (chosen_rewards > rejected_rewards).float(),
        "logps/chosen": chosen_logps.detach().float(),
        "logps/rejected": rejected_logps.detach().float(),
    }
    if delta is not None:
        delta = delta.detach().float()
        values["refine/delta_mean"] = delta
        values["refine/delta_accuracies"] = (delta > 0).float()
        values["refine/logit_shift"] = refine_lambda * delta
    return values


def listwise_metrics(rewards: torch.Tensor, scores: torch.Tensor, mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Listwise metric values: ``rewards/mean`` (per response), ``rewards/top1_accuracies`` (per row: the highest
    reward is on a best-scored response) and ``rewards/pair_accuracies`` (per ordered pair s_i > s_j: r_i > r_j)."""
    rewards = rewards.detach().float()
    top = rewards.masked_fill(~mask, float("-inf")).argmax(dim=1, keepdim=True)
    best = scores.masked_fill(~mask, float("-inf")).amax(dim=1, keepdim=True)
    ordered = (scores.unsqueeze(2) > scores.unsqueeze(1)) & mask.unsqueeze(2) & mask.unsqueeze(1)
    right = rewards.unsqueeze(2) > rewards.unsqueeze(1)
    return {"rewards/mean": rewards[mask], "rewards/top1_accuracies": (scores.gather(1, top) == best).float().squeeze(1),
            "rewards/pair_accuracies": right[ordered].float()}


def token_metrics(token_stat_sums: torch.Tensor, counts: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-token metrics of one micro-batch as (numerator, denominator) sums, from the policy stream's
    ``token_stat_sums`` [3, 2B] (Σ entropy, Σ mean logit, top-1 count per sequence, chosen first) and its scored
    rows per sequence ``counts`` [2B]."""
    pairs = counts.numel() // 2
    entropy, mean_logits, top1 = token_stat_sums.float()
    counts = counts.float()
    chosen_tokens, rejected_tokens = counts[:pairs].sum(), counts[pairs:].sum()
    return {
        "entropy": (entropy.sum(), counts.sum()),
        "logits/chosen": (mean_logits[:pairs].sum(), chosen_tokens),
        "logits/rejected": (mean_logits[pairs:].sum(), rejected_tokens),
        "mean_token_accuracy": (top1[:pairs].sum(), chosen_tokens),
    }


class MetricAccumulator:
    """Running per-key sums (device tensors) and pair counts (host ints: sizes need no device read) until
    :meth:`compute`; ratio keys (:meth:`update_ratios`) keep device denominators instead."""

    def __init__(self):
        self._sums: dict[str, torch.Tensor] = {}
        self._counts: dict[str, int] = {}
        self._denominators: dict[str, torch.Tensor] = {}

    def update_ratios(self, values: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Accumulate (numerator, denominator) sums: :meth:`compute` reports Σ numerators / Σ denominators."""
        for key, (numerator, denominator) in values.items():
            self._sums[key] = self._sums[key] + numerator if key in self._sums else numerator
            self._denominators[key] = (self._denominators[key] + denominator if key in self._denominators
                                       else denominator)

    def update(self, values: dict[str, torch.Tensor]) -> None:
        for key, value in values.items():
            total = value.sum()
            self._sums[key] = self._sums[key] + total if key in self._sums else total
            self._counts[key] = self._counts.get(key, 0) + value.numel()

    def compute(self, reduce_sum=None) -> dict[str, float]:
        """Means over every pair seen since the last call (across processes when ``reduce_sum`` sums a tensor
        over them, e.g. ``accelerator.reduce(t, "sum")``), then reset."""
        if not self._sums:
            return {}
        keys = sorted(self._sums)
        sums = torch.stack([self._sums[k].to(torch.float32) for k in keys])
        counts = torch.stack([self._denominators[k].to(sums) if k in self._denominators
                              else torch.tensor(float(self._counts[k]), dtype=sums.dtype, device=sums.device)
                              for k in keys])
        stacked = torch.stack([sums, counts])
        if reduce_sum is not None:
            stacked = reduce_sum(stacked)
        sums, counts = stacked.double().cpu().unbind(0)
        self._sums.clear()
        self._counts.clear()
        self._denominators.clear()
        return {key: float(total / count) for key, total, count in zip(keys, sums, counts, strict=True) if count > 0}
