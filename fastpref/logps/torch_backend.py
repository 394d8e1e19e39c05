"""Pure-PyTorch log-prob kernels: tiles of rows × vocabulary with an online log-sum-exp.

Works on any device and never holds an [N, V] tensor: at most ``ROW_BLOCK × VOCAB_BLOCK`` float32 logits at a
time. Scored rows are gathered first, so ignored rows cost no vocabulary work (on CUDA that gather is one
host sync; this backend is the portable fallback, the Triton one avoids it). Tiles are computed in float32
from upcast operands, so half-precision inputs get float32 accumulation.

Gradient of log p_t with respect to the (capped, tempered) logits z_t is onehot(y_t) − softmax(z_t); through
the temperature it is divided by T and through the softcap multiplied by 1 − tanh²(a/c), a the raw logit.
"""

from __future__ import annotations

import torch

from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels

ROW_BLOCK = 1024
VOCAB_BLOCK = 4096


def _scored_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


def _raw_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    logits = hidden.float() @ weight.float().T
    return logits if bias is None else logits + bias.float()


def _cap_and_temper(raw: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    z = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    return z / temperature


def _online_lse_and_target(tiles, labels: torch.Tensor, rows: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Consume (vocab_start, z tile [rows, v]) pairs; return (logsumexp, target logit) per row, float32."""
    running_max = torch.full((rows,), float("-inf"), device=device)
    running_sum = torch.zeros(rows, device=device)
    target = torch.zeros(rows, device=device)
    for start, z in tiles:
        tile_max = torch.maximum(running_max, z.max(dim=1).values)
        running_sum = running_sum * torch.exp(running_max - tile_max) + torch.exp(z - tile_max[:, None]).sum(1)
        running_max = tile_max
        local = labels - start
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        target = torch.where(inside, picked, target)
    return running_max + torch.log(running_sum), target


def _linear_tiles(hidden, weight, bias, temperature, softcap):
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        end = min(start + VOCAB_BLOCK, weight.shape[0])
        b = None if bias is None else bias[start:end]
        yield start, _cap_and_temper(_raw_logits(hidden, weight[start:end], b), temperature, softcap)


def _logits_tiles(logits, temperature):
    for start in range(0, logits.shape[1], VOCAB_BLOCK):
        yield start, logits[:, start:start + VOCAB_BLOCK].float() / temperature


def _forward(rows_tensor, labels, ignore_index, need_lse, tiles_of):
    n = rows_tensor.shape[0]
    token_logps = torch.zeros(n, device=rows_tensor.device)
    lse = torch.zeros(n if need_lse else 0, device=rows_tensor.device)
    scored = _scored_rows(labels, ignore_index)
    for chunk in scored.split(ROW_BLOCK):
        rows_lse, target = _online_lse_and_target(tiles_of(rows_tensor[chunk]), labels[chunk], chunk.numel(),
                                                  rows_tensor.device)
        token_logps[chunk] = target - rows_lse
        if need_lse:
            lse[chunk] = rows_lse
    return token_logps, lse


def linear_token_stats(head: LinearHead):
    """Entropy, log Σp², mean logit and top-1 flag per row of p = softmax(z) (see fastpref.logps.api.TokenStats),
    float32 [N] (bool for top-1), 0 / False at ignored rows, from one more pass of online tiles.

    Forms that stay accurate as p → one-hot: with m the running max, the rests r = Σ e^{z−m} − 1 and
    r₂ = Σ e^{2(z−m)} − 1 (every term but one maximal one, which is exactly 1) and A = Σ e^{z−m}·(m − z) ≥ 0,
    all rescaled as m grows: entropy = A / (1 + r) + log1p(r) (a sum of non-negative terms) and
    log Σp² = log1p(r₂) − 2·log1p(r)."""
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    n, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    entropy, log_sum_sq, mean_logits = (torch.zeros(n, device=device) for _ in range(3))
    is_top1 = torch.zeros(n, dtype=torch.bool, device=device)
    for chunk in _scored_rows(labels, head.ignore_index).split(ROW_BLOCK):
        rows = chunk.numel()
        m = torch.full((rows,), float("-inf"), device=device)
        rest, rest_sq, ent, total = (torch.zeros(rows, device=device) for _ in range(4))
        best_index = torch.zeros(rows, dtype=torch.int64, device=device)
        for start, z in _linear_tiles(hidden[chunk], weight, bias, head.temperature, head.softcap):
            tile_best, tile_index = z.max(dim=1)  # first index of the maximum within the tile
            grows = tile_best > m  # strict: an earlier tile keeps ties
            new_m = torch.maximum(m, tile_best)
            scale = torch.exp(m - new_m)
            shift = torch.where(torch.isinf(m), torch.zeros_like(m), new_m - m)
            e = torch.exp(z - new_m[:, None])
            drop = grows[:, None] & (torch.arange(z.shape[1], device=device)[None, :] == tile_index[:, None])
            kept = torch.where(drop, torch.zeros_like(e), e)
            ent = scale * (ent + shift * (1.0 + rest)) + (e * (new_m[:, None] - z)).sum(1)
            rest = torch.where(grows, (1.0 + rest) * scale, rest) + kept.sum(1)
            rest_sq = torch.where(grows, (1.0 + rest_sq) * scale ** 2, rest_sq) + (kept * kept).sum(1)
            m = new_m
            total += z.sum(1)
            best_index = torch.where(grows, tile_index + start, best_index)
        log_sum = torch.log1p(rest)
        entropy[chunk] = ent / (1.0 + rest) + log_sum
        log_sum_sq[chunk] = torch.log1p(rest_sq) - 2 * log_sum
        mean_logits[chunk] = total / vocab
        is_top1[chunk] = best_index == labels[chunk]
    return entropy, log_sum_sq, mean_logits, is_top1


def _grad_wrt_z(z, lse, labels, start, grad):
    """(onehot(y) − softmax(z)) · g for one tile, float32."""
    dz = -torch.exp(z - lse[:, None]) * grad[:, None]
    local = labels - start
    inside = (local >= 0) & (local < z.shape[1])
    dz[inside, local[inside]] += grad[inside]
    return dz


def _linear_backward(head: LinearHead, lse, grad_rows, wanted: GradsWanted):
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    temperature, softcap = head.temperature, head.softcap
    need_hidden, need_weight, need_bias = wanted
    device = hidden.device
    dh = torch.zeros(hidden.shape, device=device, dtype=torch.float32) if need_hidden else None
    dw = torch.zeros(weight.shape, device=device, dtype=torch.float32) if need_weight else None
    db = torch.zeros(weight.shape[0], device=device, dtype=torch.float32) if need_bias else None
    active = ((labels != head.ignore_index) & (grad_rows != 0)).nonzero().squeeze(1)
    for chunk in active.split(ROW_BLOCK):
        h = hidden[chunk].float()
        chunk_dh = torch.zeros_like(h) if need_hidden else None
        for start in range(0, weight.shape[0], VOCAB_BLOCK):
            end = min(start + VOCAB_BLOCK, weight.shape[0])
            w = weight[start:end].float()
            raw = _raw_logits(h, w, None if bias is None else bias[start:end])
            z = _cap_and_temper(raw, temperature, softcap)
            draw = _grad_wrt_z(z, lse[chunk], labels[chunk], start, grad_rows[chunk]) / temperature
            if softcap is not None:
                draw = draw * (1 - torch.tanh(raw / softcap) ** 2)
            if need_hidden:
                chunk_dh += draw @ w
            if need_weight:
                dw[start:end] += draw.T @ h
            if need_bias:
                db[start:end] += draw.sum(0)
        if need_hidden:
            dh[chunk] = chunk_dh
    return (None if dh is None else dh.to(hidden.dtype),
            None if dw is None else dw.to(weight.dtype),
            None if db is None else db.to(bias.dtype))


def _logits_backward(rows: LogitsRows, lse, grad_rows):
    logits, labels, ignore_index, temperature = rows.logits, rows.labels, rows.ignore_index, rows.temperature
    dlogits = torch.zeros_like(logits)
    active = ((labels != ignore_index) & (grad_rows != 0)).nonzero().squeeze(1)
    for chunk in active.split(ROW_BLOCK):
        for start in range(0, logits.shape[1], VOCAB_BLOCK):
            z = logits[chunk, start:start + VOCAB_BLOCK].float() / temperature
            dz = _grad_wrt_z(z, lse[chunk], labels[chunk], start, grad_rows[chunk]) / temperature
            dlogits[chunk, start:start + VOCAB_BLOCK] = dz.to(logits.dtype)
    return dlogits


class TorchKernels(LogpsKernels):
    """The portable backend: plain PyTorch tiles (see the module docstring). State saved for backward: the row
    log-sum-exp."""

    name = "torch"

    def linear_forward(self, head: LinearHead, wanted: GradsWanted):
        tiles = lambda h: _linear_tiles(h, head.weight, head.bias, head.temperature, head.softcap)  # noqa: E731
        token_logps, lse = _forward(head.hidden, head.labels, head.ignore_index, wanted.any, tiles)
        return token_logps, (lse,) if wanted.any else ()

    def linear_backward(self, head: LinearHead, state, grad_rows, wanted: GradsWanted):
        return _linear_backward(head, state[0], grad_rows, wanted)

    def logits_forward(self, rows: LogitsRows, need_grad: bool):
        tiles = lambda z: _logits_tiles(z, rows.temperature)  # noqa: E731
        token_logps, lse = _forward(rows.logits, rows.labels, rows.ignore_index, need_grad, tiles)
        return token_logps, (lse,) if need_grad else ()

    def logits_backward(self, rows: LogitsRows, state, grad_rows):
        return _logits_backward(rows, state[0], grad_rows)


KERNELS = TorchKernels()
