"""End-to-end preference-optimization step: time (forward + backward + optimizer), tokens/s and peak memory.

Side by side in one run, per model shape, fine-tuning mode and length case:

    trl_dpo / trl_dpo_precomputed   TRL 1.16 DPOTrainer, loss "sigmoid", reference online / precomputed
    naive_sr_dpo                    four separate padded forwards (policy w/ and w/o grad on [x;y] and [p⊕x;y],
                                    reference online on both), full logits, log_softmax + gather
    fastpref_dpo                    one tree-packed stream per micro-batch, fused head, cached reference
    fastpref_sr_dpo                 + p's KV once per step and the augmented tree pass per micro-batch
    fastpref_sr_dpo_naive           Sr-DPO with Δ from the plain stream (refinement="naive"): no second pass

and the FLOP-model floor of each configuration: F = one measured policy forward (no grad) over the step's
tokens (every pair as [x;y_w] and [x;y_l]); DPO ≈ 2F with LoRA, 3F full fine-tune, 4F with gradient
checkpointing (cached reference); Sr-DPO adds 1F. Below the floor is possible: fastpref stores the prompt once.

    python benchmarks/bench_step_gpu.py                      # GPU: Qwen2.5-0.5B and Llama-3.2-1B shapes, bf16
    python benchmarks/bench_step_gpu.py --budget 120         # GPU check: Qwen2.5-0.5B shape, LoRA, 128/256
    python benchmarks/bench_step_gpu.py --smoke              # CPU: tiny model, every code path, seconds

``--budget SECONDS`` is the GPU check's plan: one configuration (Qwen2.5-0.5B shape, LoRA, prompt 128, both
responses 256), sdpa only (no flex-attention compiles), 3 timed steps after 1 warm-up, the methods of the target
ratios first (fastpref Sr-DPO, TRL DPO with precomputed reference, fastpref DPO, naive-Δ Sr-DPO, naive Sr-DPO),
and nothing new started once the budget is spent (those recorded as "skipped: budget"). Results are saved after
every method, so a time limit keeps what was measured.

Random-init models from configs (fastpref.data.tiny_models), token data from random text through the local tokenizer
(TRL needs strings). Results go to benchmarks/results/step_gpu.json (step_smoke.json with --smoke) and a PNG.
TRL is imported in a try/except: a missing TRL is recorded as such, not fatal; so is an out-of-memory.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import statistics
import sys
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import TrainingArguments

from fastpref import preference_loss
from fastpref.data.prompts import SR_DPO_REFINEMENT_PROMPT
from fastpref.model.head import KeptRows, stream_logps
from fastpref.data.tiny_models import build_model
from fastpref.model.prefix_kv import compute_prefix_kv, frozen_forward
from fastpref.data.tokenizer import build_tokenizer
from fastpref.model.tree_logps import augmented_tree_logps, tree_logps
from fastpref.model.tree_stream import attention_mask_for, build_tree_batch

BETA, REFINE_LAMBDA, LR = 0.1, 0.5, 1e-6
METHODS = ("trl_dpo", "trl_dpo_precomputed", "naive_sr_dpo", "fastpref_dpo", "fastpref_sr_dpo",
           "fastpref_sr_dpo_naive")
# Multiples of F of a DPO step with a cached reference; Sr-DPO adds one F (its no-grad augmented pass).
DPO_FLOOR = {"lora": 2, "full": 3, "full_gc": 4}
SR_METHODS = ("naive_sr_dpo", "fastpref_sr_dpo")


@dataclass(frozen=True)
class Case:
    name: str
    prompt_len: int
    chosen_len: int
    rejected_len: int


CASES = {"short": Case("short", 128, 256, 320), "long": Case("long", 1024, 256, 320),
         "p128r256": Case("p128r256", 128, 256, 256)}
# The GPU check's plan (--budget): the methods of issue 12's ratios first.
BUDGET_METHODS = ("fastpref_sr_dpo", "trl_dpo_precomputed", "fastpref_dpo", "fastpref_sr_dpo_naive", "naive_sr_dpo")
SMOKE_CASE = Case("smoke", 12, 9, 11)


@dataclass
class Pair:
    prompt: str
    chosen: str
    rejected: str
    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]


def make_pairs(tokenizer, case: Case, n: int, seed: int) -> list[Pair]:
    """Random text of about the case's lengths; ids are the text's tokens cut to the exact lengths (responses
    end with eos, as TRL appends it)."""
    g = torch.Generator().manual_seed(seed)
    first = len(tokenizer.all_special_ids) + 8
    eos = tokenizer.eos_token_id

    def text_ids(length: int) -> list[int]:
        raw = torch.randint(first, len(tokenizer), (length,), generator=g).tolist()
        ids = tokenizer(tokenizer.decode(raw), add_special_tokens=False)["input_ids"]
        return (ids + raw)[:length]

    pairs = []
    for _ in range(n):
        x, y_w, y_l = text_ids(case.prompt_len), text_ids(case.chosen_len - 1), text_ids(case.rejected_len - 1)
        pairs.append(Pair(tokenizer.decode(x), tokenizer.decode(y_w), tokenizer.decode(y_l), x, y_w + [eos],
                          y_l + [eos]))
    return pairs


def refinement_ids(tokenizer) -> list[int]:
    return tokenizer(SR_DPO_REFINEMENT_PROMPT + " ", add_special_tokens=False)["input_ids"]


# ----------------------------------------------------------------------------------------------- models

def build_lm(args, vocab_size: int, attn: str = "sdpa"):
    """The random-init model of ``args.model`` (seed 0, so every method starts from the same weights)."""
    torch.manual_seed(0)
    with args.device:  # initialized where it runs: a 0.5B-parameter init on the host would cost seconds per model
        overrides = getattr(args, "model_overrides", {})  # config fields changed (bench_step_cpu.py's model)
        model = build_model(args.model, vocab_size, **overrides).to(args.device, args.dtype)
    if attn != "sdpa":
        model.set_attn_implementation(attn)
    return model


# transformers renamed gradient checkpointing to activation checkpointing (the old names warn); the GPU image's
# older transformers has only the old names.
CHECKPOINTING_FIELD = ("activation_checkpointing" if "activation_checkpointing" in TrainingArguments.__dataclass_fields__
                       else "gradient_checkpointing")


def enable_checkpointing(model) -> None:
    if hasattr(model, "activation_checkpointing_enable"):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})


def build_policy(args, mode: str, vocab_size: int, attn: str = "sdpa"):
    model = build_lm(args, vocab_size, attn)
    if mode == "lora":
        from peft import LoraConfig, get_peft_model

        model = get_peft_model(model, LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    if mode == "full_gc":
        enable_checkpointing(model)
    model.train()
    return model


def build_reference(args, mode: str, policy, vocab_size: int, attn: str = "sdpa"):
    """LoRA: the policy with adapters disabled (returned as None); full fine-tune: a frozen copy."""
    if mode == "lora":
        return None
    ref = build_lm(args, vocab_size, attn).eval()
    ref.requires_grad_(False)
    return ref


def reference_context(policy, ref):
    """(model, context) computing the reference: the frozen copy, or the policy with its adapters off."""
    if ref is not None:
        return ref, contextlib.nullcontext()
    return policy, policy.disable_adapter()


def make_optimizer(args, model):
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=LR, fused=args.device.type == "cuda")


# ----------------------------------------------------------------------------------------------- fastpref

def tree_micro_batches(args, model, pairs: list[Pair], p_ids: list[int] | None):
    """Per micro-batch: the plain tree (+ mask) and, with ``p_ids``, the augmented tree after p (+ mask).

    Built on the CPU and moved once, as a collator would (the masks are part of the batch)."""
    batches = []
    for i in range(0, len(pairs), args.micro_batch):
        chunk = pairs[i:i + args.micro_batch]
        prompts = [pr.prompt_ids for pr in chunk]
        chosen, rejected = [pr.chosen_ids for pr in chunk], [pr.rejected_ids for pr in chunk]
        tree = build_tree_batch(prompts, chosen, rejected).to(args.device)
        entry = {"tree": tree, "mask": attention_mask_for(model, tree)}
        if p_ids is not None:
            aug = build_tree_batch(prompts, chosen, rejected, position_offset=len(p_ids)).to(args.device)
            entry.update(aug=aug, aug_mask=attention_mask_for(model, aug, prefix_length=len(p_ids)))
        batches.append(entry)
    return batches


def precompute_reference(args, policy, ref, batches, p_ids):
    """Reference log-probs (plain and, with p, augmented) once, as the precompute pass stores them."""
    model, context = reference_context(policy, ref)
    with context:
        prefix = compute_prefix_kv(model, p_ids) if p_ids is not None else None
        for b in batches:
            with frozen_forward(model):
                b["ref"] = tree_logps(model, b["tree"], attention_mask=b["mask"], backend=args.backend)
            if prefix is not None:
                b["aug_ref"] = augmented_tree_logps(model, b["aug"], prefix, attention_mask=b["aug_mask"],
                                                    backend=args.backend)


def fastpref_step(args, policy, optimizer, batches, method: str, p_ids):
    def step():
        prefix = compute_prefix_kv(policy, p_ids) if method == "fastpref_sr_dpo" else None  # once per step
        for b in batches:
            extra = {}
            if method == "fastpref_sr_dpo":
                aug = augmented_tree_logps(policy, b["aug"], prefix, attention_mask=b["aug_mask"],
                                           backend=args.backend)
                extra = dict(aug_chosen_logps=aug.chosen_logps, aug_rejected_logps=aug.rejected_logps,
                             aug_ref_chosen_logps=b["aug_ref"].chosen_logps,
                             aug_ref_rejected_logps=b["aug_ref"].rejected_logps)
            elif method == "fastpref_sr_dpo_naive":
                extra = dict(refinement="naive")
            out = tree_logps(policy, b["tree"], attention_mask=b["mask"], backend=args.backend)
            loss = preference_loss(out.chosen_logps, out.rejected_logps, b["ref"].chosen_logps.clone(),
                                   b["ref"].rejected_logps.clone(), beta=BETA, refine_lambda=REFINE_LAMBDA,
                                   loss_type="sigmoid" if method == "fastpref_dpo" else "sr_dpo", **extra).loss
            (loss / len(batches)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------------------------- naive Sr-DPO

def padded(sequences: list[list[int]], responses: list[list[int]], device, pad_id: int):
    """Right-padded input_ids, attention_mask and the (shifted) response-label matrix."""
    length = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), length), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    labels = torch.full_like(ids, -100)
    for i, (seq, resp) in enumerate(zip(sequences, responses)):
        ids[i, :len(seq)] = torch.tensor(seq)
        mask[i, :len(seq)] = 1
        start = len(seq) - len(resp)
        labels[i, start - 1:len(seq) - 1] = torch.tensor(resp)
    return ids.to(device), mask.to(device), labels.to(device)


def full_logits_logps(model, ids, mask, labels) -> torch.Tensor:
    """Σ log p over response tokens per row from the model's full logits (what a plain trainer does)."""
    logits = model(input_ids=ids, attention_mask=mask, use_cache=False).logits.float()
    logp = torch.log_softmax(logits, dim=-1).gather(-1, labels.clamp(min=0)[..., None])[..., 0]
    return (logp * (labels != -100)).sum(-1)


def naive_sr_dpo_step(args, policy, ref, optimizer, pairs: list[Pair], p_ids, pad_id: int):
    chunks = []
    for i in range(0, len(pairs), args.micro_batch):
        chunk = pairs[i:i + args.micro_batch]
        resp = [pr.chosen_ids for pr in chunk] + [pr.rejected_ids for pr in chunk]
        plain = [pr.prompt_ids + r for pr, r in zip(chunk + chunk, resp)]
        aug = [p_ids + pr.prompt_ids + r for pr, r in zip(chunk + chunk, resp)]
        chunks.append((padded(plain, resp, args.device, pad_id), padded(aug, resp, args.device, pad_id)))

    def step():
        for plain, aug in chunks:
            b = plain[0].shape[0] // 2
            ref_model, context = reference_context(policy, ref)  # a fresh context each time (peft's is one-shot)
            with torch.no_grad():
                with context:
                    ref_plain = full_logits_logps(ref_model, *plain)
                    ref_aug = full_logits_logps(ref_model, *aug)
                pol_aug = full_logits_logps(policy, *aug)
            pol = full_logits_logps(policy, *plain)
            h = (pol[:b] - ref_plain[:b]) - (pol[b:] - ref_plain[b:])
            delta = BETA * ((pol_aug[:b] - ref_aug[:b]) - (pol_aug[b:] - ref_aug[b:]))
            loss = -F.logsigmoid(BETA * h - REFINE_LAMBDA * delta).mean()
            (loss / len(chunks)).backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    return step


# ----------------------------------------------------------------------------------------------- TRL

class _StepTimer:
    """TrainerCallback recording each optimizer step's wall time (synchronized)."""

    def __init__(self, device):
        self.device, self.times, self._start = device, [], 0.0

    def _sync(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize()

    def on_step_begin(self, args, state, control, **kwargs):
        self._sync()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        self._sync()
        self.times.append(time.perf_counter() - self._start)


def run_trl(args, mode: str, pairs: list[Pair], tokenizer, vocab_size: int, precompute: bool, out_dir: str):
    """Median step seconds of TRL's DPOTrainer (sigmoid) and its peak memory; raises ImportError without TRL."""
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import DPOConfig, DPOTrainer

    timer_cls = type("StepTimer", (_StepTimer, TrainerCallback), {})
    timer = timer_cls(args.device)
    policy = build_lm(args, vocab_size)
    data = Dataset.from_list([{"prompt": p.prompt, "chosen": p.chosen, "rejected": p.rejected} for p in pairs]
                             * (args.warmup + args.steps))
    peft_config = None
    if mode == "lora":
        from peft import LoraConfig

        peft_config = LoraConfig(r=16, lora_alpha=32, lora_dropout=0.0, target_modules=[
            "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"])
    config = DPOConfig(output_dir=out_dir, loss_type=["sigmoid"], beta=BETA, learning_rate=LR,
                       per_device_train_batch_size=args.micro_batch,
                       gradient_accumulation_steps=max(1, args.pairs // args.micro_batch),
                       max_steps=args.warmup + args.steps, precompute_ref_log_probs=precompute,
                       **{CHECKPOINTING_FIELD: mode == "full_gc"}, bf16=args.dtype == torch.bfloat16,
                       use_cpu=args.device.type != "cuda", report_to="none", save_strategy="no",
                       logging_steps=10_000, max_length=None, dataset_num_proc=None, disable_dropout=True,
                       dataloader_num_workers=0)
    ref = None if mode == "lora" else build_lm(args, vocab_size)
    trainer = DPOTrainer(model=policy, ref_model=ref, args=config, train_dataset=data, processing_class=tokenizer,
                         peft_config=peft_config, callbacks=[timer])
    reset_peak()
    trainer.train()
    times = timer.times[args.warmup:]
    return statistics.median(times), peak_gib()


# ----------------------------------------------------------------------------------------------- timing

def reset_peak():
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()


def peak_gib() -> float | None:
    return torch.cuda.max_memory_allocated() / 2**30 if torch.cuda.is_available() else None


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(args, step: Callable[[], None]) -> tuple[float, float | None]:
    """Median seconds of ``args.steps`` calls after ``args.warmup``, and the peak memory over all of them."""
    reset_peak()
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        sync(args.device)
        start = time.perf_counter()
        step()
        sync(args.device)
        times.append(time.perf_counter() - start)
    return statistics.median(times), peak_gib()


def forward_time(args, policy, pairs: list[Pair]) -> float:
    """F: one no-grad policy forward over the step's tokens ([x;y_w] and [x;y_l] per pair, packed), fused head."""
    micro = []
    for i in range(0, len(pairs), args.micro_batch):
        chunk = pairs[i:i + args.micro_batch]
        seqs = [(p.prompt_ids, y) for p in chunk for y in (p.chosen_ids,)] + \
               [(p.prompt_ids, p.rejected_ids) for p in chunk]
        ids, pos, index, labels, counts, start = [], [], [], [], [], 0
        for x, y in seqs:
            ids += x + y
            pos += list(range(len(x) + len(y)))
            index += list(range(start + len(x) - 1, start + len(x) + len(y) - 1))
            labels += y
            counts.append(len(y))
            start += len(x) + len(y)
        cu = F.pad(torch.tensor(counts).cumsum(0), (1, 0))
        rows = KeptRows(index=torch.tensor(index, device=args.device), labels=torch.tensor(labels, device=args.device),
                        cu_seqlens=cu.to(args.device))
        micro.append((torch.tensor([ids], device=args.device), torch.tensor([pos], device=args.device), rows))

    def forward():
        with frozen_forward(policy):
            for ids, pos, rows in micro:
                stream_logps(policy, ids, rows, position_ids=pos, backend=args.backend)
    return time_steps(args, forward)[0]


def step_tokens(pairs: list[Pair]) -> int:
    """Tokens of a step as every DPO trainer counts them: Σ |x|+|y_w| + |x|+|y_l|."""
    return sum(2 * len(p.prompt_ids) + len(p.chosen_ids) + len(p.rejected_ids) for p in pairs)


def is_oom(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or "out of memory" in str(error).lower()


def free_memory():
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def tree_agreement(args, policy, batches, pairs: list[Pair], p_ids: list[int], pad_id: int) -> dict:
    """Largest |tree − separate| of per-sequence log-probs on the first micro-batch (plain and augmented), the
    separate ones from full logits of padded sequences: the tree masks checked on the device they are timed on."""
    chunk = pairs[:args.micro_batch]
    responses = [p.chosen_ids for p in chunk] + [p.rejected_ids for p in chunk]
    found = {}
    with frozen_forward(policy):
        prefix = compute_prefix_kv(policy, p_ids)
        tree = tree_logps(policy, batches[0]["tree"], attention_mask=batches[0]["mask"], backend=args.backend)
        aug = augmented_tree_logps(policy, batches[0]["aug"], prefix, attention_mask=batches[0]["aug_mask"],
                                   backend=args.backend)
        for name, fast, prompt in (("plain", tree, []), ("aug", aug, p_ids)):
            sequences = [prompt + p.prompt_ids + r for p, r in zip(chunk + chunk, responses)]
            slow = full_logits_logps(policy, *padded(sequences, responses, args.device, pad_id))
            both = torch.cat([fast.chosen_logps, fast.rejected_logps]).float()
            found[f"max_abs_diff_{name}"] = (both - slow).abs().max().item()
    found["mean_abs_logps"] = slow.abs().mean().item()
    return found


def run_method(args, method: str, attn: str, mode: str, pairs: list[Pair], p_ids: list[int], tokenizer,
               vocab_size: int, out_dir: str) -> dict:
    """step_ms-related fields of one method (models built here and freed on return)."""
    if method.startswith("trl_"):
        step_s, peak = run_trl(args, mode, pairs, tokenizer, vocab_size, method == "trl_dpo_precomputed", out_dir)
        return dict(step_s=step_s, peak_mem_gib=peak)
    policy = build_policy(args, mode, vocab_size, attn)  # the same initial weights for every method
    ref = build_reference(args, mode, policy, vocab_size, attn)
    optimizer = make_optimizer(args, policy)
    extra = {}
    if method == "naive_sr_dpo":
        step = naive_sr_dpo_step(args, policy, ref, optimizer, pairs, p_ids, tokenizer.pad_token_id)
    else:
        uses_aug = method == "fastpref_sr_dpo"
        batches = tree_micro_batches(args, policy, pairs, p_ids if uses_aug else None)
        precompute_reference(args, policy, ref, batches, p_ids if uses_aug else None)
        if uses_aug and args.check_agreement:
            extra = tree_agreement(args, policy, batches, pairs, p_ids, tokenizer.pad_token_id)
        step = fastpref_step(args, policy, optimizer, batches, method, p_ids)
    step_s, peak = time_steps(args, step)
    return dict(step_s=step_s, peak_mem_gib=peak, **extra)


def budget_spent(args) -> bool:
    return args.budget is not None and time.time() - args.started > args.budget


def run_configuration(args, mode: str, case: Case, tokenizer, vocab_size: int, out_dir: str,
                      save: Callable[[list[dict]], None] = lambda records: None,
                      forward_s: float | None = None) -> list[dict]:
    """One record per method (and attention) of this configuration; `save` gets the records after each.
    ``forward_s``: F measured before (a repeated configuration), else measured here."""
    pairs = make_pairs(tokenizer, case, args.pairs, seed=1)
    p_ids = refinement_ids(tokenizer)
    tokens = step_tokens(pairs)
    base = dict(model=args.model, mode=mode, case=case.name, prompt_len=case.prompt_len,
                chosen_len=case.chosen_len, rejected_len=case.rejected_len, pairs=args.pairs,
                micro_batch=args.micro_batch, dtype=str(args.dtype).replace("torch.", ""), step_tokens=tokens,
                config=f"{args.model}/{mode}/{case.name}")
    f_s = forward_s if forward_s is not None else forward_time(args, build_policy(args, mode, vocab_size), pairs)
    free_memory()
    records = []
    runs = [(method, attn) for method in args.methods
            for attn in (args.attn if method.startswith("fastpref") else ["sdpa"])]
    for method, attn in runs:
        floor_s = (DPO_FLOOR[mode] + (method in SR_METHODS)) * f_s
        label = method if attn == "sdpa" else f"{method}[{attn.replace('_attention', '')}]"
        record = dict(base, method=label, attn=attn, F_ms=1e3 * f_s, floor_ms=1e3 * floor_s, step_ms=None,
                      tokens_per_s=None, peak_mem_gib=None, step_over_floor=None, status="ok")
        if budget_spent(args):
            record["status"] = f"skipped: budget of {args.budget:.0f} s spent"
            records.append(record)
            save(records)
            print(f"{record['config']:<40} {label:<26} {record['status']}", flush=True)
            continue
        try:
            found = run_method(args, method, attn, mode, pairs, p_ids, tokenizer, vocab_size, out_dir)
            step_s = found.pop("step_s")
            record.update(step_ms=1e3 * step_s, tokens_per_s=tokens / step_s, step_over_floor=step_s / floor_s,
                          **found)
        except ImportError as error:
            record["status"] = f"missing: {error}"
        except Exception as error:  # recorded, not fatal: one failing configuration must not lose the others
            if args.smoke:
                raise
            record["status"] = "oom" if is_oom(error) else f"error: {type(error).__name__}: {error}"[:400]
            traceback.print_exc()
        free_memory()
        print(f"{record['config']:<40} {label:<26} " + (
            f"{record['step_ms']:9.1f} ms  {record['tokens_per_s']:9.0f} tok/s  floor {record['floor_ms']:8.1f} ms"
            + (f"  peak {record['peak_mem_gib']:.2f} GiB" if record["peak_mem_gib"] is not None else "")
            if record["status"] == "ok" else record["status"]), flush=True)
        records.append(record)
        save(records)
    return records


def parse_args(argv: list[str] | None = None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="CPU, tiny model, short sequences: exercise every path")
    parser.add_argument("--models", nargs="+", default=["qwen2.5-0.5b-shape", "llama-3.2-1b-shape"])
    parser.add_argument("--modes", nargs="+", default=["lora", "full_gc"], choices=list(DPO_FLOOR))
    parser.add_argument("--cases", nargs="+", default=["short", "long"], choices=list(CASES))
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--pairs", type=int, default=None, help="pairs per optimizer step (8; 4 with --smoke)")
    parser.add_argument("--micro-batch", type=int, default=None,
                        help="pairs per micro-batch, i.e. per forward/backward (4; 2 with --smoke)")
    parser.add_argument("--steps", type=int, default=None, help="timed steps (5; 2 with --smoke)")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps first (2; 1 with --smoke)")
    parser.add_argument("--attn", nargs="+", default=None, choices=["sdpa", "flex_attention", "eager"],
                        help="attention for the fastpref methods' tree masks (default: sdpa and flex_attention on "
                             "CUDA, sdpa with --smoke); the baselines use sdpa")
    parser.add_argument("--backend", default=None, help="fastpref log-prob backend (default: best available)")
    parser.add_argument("--results-name", default=None)
    parser.add_argument("--budget", type=float, default=None,
                        help="seconds: the GPU check's plan (one configuration, priority order, stop when spent)")
    parser.add_argument("--no-plot", action="store_true", help="write the JSON only")
    args = parser.parse_args(argv)
    args.started = time.time()
    args.check_agreement = True  # tree_agreement for every Sr-DPO record (bench_step_cpu.py: its first round only)
    if args.budget is not None:
        given = set(sys.argv[1:] if argv is None else argv)
        args.models = args.models if "--models" in given else ["qwen2.5-0.5b-shape"]
        args.modes = args.modes if "--modes" in given else ["lora"]
        args.cases = args.cases if "--cases" in given else ["p128r256"]
        args.methods = args.methods if "--methods" in given else list(BUDGET_METHODS)
        args.attn = args.attn or ["sdpa"]
    defaults = dict(pairs=4, micro_batch=2, steps=2, warmup=1) if args.smoke else \
        dict(pairs=8, micro_batch=4, steps=3 if args.budget is not None else 5, warmup=1 if args.budget is not None else 2)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.pairs % args.micro_batch:
        parser.error(f"--pairs {args.pairs} is not a multiple of --micro-batch {args.micro_batch}")
    args.attn = args.attn or (["sdpa"] if args.smoke else ["sdpa", "flex_attention"])
    if "flex_attention" in args.attn:  # one compiled flex kernel per stream shape: allow more than dynamo's 8
        dynamo = torch._dynamo.config
        name = "recompile_limit" if hasattr(dynamo, "recompile_limit") else "cache_size_limit"
        setattr(dynamo, name, max(getattr(dynamo, name), 256))
    if args.smoke:
        args.models, args.cases = ["tiny-llama"], ["smoke"]
        args.device, args.dtype = torch.device("cpu"), torch.float32
        args.backend = args.backend or "torch"
    else:
        if not torch.cuda.is_available():
            parser.error("no CUDA device: run with --smoke on a CPU")
        args.device, args.dtype = torch.device("cuda"), torch.bfloat16
    args.results_name = args.results_name or ("step_smoke" if args.smoke else "step_gpu")
    return args


def main(argv: list[str] | None = None):
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from record import plot_results, save_results

    args = parse_args(argv)
    meta = dict(beta=BETA, refine_lambda=REFINE_LAMBDA, steps=args.steps, warmup=args.warmup, budget_s=args.budget,
                floor="F = measured no-grad forward over the step's tokens; DPO 2F LoRA / 3F full / 4F full+GC, "
                      "Sr-DPO +1F")
    threads = torch.get_num_threads()
    if args.smoke:  # smoke timings are not measurements; one thread avoids oversubscribing a shared CPU
        torch.set_num_threads(1)
    try:
        records = run_all(args, lambda done: save_results(args.results_name, done, meta))
    finally:
        torch.set_num_threads(threads)
    add_ratios(records)
    path = save_results(args.results_name, records, meta)
    if not args.no_plot:
        plot_results(path, x="method", y="step_ms", group="mode", facet="config")
    return path


def add_ratios(records: list[dict]) -> None:
    """step_ms over the same configuration's TRL DPO (precomputed reference, else online) and fastpref DPO."""
    for record in records:
        same = {r["method"]: r["step_ms"] for r in records if r["config"] == record["config"] and r["step_ms"]}
        trl = same.get("trl_dpo_precomputed") or same.get("trl_dpo")
        for key, base in (("over_trl_dpo", trl), ("over_fastpref_dpo", same.get("fastpref_dpo"))):
            record[key] = record["step_ms"] / base if record["step_ms"] and base else None


def run_all(args, save: Callable[[list[dict]], None] = lambda records: None) -> list[dict]:
    """Every configuration's records; `save` gets all records so far after each method."""
    import tempfile

    tokenizer = build_tokenizer()
    records: list[dict] = []
    with tempfile.TemporaryDirectory() as out_dir:
        for model in args.models:
            args.model = model
            vocab_size = len(tokenizer) if args.smoke else None
            for mode in args.modes:
                for case_name in args.cases:
                    case = SMOKE_CASE if args.smoke else CASES[case_name]
                    done = list(records)
                    records += run_configuration(args, mode, case, tokenizer, vocab_size or _model_vocab(model),
                                                 out_dir, lambda new: save(done + new))
    return records


def _model_vocab(name: str) -> int:
    """The real vocabulary of the shape a name mimics (the logits matmul is most of the head's cost)."""
    return {"qwen2.5-0.5b-shape": 151936, "llama-3.2-1b-shape": 128256}.get(name, 32000)


if __name__ == "__main__":
    sys.exit(0 if main() else 1)
