"""Per-sequence log-probs of a causal LM's responses, computed by the fused head inside the model's own forward.

The model (the top-level module, so FSDP / DeepSpeed ZeRO-3 hooks fire and gather the lm_head weight) is
called as usual; for the duration of that call its output embedding module (``lm_head``) is replaced by a
function that gathers the final hidden states of the completion rows only (an index computed on the CPU by
the collator, so no host sync) and runs :func:`fastpref.linear_logps` on them, returning per-sequence log-probs
instead of logits. So no ``[rows, vocab]`` logits tensor is ever
built, and the log-probs leave the model as its ``logits`` output (FSDP's backward hooks sit on the outputs).

Gemma-2's ``final_logit_softcapping`` is applied inside the fused op (the model's own softcap is switched off
for the call); post-processing of logits that cannot move into the op (Cohere's ``logit_scale``, Granite's
``logits_scaling``) is refused by name. peft models work as they are: the adapters are active or disabled by
the caller (``with model.disable_adapter():`` gives the reference).

Rows: the collator's ``labels`` are already shifted (``labels[t]`` is the token that row t predicts, -100
where nothing is scored), so the kept rows are the positions with ``labels != -100``; :func:`kept_rows`
computes them (and the kept rows' per-sequence boundaries) on the CPU, in the collator, so the training step
has no host sync.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F

from fastpref.logps import IGNORE_INDEX, LogpsOutput, linear_logps, sequence_sums
from fastpref.logps.inputs import LogpsProblem

# Config attributes by which some architectures rescale logits after lm_head in ways the fused op does not mirror.
_UNSUPPORTED_LOGIT_POSTPROCESSING = ("logit_scale", "logits_scaling", "output_multiplier_scale")


@dataclass
class KeptRows:
    """The completion rows of a token stream, in stream order.

    index:      LongTensor [n] row-major positions of the kept rows in the stream's [batch, length] hidden states
                (for packed [1, L] input: stream positions; a row may appear twice, e.g. in a tree stream).
    labels:     LongTensor [n] the targets of the kept rows.
    cu_seqlens: LongTensor [S+1] boundaries of the S sequences among the kept rows.
    """

    index: torch.Tensor
    labels: torch.Tensor
    cu_seqlens: torch.Tensor


def kept_rows(labels: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> KeptRows:
    """The completion rows of packed ``labels`` [1, L] (with ``cu_seqlens`` [S+1]) or padded ``labels`` [S, T].

    Reads tensor values (``nonzero``): call it on CPU tensors (the collator does), not in the training step.
    """
    if labels.dim() != 2:
        raise ValueError(f"labels must be [1, L] (packed) or [S, T] (padded), got shape {tuple(labels.shape)}")
    scored = labels != IGNORE_INDEX
    if cu_seqlens is None:
        counts = scored.sum(dim=1)
        return KeptRows(index=scored.reshape(-1).nonzero().squeeze(1), labels=labels[scored],
                        cu_seqlens=F.pad(counts.cumsum(0), (1, 0)))
    if labels.shape[0] != 1:
        raise ValueError(f"packed labels must have shape [1, L], got {tuple(labels.shape)}")
    flat = scored[0]
    prefix = F.pad(flat.long().cumsum(0), (1, 0))
    cu = cu_seqlens.long()
    return KeptRows(index=flat.nonzero().squeeze(1), labels=labels[0][flat], cu_seqlens=prefix[cu] - prefix[cu[0]])


class StreamLogps(NamedTuple):
    """Per-sequence results of :func:`stream_logps`: ``logps`` [S] float32 (differentiable), ``counts`` [S] int64,
    ``wpo_log_weights`` [S] (no gradient) when asked: mean over the sequence's rows of log p_t − log Σ_v p_v²
    (WPO, arXiv 2406.11827, in TRL's form); ``token_stat_sums`` [3, S] float32 (no gradient) when asked: per
    sequence, Σ entropy, Σ mean logit and the number of rows whose target is the top-1 token, over its scored rows
    (unweighted; :class:`fastpref.logps.TokenStats`, from the same fused pass)."""

    logps: torch.Tensor
    counts: torch.Tensor
    wpo_log_weights: torch.Tensor | None = None
    token_stat_sums: torch.Tensor | None = None


def unwrap_causal_lm(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers ``PreTrainedModel`` inside DDP/FSDP/peft/accelerate wrappers."""
    inner = model
    while True:
        if hasattr(inner, "get_base_model") and callable(inner.get_base_model):  # peft
            inner = inner.get_base_model()
        elif isinstance(getattr(inner, "module", None), torch.nn.Module):  # DDP, FSDP1, DeepSpeed engines
            inner = inner.module
        else:
            return inner


def _output_head(causal_lm: torch.nn.Module) -> torch.nn.Linear:
    head = causal_lm.get_output_embeddings() if hasattr(causal_lm, "get_output_embeddings") else None
    if head is None:
        raise TypeError(f"{type(causal_lm).__name__} has no output embeddings (lm_head): not a causal LM")
    weight = getattr(head, "weight", None)
    if not isinstance(weight, torch.Tensor) or type(head).forward is not torch.nn.Linear.forward:
        raise TypeError(
            f"the lm_head of {type(causal_lm).__name__} is a {type(head).__name__}; the fused log-prob head needs "
            "a plain torch.nn.Linear (peft adapters or modules_to_save on lm_head are not supported)")
    return head


def _per_sequence_sums(values: torch.Tensor, rows: KeptRows) -> torch.Tensor:
    """Σ of per-row ``values`` [n] over each kept sequence (:func:`fastpref.logps.sequence_sums`)."""
    problem = LogpsProblem(rows=values[:, None], labels=rows.labels, token_weights=None, cu_seqlens=rows.cu_seqlens,
                           label_shape=rows.labels.shape, padded=False, ignore_index=IGNORE_INDEX, temperature=1.0,
                           softcap=None)
    return sequence_sums(values, problem)


@torch.no_grad()
def log_sum_sq_probs(hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None,
                     softcap: float | None, chunk_rows: int = 1024) -> torch.Tensor:
    """log Σ_v p_v² per row [n] (float32), for WPO weights only. Builds logits ``chunk_rows`` rows at a time (no
    gradient, never all rows at once): the one place outside the fused op where logits tiles exist."""
    out = []
    for rows in hidden.split(chunk_rows):
        logits = torch.nn.functional.linear(rows.float(), weight.float(), None if bias is None else bias.float())
        if softcap is not None:
            logits = softcap * torch.tanh(logits / softcap)
        out.append(torch.logsumexp(2 * torch.log_softmax(logits, dim=-1), dim=-1))
    return torch.cat(out) if out else hidden.new_zeros(0, dtype=torch.float32)


@contextlib.contextmanager
def _fused_head(causal_lm: torch.nn.Module, rows: KeptRows, token_weights: torch.Tensor | None,
                backend: str | None, holder: dict, wpo: bool, token_stats: bool = False):
    """Replace ``lm_head`` by the fused log-prob op (and switch the model's own softcap off) inside the block."""
    config = causal_lm.config
    for name in _UNSUPPORTED_LOGIT_POSTPROCESSING:
        value = getattr(config, name, None)
        if value not in (None, 1, 1.0):
            raise ValueError(f"{type(causal_lm).__name__} rescales its logits ({name}={value}); the fused log-prob "
                             "head does not support that post-processing")
    head = _output_head(causal_lm)
    softcap = getattr(config, "final_logit_softcapping", None)

    def fused_forward(hidden: torch.Tensor) -> torch.Tensor:
        hidden = hidden.reshape(-1, hidden.shape[-1]).index_select(0, rows.index)
        result = linear_logps(hidden, head.weight, rows.labels, bias=head.bias, softcap=softcap,
                              token_weights=token_weights, cu_seqlens=rows.cu_seqlens, return_token_logps=wpo,
                              return_token_stats=token_stats, backend=backend)
        holder["counts"] = result.counts
        if token_stats:
            stats = result.token_stats
            per_row = torch.stack([stats.entropy.float(), stats.mean_logits.float(), stats.is_top1.float()])
            holder["stats"] = torch.stack([_per_sequence_sums(values, rows) for values in per_row.detach()])
        if wpo:
            aligned = result.token_logps.detach() - log_sum_sq_probs(hidden, head.weight, head.bias, softcap)
            holder["wpo"] = _per_sequence_sums(aligned, rows) / result.counts.clamp(min=1)
        return result.logps

    head.forward = fused_forward
    if softcap is not None:
        config.final_logit_softcapping = None
    try:
        yield
    finally:
        del head.forward
        if softcap is not None:
            config.final_logit_softcapping = softcap


def stream_logps(model: torch.nn.Module, input_ids: torch.Tensor, rows: KeptRows, *,
                 position_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                 token_weights: torch.Tensor | None = None, wpo_weights: bool = False, token_stats: bool = False,
                 past_key_values=None, backend: str | None = None) -> StreamLogps:
    """Per-sequence log-probs of the kept rows of one token stream, through ``model``'s own forward.

    Packed input: ``input_ids``/``position_ids`` [1, L], ``attention_mask`` None (transformers isolates the packed
    sequences from the restarting position_ids), ``rows.index`` a LongTensor of positions. Padded input:
    ``input_ids``/``attention_mask`` [S, T], ``rows.index`` a bool [S, T] mask. ``token_weights`` [n] weight the
    kept rows (LD-DPO). ``past_key_values``: a cache the stream continues (a cached shared prefix, see
    :mod:`fastpref.model.prefix_kv`; pass the matching 4D ``attention_mask``). Returns :class:`StreamLogps`
    (``wpo_log_weights`` when ``wpo_weights``, ``token_stat_sums`` when ``token_stats``).
    """
    causal_lm = unwrap_causal_lm(model)
    holder: dict = {}
    with _fused_head(causal_lm, rows, token_weights, backend, holder, wpo_weights, token_stats):
        outputs = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                        cache=past_key_values, use_cache=False)
    logits = outputs["logits"] if isinstance(outputs, dict) else outputs.logits
    return StreamLogps(logps=logits.reshape(-1), counts=holder["counts"], wpo_log_weights=holder.get("wpo"),
                       token_stat_sums=holder.get("stats"))


def sequence_logps(model: torch.nn.Module, input_ids: torch.Tensor, position_ids: torch.Tensor,
                   labels: torch.Tensor, cu_seqlens: torch.Tensor, *, backend: str | None = None) -> LogpsOutput:
    """Per-sequence response log-probs of a packed stream (the collator's layout), no logits built.

    ``input_ids``, ``position_ids``, ``labels`` [1, L] (labels already shifted, -100 where nothing is scored),
    ``cu_seqlens`` [S+1]. Finding the completion rows reads ``labels`` (a host sync on CUDA); the trainer
    computes them in the collator instead and calls :func:`stream_logps`.
    """
    rows = kept_rows(labels.cpu(), cu_seqlens.cpu())
    device = input_ids.device
    rows = KeptRows(index=rows.index.to(device), labels=rows.labels.to(device),
                    cu_seqlens=rows.cu_seqlens.to(device))
    out = stream_logps(model, input_ids, rows, position_ids=position_ids, backend=backend)
    return LogpsOutput(logps=out.logps, counts=out.counts)
