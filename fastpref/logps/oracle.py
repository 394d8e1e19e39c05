"""Float64 oracles of :func:`fastpref.linear_logps` and :func:`fastpref.logits_logps`.

z = h·Wᵀ (+ b); z = c·tanh(z/c) if softcap c; z = z / T; log p_t = log_softmax(z_t)[y_t];
logps_s = Σ_{t∈s, y_t≠ignore} w_t · log p_t; counts_s = #{t∈s : y_t≠ignore}.
Token statistics (when asked): entropy −Σ p log p, log Σ p², mean logit Σ z / V, top-1 = (argmax z == y), in
forms accurate near one-hot rows (entropy never negative).
Inputs are upcast to float64 (gradients flow back to the originals); outputs are float64.
"""

from __future__ import annotations

import torch

from fastpref.logps.api import LogpsOutput, TokenStats


def _sequence_index(label_shape: torch.Size, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    if len(label_shape) == 2:
        batch, steps = label_shape
        return torch.arange(batch, device=device).repeat_interleave(steps), batch
    if cu_seqlens is None:
        return torch.zeros(label_shape[0], dtype=torch.int64, device=device), 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.arange(lengths.numel(), device=device).repeat_interleave(lengths), lengths.numel()


def _token_stats(z: torch.Tensor, flat: torch.Tensor, scored: torch.Tensor, shape: torch.Size) -> TokenStats:
    """Statistics in forms that stay accurate as p → one-hot: with m = max z, e_v = e^(z_v − m),
    r = Σ_{v≠argmax} e_v and ℓ = log1p(r) = log Σ e_v,  entropy = ℓ + Σ_v e_v·(m − z_v) / (1 + r)  (both terms ≥ 0) and
    log Σp² = log1p(Σ_{v≠argmax} e_v²) − 2ℓ."""
    zero = torch.zeros_like(z[:, 0])
    top = z.argmax(-1, keepdim=True)
    shifted = z - z.gather(1, top)  # ≤ 0, exactly 0 at the argmax
    e = torch.exp(shifted)
    others = e.scatter(1, top, 0.0)
    log_sum = torch.log1p(others.sum(-1))
    spread = torch.where(e > 0, e * -shifted, 0.0).sum(-1) / (1 + others.sum(-1))
    entropy = log_sum + spread
    log_sum_sq = torch.log1p((others * others).sum(-1)) - 2 * log_sum
    return TokenStats(
        entropy=torch.where(scored, entropy, zero).view(shape),
        log_sum_sq_probs=torch.where(scored, log_sum_sq, zero).view(shape),
        mean_logits=torch.where(scored, z.mean(-1), zero).view(shape),
        is_top1=((top.squeeze(1) == flat) & scored).view(shape),
    )


def logits_logps(logits, labels, *, ignore_index=-100, temperature=1.0, token_weights=None, cu_seqlens=None,
                 return_token_logps=False, return_token_stats=False) -> LogpsOutput:
    z = logits.double().reshape(-1, logits.shape[-1]) / temperature
    flat = labels.reshape(-1).long()
    scored = flat != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    token = torch.where(scored, logp_all.gather(1, flat.clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(z[:, 0]))
    weights = torch.ones_like(token) if token_weights is None else token_weights.reshape(-1).double()
    seq, num = _sequence_index(labels.shape, cu_seqlens, logits.device)
    logps = torch.zeros(num, dtype=torch.float64, device=logits.device).index_add(0, seq, token * weights)
    counts = torch.zeros(num, dtype=torch.int64, device=logits.device).index_add(0, seq, scored.long())
    stats = _token_stats(z.detach(), flat, scored, labels.shape) if return_token_stats else None
    return LogpsOutput(logps, counts, token.view(labels.shape) if return_token_logps else None, stats)


def linear_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                 token_weights=None, cu_seqlens=None, return_token_logps=False,
                 return_token_stats=False) -> LogpsOutput:
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return logits_logps(z, labels, ignore_index=ignore_index, temperature=temperature,
                        token_weights=token_weights, cu_seqlens=cu_seqlens, return_token_logps=return_token_logps,
                        return_token_stats=return_token_stats)
