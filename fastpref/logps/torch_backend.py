"""Pure-PyTorch log-prob kernels: tiles of rows × vocabulary with an online softmax.

Works on any device and never holds an [N, V] tensor: at most ``ROW_BLOCK × VOCAB_BLOCK`` logits at a time.
Scored rows are gathered first, so ignored rows cost no vocabulary work (on CUDA that gather is one host sync;
this backend is the portable fallback, the Triton one avoids it). Tiles are computed in float32 from upcast
operands (float64 for float64 inputs), so half-precision inputs get float32 accumulation. Each row keeps its
maximum logit m and its log-sum ℓ = log Σ_v e^(z_v − m) apart, so log p_y = (z_y − m) − ℓ and
p_v = e^((z_v − m) − ℓ) are accurate to the dtype whatever |z| is (one log-sum-exp number would lose ulp(|z|)).

Gradient of log p_t with respect to the (capped, tempered) logits z_t is onehot(y_t) − softmax(z_t); through
the temperature it is divided by T and through the softcap multiplied by 1 − tanh²(a/c), a the raw logit.
The launches sit inside ``torch.library.custom_op``s (``torch.ops.fastpref.torch_*``) with fake
implementations, so ``torch.compile(fullgraph=True)`` traces them as single ops despite their data-dependent
row gathers.
"""

from __future__ import annotations

import torch
from torch import Tensor

from fastpref.logps.contract import GradsWanted, LinearHead, LogitsRows, LogpsKernels, absent_to_none

ROW_BLOCK = 1024
VOCAB_BLOCK = 4096


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 for every other float dtype."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _scored_rows(labels: torch.Tensor, ignore_index: int) -> torch.Tensor:
    return (labels != ignore_index).nonzero().squeeze(1)


def _raw_logits(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    acc = accumulation_dtype(hidden.dtype)
    logits = hidden.to(acc) @ weight.to(acc).T
    return logits if bias is None else logits + bias.to(acc)


def _cap_and_temper(raw: torch.Tensor, temperature: float, softcap: float | None) -> torch.Tensor:
    z = raw if softcap is None else softcap * torch.tanh(raw / softcap)
    return z / temperature


def _online_softmax_and_target(tiles, labels: Tensor, like: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Consume (vocab_start, z tile [rows, v]) pairs; return per row the max logit m, ℓ = log Σ e^(z − m) and the
    target logit, in the dtype of ``like``."""
    rows = labels.shape[0]
    running_max = like.new_full((rows,), float("-inf"))
    running_sum, target = like.new_zeros(rows), like.new_zeros(rows)
    for start, z in tiles:
        tile_max = torch.maximum(running_max, z.max(dim=1).values)
        running_sum = running_sum * torch.exp(running_max - tile_max) + torch.exp(z - tile_max[:, None]).sum(1)
        running_max = tile_max
        local = labels - start
        inside = (local >= 0) & (local < z.shape[1])
        picked = z.gather(1, local.clamp(0, z.shape[1] - 1)[:, None]).squeeze(1)
        target = torch.where(inside, picked, target)
    return running_max, torch.log(running_sum), target


def _linear_tiles(hidden, weight, bias, temperature, softcap):
    for start in range(0, weight.shape[0], VOCAB_BLOCK):
        end = min(start + VOCAB_BLOCK, weight.shape[0])
        b = None if bias is None else bias[start:end]
        yield start, _cap_and_temper(_raw_logits(hidden, weight[start:end], b), temperature, softcap)


def _logits_tiles(logits, temperature):
    acc = accumulation_dtype(logits.dtype)
    for start in range(0, logits.shape[1], VOCAB_BLOCK):
        yield start, logits[:, start:start + VOCAB_BLOCK].to(acc) / temperature


def _forward(rows_tensor, labels, ignore_index, need_state, tiles_of) -> tuple[Tensor, Tensor, Tensor]:
    """(token_logps [N], row max [N], row log-sum [N]); the last two are [0] unless ``need_state``."""
    n = rows_tensor.shape[0]
    like = rows_tensor.new_empty(0, dtype=accumulation_dtype(rows_tensor.dtype))
    token_logps = like.new_zeros(n)
    row_max, log_sum = like.new_zeros(n if need_state else 0), like.new_zeros(n if need_state else 0)
    for chunk in _scored_rows(labels, ignore_index).split(ROW_BLOCK):
        chunk_max, chunk_log_sum, target = _online_softmax_and_target(tiles_of(rows_tensor[chunk]), labels[chunk],
                                                                      like)
        token_logps[chunk] = (target - chunk_max) - chunk_log_sum
        if need_state:
            row_max[chunk], log_sum[chunk] = chunk_max, chunk_log_sum
    return token_logps, row_max, log_sum


def linear_token_stats(head: LinearHead):
    """Entropy, log Σp², mean logit and top-1 flag per row of p = softmax(z) (see fastpref.logps.api.TokenStats),
    float32 [N] (bool for top-1), 0 / False at ignored rows, from one more pass of online tiles (computed in the
    tiles' dtype: float64 for float64 inputs).

    Forms that stay accurate as p → one-hot: with m the running max, the rests r = Σ e^{z−m} − 1 and
    r₂ = Σ e^{2(z−m)} − 1 (every term but one maximal one, which is exactly 1) and A = Σ e^{z−m}·(m − z) ≥ 0,
    all rescaled as m grows: entropy = A / (1 + r) + log1p(r) (a sum of non-negative terms) and
    log Σp² = log1p(r₂) − 2·log1p(r)."""
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    n, vocab = hidden.shape[0], weight.shape[0]
    device, acc = hidden.device, accumulation_dtype(hidden.dtype)
    entropy, log_sum_sq, mean_logits = (torch.zeros(n, dtype=torch.float32, device=device) for _ in range(3))
    is_top1 = torch.zeros(n, dtype=torch.bool, device=device)
    for chunk in _scored_rows(labels, head.ignore_index).split(ROW_BLOCK):
        rows = chunk.numel()
        m = torch.full((rows,), float("-inf"), dtype=acc, device=device)
        rest, rest_sq, ent, total = (torch.zeros(rows, dtype=acc, device=device) for _ in range(4))
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
        entropy[chunk] = (ent / (1.0 + rest) + log_sum).float()
        log_sum_sq[chunk] = (torch.log1p(rest_sq) - 2 * log_sum).float()
        mean_logits[chunk] = (total / vocab).float()
        is_top1[chunk] = best_index == labels[chunk]
    return entropy, log_sum_sq, mean_logits, is_top1


def _grad_wrt_z(z, row_max, log_sum, labels, start, grad):
    """(onehot(y) − softmax(z)) · g for one tile, in z's dtype, with softmax(z) = e^((z − m) − ℓ)."""
    dz = -torch.exp((z - row_max[:, None]) - log_sum[:, None]) * grad[:, None]
    local = labels - start
    inside = (local >= 0) & (local < z.shape[1])
    return dz.scatter_add_(1, local.clamp(0, z.shape[1] - 1)[:, None], torch.where(inside, grad, 0)[:, None])


def _active_rows(labels: Tensor, ignore_index: int, grad_rows: Tensor) -> Tensor:
    """Scored rows with a nonzero upstream gradient: the only rows the backward does vocabulary work for."""
    return ((labels != ignore_index) & (grad_rows != 0)).nonzero().squeeze(1)


def _linear_backward(head: LinearHead, row_max, log_sum, grad_rows, wanted: GradsWanted):
    hidden, weight, bias, labels = head.hidden, head.weight, head.bias, head.labels
    temperature, softcap = head.temperature, head.softcap
    need_hidden, need_weight, need_bias = wanted
    acc = accumulation_dtype(hidden.dtype)
    dh = hidden.new_zeros(hidden.shape, dtype=acc) if need_hidden else None
    dw = hidden.new_zeros(weight.shape, dtype=acc) if need_weight else None
    db = hidden.new_zeros(weight.shape[0], dtype=acc) if need_bias else None
    grad_rows = grad_rows.to(acc)
    for chunk in _active_rows(labels, head.ignore_index, grad_rows).split(ROW_BLOCK):
        h = hidden[chunk].to(acc)
        chunk_dh = torch.zeros_like(h) if need_hidden else None
        for start in range(0, weight.shape[0], VOCAB_BLOCK):
            end = min(start + VOCAB_BLOCK, weight.shape[0])
            w = weight[start:end].to(acc)
            raw = _raw_logits(h, w, None if bias is None else bias[start:end])
            z = _cap_and_temper(raw, temperature, softcap)
            draw = _grad_wrt_z(z, row_max[chunk], log_sum[chunk], labels[chunk], start, grad_rows[chunk])
            draw = draw / temperature
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


def _logits_backward(rows: LogitsRows, row_max, log_sum, grad_rows):
    logits, labels, ignore_index, temperature = rows.logits, rows.labels, rows.ignore_index, rows.temperature
    acc = accumulation_dtype(logits.dtype)
    dlogits = torch.zeros_like(logits, memory_format=torch.contiguous_format)
    grad_rows = grad_rows.to(acc)
    for chunk in _active_rows(labels, ignore_index, grad_rows).split(ROW_BLOCK):
        for start in range(0, logits.shape[1], VOCAB_BLOCK):
            z = logits[chunk, start:start + VOCAB_BLOCK].to(acc) / temperature
            dz = _grad_wrt_z(z, row_max[chunk], log_sum[chunk], labels[chunk], start, grad_rows[chunk])
            dlogits[chunk, start:start + VOCAB_BLOCK] = (dz / temperature).to(logits.dtype)
    return dlogits


# The custom ops. A gradient not asked for comes back as an empty [0] tensor (see contract.absent_to_none).

def _rows_out(rows: Tensor, present: bool = True) -> Tensor:
    return rows.new_empty(rows.shape[0] if present else 0, dtype=accumulation_dtype(rows.dtype))


@torch.library.custom_op("fastpref::torch_linear_fwd", mutates_args=())
def _linear_fwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                   temperature: float, softcap: float | None, need_state: bool) -> tuple[Tensor, Tensor, Tensor]:
    tiles = lambda h: _linear_tiles(h, weight, bias, temperature, softcap)  # noqa: E731
    return _forward(hidden, labels, ignore_index, need_state, tiles)


@_linear_fwd_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap, need_state):
    return _rows_out(hidden), _rows_out(hidden, need_state), _rows_out(hidden, need_state)


@torch.library.custom_op("fastpref::torch_linear_bwd", mutates_args=())
def _linear_bwd_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, row_max: Tensor,
                   log_sum: Tensor, grad_rows: Tensor, ignore_index: int, temperature: float, softcap: float | None,
                   wanted: list[bool]) -> tuple[Tensor, Tensor, Tensor]:
    head = LinearHead(hidden, weight, bias, labels, ignore_index, temperature, softcap)
    grads = _linear_backward(head, row_max, log_sum, grad_rows, GradsWanted(*wanted))
    return tuple(hidden.new_empty(0) if grad is None else grad for grad in grads)


@_linear_bwd_op.register_fake
def _(hidden, weight, bias, labels, row_max, log_sum, grad_rows, ignore_index, temperature, softcap, wanted):
    like = (hidden, weight, bias if bias is not None else weight)
    return tuple(torch.empty_like(t, memory_format=torch.contiguous_format) if want else hidden.new_empty(0)
                 for t, want in zip(like, wanted))


@torch.library.custom_op("fastpref::torch_logits_fwd", mutates_args=())
def _logits_fwd_op(logits: Tensor, labels: Tensor, ignore_index: int, temperature: float,
                   need_state: bool) -> tuple[Tensor, Tensor, Tensor]:
    return _forward(logits, labels, ignore_index, need_state, lambda z: _logits_tiles(z, temperature))


@_logits_fwd_op.register_fake
def _(logits, labels, ignore_index, temperature, need_state):
    return _rows_out(logits), _rows_out(logits, need_state), _rows_out(logits, need_state)


@torch.library.custom_op("fastpref::torch_logits_bwd", mutates_args=())
def _logits_bwd_op(logits: Tensor, labels: Tensor, row_max: Tensor, log_sum: Tensor, grad_rows: Tensor,
                   ignore_index: int, temperature: float) -> Tensor:
    return _logits_backward(LogitsRows(logits, labels, ignore_index, temperature), row_max, log_sum, grad_rows)


@_logits_bwd_op.register_fake
def _(logits, labels, row_max, log_sum, grad_rows, ignore_index, temperature):
    return torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.custom_op("fastpref::torch_linear_stats", mutates_args=())
def _linear_stats_op(hidden: Tensor, weight: Tensor, bias: Tensor | None, labels: Tensor, ignore_index: int,
                     temperature: float, softcap: float | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    return linear_token_stats(LinearHead(hidden, weight, bias, labels, ignore_index, temperature, softcap))


@_linear_stats_op.register_fake
def _(hidden, weight, bias, labels, ignore_index, temperature, softcap):
    rows = hidden.shape[0]
    return (*(hidden.new_empty(rows, dtype=torch.float32) for _ in range(3)), hidden.new_empty(rows, dtype=torch.bool))


def traced_token_stats(head: LinearHead) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """:func:`linear_token_stats` as one op (``torch.ops.fastpref.torch_linear_stats``), so torch.compile traces
    it whole despite its data-dependent row gather."""
    return torch.ops.fastpref.torch_linear_stats(head.hidden, head.weight, head.bias, head.labels, head.ignore_index,
                                                 head.temperature, head.softcap)


class TorchKernels(LogpsKernels):
    """The portable backend: plain PyTorch tiles (see the module docstring). State saved for backward: the row
    maximum and the row log-sum. float64 inputs are computed, returned and differentiated in float64."""

    name = "torch"

    def grad_dtype(self, input_dtype: torch.dtype) -> torch.dtype:
        return accumulation_dtype(input_dtype)

    def linear_forward(self, head: LinearHead, wanted: GradsWanted):
        token_logps, *state = torch.ops.fastpref.torch_linear_fwd(head.hidden, head.weight, head.bias, head.labels,
                                                                  head.ignore_index, head.temperature, head.softcap,
                                                                  wanted.any)
        return token_logps, tuple(state) if wanted.any else ()

    def linear_backward(self, head: LinearHead, state, grad_rows, wanted: GradsWanted):
        grads = torch.ops.fastpref.torch_linear_bwd(head.hidden, head.weight, head.bias, head.labels, *state,
                                                    grad_rows, head.ignore_index, head.temperature, head.softcap,
                                                    list(wanted))
        return tuple(absent_to_none(grad, want) for grad, want in zip(grads, wanted))

    def logits_forward(self, rows: LogitsRows, need_grad: bool):
        token_logps, *state = torch.ops.fastpref.torch_logits_fwd(rows.logits, rows.labels, rows.ignore_index,
                                                                  rows.temperature, need_grad)
        return token_logps, tuple(state) if need_grad else ()

    def logits_backward(self, rows: LogitsRows, state, grad_rows):
        return torch.ops.fastpref.torch_logits_bwd(rows.logits, rows.labels, *state, grad_rows, rows.ignore_index,
                                                   rows.temperature)


KERNELS = TorchKernels()
