"""Float64 oracles of :func:`fastpref.linear_logps` and :func:`fastpref.logits_logps`.

z = h·Wᵀ (+ b); z = c·tanh(z/c) if softcap c; z = z / T; log p_t = log_softmax(z_t)[y_t];
logps_s = Σ_{t∈s, y_t≠ignore} w_t · log p_t; counts_s = #{t∈s : y_t≠ignore}.
Inputs are upcast to float64 (gradients flow back to the originals); outputs are float64.
"""

from __future__ import annotations

import torch

from ..logps import LogpsOutput


def _sequence_index(label_shape: torch.Size, cu_seqlens: torch.Tensor | None, device) -> tuple[torch.Tensor, int]:
    if len(label_shape) == 2:
        batch, steps = label_shape
        return torch.arange(batch, device=device).repeat_interleave(steps), batch
    if cu_seqlens is None:
        return torch.zeros(label_shape[0], dtype=torch.int64, device=device), 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    return torch.arange(lengths.numel(), device=device).repeat_interleave(lengths), lengths.numel()


def logits_logps(logits, labels, *, ignore_index=-100, temperature=1.0, token_weights=None, cu_seqlens=None,
                 return_token_logps=False) -> LogpsOutput:
    z = logits.double().reshape(-1, logits.shape[-1]) / temperature
    flat = labels.reshape(-1).long()
    scored = flat != ignore_index
    logp_all = torch.log_softmax(z, dim=-1)
    token = torch.where(scored, logp_all.gather(1, flat.clamp(min=0)[:, None]).squeeze(1), torch.zeros_like(z[:, 0]))
    weights = torch.ones_like(token) if token_weights is None else token_weights.reshape(-1).double()
    seq, num = _sequence_index(labels.shape, cu_seqlens, logits.device)
    logps = torch.zeros(num, dtype=torch.float64, device=logits.device).index_add(0, seq, token * weights)
    counts = torch.zeros(num, dtype=torch.int64, device=logits.device).index_add(0, seq, scored.long())
    return LogpsOutput(logps, counts, token.view(labels.shape) if return_token_logps else None)


def linear_logps(hidden, weight, labels, *, bias=None, ignore_index=-100, temperature=1.0, softcap=None,
                 token_weights=None, cu_seqlens=None, return_token_logps=False) -> LogpsOutput:
    z = hidden.double() @ weight.double().T
    if bias is not None:
        z = z + bias.double()
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return logits_logps(z, labels, ignore_index=ignore_index, temperature=temperature,
                        token_weights=token_weights, cu_seqlens=cu_seqlens, return_token_logps=return_token_logps)
