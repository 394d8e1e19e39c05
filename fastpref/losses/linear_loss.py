"""The trainable head with the loss known: :func:`linear_preference_loss` (hidden states → pair losses).

For pairs i = 1..B, the 2B sequences are laid out chosen first (sequence i is pair i's chosen response, B + i its
rejected one), as :func:`fastpref.linear_logps` rows with ``cu_seqlens``. The op returns
``preference_loss(logps[:B], logps[B:], ...)`` of ``logps = linear_logps(hidden, weight, labels, ...)``, and the
gradient of ``loss`` with respect to hidden, weight and bias. Two paths give the same values:

- **composed** (``path="composed"``): :func:`fastpref.linear_logps` then :func:`fastpref.preference_loss`, on any
  backend. The trainable head's backward recomputes the logits: 4 GEMM-equivalents (h·Wᵀ twice, dH, dW).
- **kept** (``path="kept"``, CPU, cpp extension): for a pair-local loss (ℓ_i depends on pair i only) the upstream
  gradient of each sequence's log-prob, ∂loss/∂logps_s = (1/B)·∂ℓ_i/∂logps_s, is known as soon as pair i's log-probs
  are. So the forward walks chunks of whole pairs, each chunk's logits kept in one tile (rows × V float32; float64
  for float64 inputs; at most ``memory_budget`` bytes): logits and log-probs (``kept_logits_fwd``), the chunk's
  pair losses and their derivatives (the cpp loss kernels), then in place G = g·(onehot − softmax), dH = G·W,
  dW += Gᵀ·H (``kept_logits_bwd``, csrc/kept_logits_cpu.cpp): 3 GEMM-equivalents, no recompute. The gradients are saved and
  the autograd backward only scales them by the upstream gradient of ``loss`` (as Liger's fused-linear losses do).
  Only ``loss`` carries a gradient on this path; the reference log-probs, τ, offsets and weights are constants.

``path="auto"`` takes the kept path where it was measured faster (see :func:`kept_path_wins`), else composed.
Refused on the kept path: batch-coupled loss types (aot, aot_unpaired sort the batch; sft is a batch mean) and the
refined ones (sr_dpo, sr_ipo read a second stream), named in the error.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from fastpref import _ext
from fastpref.backends import load_kernels
from fastpref.logps.api import linear_logps, output_dtype
from fastpref.logps.inputs import check_linear_logps_args
from fastpref.losses.api import preference_loss
from fastpref.losses.fused import fused_problem
from fastpref.losses.inputs import LossArguments, check_preference_loss_args

PATHS = ("auto", "kept", "composed")
DEFAULT_MEMORY_BUDGET = 64 << 20  # issue 11: at most 64 MiB of extra memory for the head
# Where benchmarks/bench_kept_logits_cpu.py measured the kept path at least 15% faster (see kept_path_wins).
KEPT_MIN_CHUNK_ROWS = 256
KEPT_MAX_VOCAB = 32768


class LinearPreferenceOutput(NamedTuple):
    """Result of :func:`linear_preference_loss`: the fields of :class:`fastpref.PreferenceLossOutput` (only ``loss``
    differentiable) and the policy's per-sequence log-probs ``chosen_logps``, ``rejected_logps`` [B] (detached)."""

    loss: torch.Tensor
    losses: torch.Tensor
    chosen_rewards: torch.Tensor
    rejected_rewards: torch.Tensor
    margins: torch.Tensor
    chosen_logps: torch.Tensor
    rejected_logps: torch.Tensor


def chunk_rows(pair_rows: int, vocab: int, memory_budget: int) -> int:
    """Rows of a chunk of whole pairs of `pair_rows` rows each whose float32 logits fit `memory_budget` (0 when not
    even one pair fits)."""
    return memory_budget // max(1, pair_rows * vocab * 4) * pair_rows


def kept_path_wins(rows: int, pairs: int, vocab: int, memory_budget: int, dtype: torch.dtype = torch.float32) -> bool:
    """The automatic rule, read off the measurements (docs/design.md): the kept path for float32/float64 inputs when
    V <= KEPT_MAX_VOCAB and a chunk (at the mean pair length) holds at least KEPT_MIN_CHUNK_ROWS rows. Not for
    fp16/bf16: the kept kernels upcast their tiles while the composed cpp path runs native bf16 GEMMs, so the saved
    GEMM no longer pays there (docs/design.md has the measurements). Each chunk rereads W and reads-writes
    dW (V·D elements), and its tile of rows × V logits streams through memory instead of staying in cache; short
    chunks and large vocabularies lose the saved GEMM to that traffic, long chunks at a 32k vocabulary save it
    outright."""
    pair_rows = -(-rows // max(pairs, 1))
    return (dtype in (torch.float32, torch.float64) and vocab <= KEPT_MAX_VOCAB
            and chunk_rows(pair_rows, vocab, memory_budget) >= KEPT_MIN_CHUNK_ROWS)


def _loss_arguments(chosen, rejected, settings: dict, counts=(None, None)) -> LossArguments:
    return LossArguments(chosen, rejected, chosen_counts=counts[0], rejected_counts=counts[1], **settings)


def _select(slice_: slice, value):
    return None if value is None else value[slice_]


def _greedy_chunks(pair_rows: list[int], limit: int) -> list[tuple[int, int]]:
    chunks, start, rows = [], 0, 0
    for p, pair in enumerate(pair_rows):
        if rows + pair > limit:
            chunks.append((start, p))
            start, rows = p, 0
        rows += pair
    return chunks + [(start, len(pair_rows))]


def _pair_chunks(cu: list[int], pairs: int, limit: int, vocab: int, memory_budget: int) -> list[tuple[int, int]]:
    """Chunks [p0, p1) of whole pairs of at most `limit` rows (the rows whose logits fit the budget): as few as
    greedy filling gives, with their rows evened out (no short last chunk, whose GEMMs would be narrow)."""
    pair_rows = [cu[p + 1] - cu[p] + cu[pairs + p + 1] - cu[pairs + p] for p in range(pairs)]
    for p, pair in enumerate(pair_rows):
        if pair > limit:
            raise ValueError(f"memory_budget={memory_budget} bytes cannot hold the logits of pair {p} ({pair} rows x "
                             f"V={vocab}): raise memory_budget or use path='composed'")
    greedy = _greedy_chunks(pair_rows, limit)
    even = _greedy_chunks(pair_rows, max([-(-sum(pair_rows) // len(greedy)), *pair_rows]))
    return even if len(even) == len(greedy) else greedy


class _KeptRun:
    """One kept-path evaluation: the chunk loop and its running gradients."""

    def __init__(self, rows, weight, bias, labels, token_weights, head, need_grads):
        self.rows, self.weight, self.bias, self.labels, self.token_weights = rows, weight, bias, labels, token_weights
        self.head = head  # (ignore_index, temperature, softcap)
        acc = output_dtype(rows.dtype)
        self.acc = acc
        self.dhidden = torch.zeros_like(rows, dtype=acc) if need_grads else rows.new_empty(0)
        self.dweight = torch.zeros(weight.shape, dtype=acc) if need_grads else rows.new_empty(0)
        self.dbias = torch.zeros(bias.shape, dtype=acc) if need_grads and bias is not None else None

    def gather(self, cu, pairs, p0, p1):
        spans = ((cu[p0], cu[p1]), (cu[pairs + p0], cu[pairs + p1]))
        index = torch.cat([torch.arange(a, b) for a, b in spans])
        lengths = torch.tensor([cu[s + 1] - cu[s] for s in (*range(p0, p1), *range(pairs + p0, pairs + p1))])
        return index, lengths

    def chunk_logps(self, index, lengths, tile):
        ignore_index, temperature, softcap = self.head
        labels = self.labels[index]
        token_logps, row_max, row_log_sum = torch.ops.fastpref.kept_logits_fwd(
            self.rows[index], self.weight, self.bias, labels, tile, ignore_index, temperature, softcap)
        row_weights = None if self.token_weights is None else self.token_weights[index].to(self.acc)
        weighted = token_logps if row_weights is None else token_logps * row_weights
        logps = torch.segment_reduce(weighted.double(), "sum", lengths=lengths, axis=0, unsafe=True).to(self.acc)
        segment = torch.repeat_interleave(torch.arange(lengths.shape[0]), lengths)
        counts = torch.zeros_like(lengths).index_add_(0, segment, (labels != ignore_index).long())
        return logps, counts, (labels, row_max, row_log_sum, row_weights)

    def chunk_backward(self, index, lengths, tile, state, grad_logps):
        ignore_index, temperature, softcap = self.head
        labels, row_max, row_log_sum, row_weights = state
        grad_rows = grad_logps.repeat_interleave(lengths)
        grad_rows = grad_rows if row_weights is None else grad_rows * row_weights
        dhidden = torch.ops.fastpref.kept_logits_bwd(
            self.rows[index], self.weight, self.bias, labels, tile, row_max, row_log_sum, grad_rows.contiguous(),
            self.dweight, self.dbias, ignore_index, temperature, softcap)
        self.dhidden[index] = dhidden


def _chunk_loss(kernels, chosen, rejected, counts, settings, p0, p1, pairs, need_grads):
    """The chunk's pair losses (forward outputs) and ∂loss/∂(chosen, rejected) with loss the mean over all pairs."""
    sliced = dict(settings)
    for name in ("ref_chosen_logps", "ref_rejected_logps", "tau", "offset", "weights"):
        sliced[name] = _select(slice(p0, p1), settings[name])
    problem = check_preference_loss_args(_loss_arguments(chosen, rejected, sliced, counts))
    fused = fused_problem(problem, presort=False)
    outputs = kernels.forward(fused)
    if not need_grads:
        return outputs, None
    dtype = fused.compute_dtype
    grad_losses = torch.full((p1 - p0,), 1.0 / pairs, dtype=dtype)
    grads = kernels.backward(fused, torch.zeros((), dtype=dtype), grad_losses)
    return outputs, grads[:2]


def _kept_forward(rows, weight, bias, labels, cu_seqlens, token_weights, head, settings, memory_budget, need_grads):
    cu = cu_seqlens.tolist()
    pairs = (len(cu) - 1) // 2
    weight = weight.contiguous()  # once, not per chunk
    vocab = weight.shape[0]
    run = _KeptRun(rows, weight, bias, labels, token_weights, head, need_grads)
    kernels = load_kernels("losses", "cpp")
    limit = memory_budget // (run.acc.itemsize * vocab)  # rows of logits in the budget
    chunks = _pair_chunks(cu, pairs, limit, vocab, memory_budget)
    tile = torch.empty(min(limit, rows.shape[0]) * vocab, dtype=run.acc)
    results = []
    for p0, p1 in chunks:
        index, lengths = run.gather(cu, pairs, p0, p1)
        logps, counts, state = run.chunk_logps(index, lengths, tile)
        b = p1 - p0
        outputs, grads = _chunk_loss(kernels, logps[:b], logps[b:], (counts[:b], counts[b:]), settings, p0, p1,
                                     pairs, need_grads)
        if need_grads:
            run.chunk_backward(index, lengths, tile, state, torch.cat(grads).to(run.acc))
        results.append((outputs[1:], logps[:b], logps[b:]))
    losses, chosen_rewards, rejected_rewards, margins = (torch.cat([r[0][k] for r in results]) for k in range(4))
    chosen = torch.cat([r[1] for r in results])
    rejected = torch.cat([r[2] for r in results])
    dbias = run.dbias if run.dbias is not None else rows.new_empty(0)
    return (losses.mean(), losses, chosen_rewards, rejected_rewards, margins, chosen, rejected, run.dhidden,
            run.dweight, dbias)


_SCALAR_NAMES = ("beta", "label_smoothing", "simpo_gamma", "discopop_tau", "f_alpha_divergence_coef")
_PAIR_NAMES = ("ref_chosen_logps", "ref_rejected_logps", "tau", "offset", "weights")


@torch.library.custom_op("fastpref::kept_preference_loss", mutates_args=())
def _kept_op(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, labels: torch.Tensor,
             cu_seqlens: torch.Tensor, token_weights: torch.Tensor | None, ref_chosen: torch.Tensor | None,
             ref_rejected: torch.Tensor | None, tau: torch.Tensor | None, offset: torch.Tensor | None,
             weights: torch.Tensor | None, loss_types: str, loss_weights: list[float], scalars: list[float],
             f_divergence_type: str, ignore_index: int, temperature: float, softcap: float, memory_budget: int,
             need_grads: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                        torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The kept path (module docstring): (loss, losses, chosen_rewards, rejected_rewards, margins, chosen_logps,
    rejected_logps, dhidden, dweight, dbias) with the gradients of ``loss`` in the accumulation dtype ([0] when not
    asked for / no bias).
    ``loss_types``: the loss type names joined by commas (a schema has no list of strings)."""
    settings = dict(zip(_SCALAR_NAMES, scalars), loss_type=loss_types.split(","), loss_weights=loss_weights or None,
                    f_divergence_type=f_divergence_type,
                    **dict(zip(_PAIR_NAMES, (ref_chosen, ref_rejected, tau, offset, weights))))
    return _kept_forward(rows, weight, bias, labels, cu_seqlens, token_weights, (ignore_index, temperature, softcap),
                         settings, memory_budget, need_grads)


@_kept_op.register_fake
def _kept_op_fake(rows, weight, bias, labels, cu_seqlens, token_weights, ref_chosen, ref_rejected, tau, offset,
                  weights, loss_types, loss_weights, scalars, f_divergence_type, ignore_index, temperature, softcap,
                  memory_budget, need_grads):
    acc = output_dtype(rows.dtype)
    pairs = rows.new_empty((cu_seqlens.shape[0] - 1) // 2, dtype=acc)
    grads = (torch.empty_like(rows, dtype=acc), torch.empty_like(weight, dtype=acc),
             torch.empty_like(bias, dtype=acc) if bias is not None else rows.new_empty(0)) if need_grads else (
        rows.new_empty(0), rows.new_empty(0), rows.new_empty(0))
    return (rows.new_empty((), dtype=acc), *(torch.empty_like(pairs) for _ in range(6)), *grads)


def _kept_setup(ctx, inputs, output):
    ctx.save_for_backward(*output[7:])
    ctx.has_bias = inputs[2] is not None
    ctx.dtype = inputs[0].dtype


def _kept_backward(ctx, grad_loss, *_unused):
    dhidden, dweight, dbias = ctx.saved_tensors
    if grad_loss is None:
        return (None,) * 20
    scale = grad_loss.to(dhidden.dtype)  # scaled in the accumulation dtype, then rounded once
    return ((dhidden * scale).to(ctx.dtype), (dweight * scale).to(ctx.dtype),
            (dbias * scale).to(ctx.dtype) if ctx.has_bias else None, *(None,) * 17)


_kept_op.register_autograd(_kept_backward, setup_context=_kept_setup)


def _kept_refusal(problem, loss_problem, settings) -> str | None:
    """Why the kept path cannot run here (None when it can)."""
    if problem.rows.device.type != "cpu" or _ext.extension() is None:
        return "it needs CPU tensors and the cpp extension"
    coupled = [d.name for d in loss_problem.definitions if d.kind != "pair" or d.refined]
    if coupled:
        return (f"loss_type {coupled} is not pair-local (a batch sort or batch mean, or a refinement stream)")
    grads = [name for name in ("ref_chosen_logps", "ref_rejected_logps")
             if settings[name] is not None and settings[name].requires_grad]
    if grads or (problem.token_weights is not None and problem.token_weights.requires_grad):
        return f"{grads or 'token_weights'} would need a gradient, which it does not give"
    return None


def _choose_path(path, memory_budget, problem, loss_problem, weight, settings) -> str:
    if path not in PATHS:
        raise ValueError(f"path must be one of {PATHS}, got {path!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget <= 0:
        raise ValueError(f"memory_budget must be a positive int (bytes), got {memory_budget!r}")
    if path == "composed":
        return path
    refusal = _kept_refusal(problem, loss_problem, settings)
    if path == "kept":
        if refusal is not None:
            raise ValueError(f"path='kept' of linear_preference_loss cannot run: {refusal}; use path='composed'")
        return path
    pairs = loss_problem.chosen.shape[0]
    wins = kept_path_wins(problem.rows.shape[0], pairs, weight.shape[0], memory_budget, weight.dtype)
    return "kept" if refusal is None and wins and weight.requires_grad else "composed"


def linear_preference_loss(hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor,
                           ref_chosen_logps: torch.Tensor | None = None, ref_rejected_logps: torch.Tensor | None = None,
                           *, cu_seqlens: torch.Tensor | None = None, bias: torch.Tensor | None = None,
                           ignore_index: int = -100, temperature: float = 1.0, softcap: float | None = None,
                           token_weights: torch.Tensor | None = None, loss_type: str | list[str] = "sigmoid",
                           beta: float = 0.1, loss_weights: list[float] | None = None, label_smoothing: float = 0.0,
                           tau: torch.Tensor | None = None, offset: torch.Tensor | None = None,
                           weights: torch.Tensor | None = None, simpo_gamma: float = 0.5, discopop_tau: float = 0.05,
                           f_divergence_type: str = "reverse_kl", f_alpha_divergence_coef: float = 0.5,
                           memory_budget: int = DEFAULT_MEMORY_BUDGET, path: str = "auto",
                           backend: str | None = None) -> LinearPreferenceOutput:
    """Preference loss of B pairs straight from hidden states: ``preference_loss(logps[:B], logps[B:], ref_*, ...)``
    with ``logps = linear_logps(hidden, weight, labels, ...)`` over 2B sequences (chosen first; counts from the
    labels), without [N, V] logits.

    The head arguments are :func:`fastpref.linear_logps`'s, the loss arguments :func:`fastpref.preference_loss`'s
    (the refined types excepted: no aug_* stream). ``path``: "kept" (3 GEMM-equivalents, logits of one chunk of whole
    pairs kept under ``memory_budget`` bytes; CPU, pair-local losses), "composed" (the two ops, 4 with a trainable
    head; ``backend`` picks theirs) or "auto" (kept where it was measured faster; see the module docstring).

    Returns :class:`LinearPreferenceOutput` (float64 for float64 inputs, else float32); only ``loss`` is
    differentiable, with respect to hidden, weight and bias (and, on the composed path, the reference log-probs).
    """
    problem, weight, bias = check_linear_logps_args(hidden, weight, labels, bias, ignore_index, temperature, softcap,
                                                    token_weights, cu_seqlens)
    sequences = problem.cu_seqlens.shape[0] - 1
    if sequences % 2:
        raise ValueError(f"cu_seqlens (or the batch of hidden) must hold 2B sequences, chosen then rejected, got "
                         f"{sequences}")
    settings = dict(ref_chosen_logps=ref_chosen_logps, ref_rejected_logps=ref_rejected_logps, loss_type=loss_type,
                    beta=beta, loss_weights=loss_weights, label_smoothing=label_smoothing, tau=tau, offset=offset,
                    weights=weights, simpo_gamma=simpo_gamma, discopop_tau=discopop_tau,
                    f_divergence_type=f_divergence_type, f_alpha_divergence_coef=f_alpha_divergence_coef)
    like = problem.rows.new_zeros(sequences // 2, dtype=output_dtype(problem.rows.dtype))
    loss_problem = check_preference_loss_args(_loss_arguments(like, like, settings, (like, like)))
    if _choose_path(path, memory_budget, problem, loss_problem, weight, settings) == "composed":
        return _composed(hidden, weight, labels, cu_seqlens, bias, problem, settings, backend)
    need_grads = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (hidden, weight, bias))
    names = ",".join(d.name for d in loss_problem.definitions)
    tokens = None if problem.token_weights is None else problem.token_weights.reshape(-1)
    out = _kept_op(problem.rows, weight, bias, problem.labels, problem.cu_seqlens, tokens,
                   *(settings[name] for name in _PAIR_NAMES), names, list(loss_problem.loss_weights),
                   [float(getattr(loss_problem.params, name)) for name in _SCALAR_NAMES], f_divergence_type,
                   problem.ignore_index, problem.temperature, problem.softcap or 0.0, memory_budget, need_grads)
    return LinearPreferenceOutput(out[0], *(t.detach() for t in out[1:7]))


def _composed(hidden, weight, labels, cu_seqlens, bias, problem, settings, backend) -> LinearPreferenceOutput:
    out = linear_logps(hidden, weight, labels, bias=bias, ignore_index=problem.ignore_index,
                       temperature=problem.temperature, softcap=problem.softcap, token_weights=problem.token_weights,
                       cu_seqlens=cu_seqlens, backend=backend)
    pairs = out.logps.shape[0] // 2
    res = preference_loss(out.logps[:pairs], out.logps[pairs:], chosen_counts=out.counts[:pairs],
                          rejected_counts=out.counts[pairs:], backend=backend, **settings)
    return LinearPreferenceOutput(res.loss, *(t.detach() for t in res[1:]), out.logps[:pairs].detach(),
                                  out.logps[pairs:].detach())
