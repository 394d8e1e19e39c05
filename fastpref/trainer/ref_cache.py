"""Reference log-probs computed once per dataset and cached on disk (:class:`fastpref.trainer.ref_store.RefLogpsStore`).

One inference pass over the tokenized dataset computes the reference's per-sequence log-probs of every stream
the loss needs (``ref_chosen_logps``/``ref_rejected_logps`` for the plain pairs, ``aug_ref_…`` for the
refinement-prompt stream of Sr-DPO/Sr-IPO). They are stored under a fingerprint of everything that determines
them: the reference weights and config, the token ids of every pair (which fix the tokenizer, the truncation
and the refinement prompt), the per-token weights (LD-DPO's ``ld_alpha`` for fastpref's own collator; for any
other collator, the weights and targets it actually produces, :func:`collated_rows_fingerprint`) and the
stream. A later run (or epoch) with the same fingerprint loads them and runs no reference pass at all; the cache
directory's writability is checked before a pass whose result could not be saved.

Under DDP each process computes the batches of its shard (``accelerator.prepare`` of the dataloader) and the
results are gathered with ``accelerator.gather_for_metrics``; the main process writes the file.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections.abc import Callable

import torch
from torch.utils.data import DataLoader
from tqdm.auto import tqdm

from fastpref.trainer.ref_store import (RefLogpsStore, dataset_fingerprint, fingerprint, fingerprint_parts,
                                        tensors_digest)

CACHE_FORMAT = "fastpref-ref-logps-v1"
# The token columns that determine each stream's sequences.
STREAM_TOKEN_COLUMNS = {"": ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids"),
                        "aug_": ("aug_prompt_input_ids", "chosen_input_ids", "rejected_input_ids")}

logger = logging.getLogger(__name__)


def ref_columns(streams: tuple[str, ...]) -> tuple[str, ...]:
    """Dataset columns holding the reference log-probs of ``streams`` ("" plain, "aug_" refinement prompt)."""
    return tuple(f"{prefix}ref_{side}_logps" for prefix in streams for side in ("chosen", "rejected"))


def collated_rows_fingerprint(dataset, collator, stream: str, batch_size: int) -> str:
    """sha256 of what a collator makes of each pair's two scored sequences of ``stream``: the targets and the
    per-token weights (``{stream}kept_labels``, ``{stream}kept_token_weights``), pair by pair in dataset order, so
    independent of ``batch_size``. Runs the collator over the whole dataset (CPU work, no model)."""
    digest = hashlib.sha256()
    for batch in DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False):
        cu = batch[f"{stream}kept_cu_seqlens"].tolist()
        labels, weights = batch[f"{stream}kept_labels"], batch.get(f"{stream}kept_token_weights")
        pairs = (len(cu) - 1) // 2
        for pair in range(pairs):
            for s in (pair, pairs + pair):
                rows = slice(cu[s], cu[s + 1])
                digest.update(tensors_digest({"labels": labels[rows]} if weights is None else
                                             {"labels": labels[rows], "weights": weights[rows]}).encode())
    return digest.hexdigest()


def cache_fingerprint(reference_fp: str, dataset, stream: str, token_weights: str | float | None
                      ) -> tuple[str, dict[str, str]]:
    """Fingerprint (and its named parts) of the reference log-probs of ``dataset`` (tokenized) for ``stream``.

    ``token_weights``: what fixes the per-token weights — ``ld_alpha`` (None: unweighted) for fastpref's
    collator, else :func:`collated_rows_fingerprint`. Each stream is cached on its own, so a DPO run reuses the
    plain stream an Sr-DPO run computed."""
    token_view = dataset.select_columns(list(STREAM_TOKEN_COLUMNS[stream]))
    if not isinstance(token_weights, str):  # ld_alpha: 1 and 1.0 are one setting
        token_weights = -1.0 if token_weights is None else float(token_weights)
    parts = dict(format=CACHE_FORMAT, reference=reference_fp, tokens=dataset_fingerprint(token_view),
                 stream=stream or "plain", token_weights=token_weights)
    return fingerprint(**parts), fingerprint_parts(**parts)


def compute_reference_logps(dataset, collator, batch_size: int, accelerator,
                            stream_logps: Callable[[dict, str], torch.Tensor], streams: tuple[str, ...],
                            desc: str) -> dict[str, torch.Tensor]:
    """One no-grad pass over ``dataset``: ``{column: float32 [N]}`` in dataset order for :func:`ref_columns`.

    ``stream_logps(batch, prefix)`` returns the reference's [2B] log-probs (chosen first) of a device batch.
    """
    loader = accelerator.prepare(DataLoader(dataset, batch_size=batch_size, collate_fn=collator, shuffle=False))
    columns = ref_columns(streams)
    collected: dict[str, list[torch.Tensor]] = {name: [] for name in ("example_index", *columns)}
    disable = not accelerator.is_local_main_process or bool(os.environ.get("TQDM_DISABLE"))
    with torch.no_grad():
        for batch in tqdm(loader, desc=desc, disable=disable):
            values = {"example_index": batch["example_index"]}
            for prefix in streams:
                logps = stream_logps(batch, prefix).float()
                pairs = logps.numel() // 2
                values[f"{prefix}ref_chosen_logps"] = logps[:pairs]
                values[f"{prefix}ref_rejected_logps"] = logps[pairs:]
            gathered = accelerator.gather_for_metrics(values)
            for name, value in gathered.items():
                collected[name].append(value.cpu())
    order = torch.cat(collected.pop("example_index")).long()
    results = {}
    for name, parts in collected.items():
        column = torch.empty(len(dataset), dtype=torch.float32)
        column[order] = torch.cat(parts)
        results[name] = column
    return results


def load_or_compute(store: RefLogpsStore, fp: str, parts: dict[str, str], name: str,
                    compute: Callable[[], dict[str, torch.Tensor]], accelerator) -> dict[str, torch.Tensor]:
    """The tensors cached under (``name``, ``fp``), or ``compute()``'s, then saved by the main process. A cache of
    the same name with another fingerprint is recomputed or raises, per the store's ``on_mismatch``."""
    cached = store.load(fp, name=name, parts=parts)
    if cached is not None:
        logger.info(f"reference log-probs ({name}): reused from {store.cache_dir} ({_pairs(cached)} pairs)")
        return cached
    if accelerator.is_main_process:
        store.check_writable()  # before the pass, not after it
    tensors = compute()
    if accelerator.is_main_process:
        store.save(fp, tensors, name=name, parts=parts)
    accelerator.wait_for_everyone()
    logger.info(f"reference log-probs ({name}): computed ({_pairs(tensors)} pairs), cached in {store.cache_dir}")
    return tensors


def _pairs(tensors: dict[str, torch.Tensor]) -> int:
    return len(next(iter(tensors.values()))) if tensors else 0


def attach_columns(dataset, tensors: dict[str, torch.Tensor]):
    """``dataset`` with the reference log-prob columns added (replacing columns of the same name)."""
    for name, values in tensors.items():
        if name in dataset.column_names:
            dataset = dataset.remove_columns(name)
        dataset = dataset.add_column(name, values.tolist())
    return dataset
