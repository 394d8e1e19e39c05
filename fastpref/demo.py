"""``fastpref demo``: the README's main job, end to end on a CPU in under three minutes.

1. The fused log-prob head against eager full logits on one input (:func:`fastpref.op_demo.compare_logps_head`).
2. A tiny Llama built from a config, fastpref's local tokenizer, the bundled synthetic preference set
   (2048 training pairs, 256 held out; :mod:`fastpref.data.synthetic`).
3. The reference log-probs of both Sr-DPO streams precomputed once into the on-disk cache.
4. Sr-DPO (arXiv 2405.21040, the paper's refinement prompt, λ = 0.5) for a few hundred steps.
5. Held-out rewards/accuracies and margins before and after, the time per step, and the same for plain DPO
   (sigmoid) trained for the same number of steps from the same initial weights.
"""

from __future__ import annotations

import contextlib
import copy
import statistics
import tempfile
import time

import torch
from transformers import TrainerCallback
from transformers.trainer_callback import ProgressCallback

DEFAULT_STEPS = {"cpu": 300, "cuda": 1000}
WARMUP_STEPS = 5  # step times before this are excluded (allocator, thread pools, first-call overheads)


class StepTimer(TrainerCallback):
    """Wall time of every optimizer step (synchronizing the device on CUDA, outside the timed work)."""

    def __init__(self):
        self.durations: list[float] = []
        self._start = 0.0

    def on_step_begin(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self._start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.durations.append(time.perf_counter() - self._start)

    def median(self) -> float:
        timed = self.durations[WARMUP_STEPS:] or self.durations
        return statistics.median(timed)


class LogTable(TrainerCallback):
    """The training logs of one run as a labelled table with aligned columns (in place of the raw dicts)."""

    COLUMNS = (("loss", "loss"), ("rewards/accuracies", "accuracy"), ("rewards/margins", "margin"),
               ("grad_norm", "grad norm"))

    def __init__(self, label: str):
        self.label = label
        self._printed_header = False

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not logs or "loss" not in logs:
            return
        if not self._printed_header:
            print(f"\n{self.label} training log:\n  {'step':>6}" + "".join(f"{name:>11}" for _, name in self.COLUMNS),
                  flush=True)
            self._printed_header = True
        print(f"  {state.global_step:>6}" + "".join(f"{logs.get(key, float('nan')):>11.4f}" for key, _ in self.COLUMNS),
              flush=True)


def _labelled(trainer, label: str):
    """``trainer`` printing its training logs as a :class:`LogTable` under ``label``."""
    trainer.remove_callback(ProgressCallback)
    trainer.add_callback(LogTable(label))
    return trainer


def _config(loss_type: str, steps: int, batch_size: int, device: str, cache_dir: str, output_dir: str, seed: int):
    from fastpref.trainer import PreferenceConfig

    return PreferenceConfig(
        output_dir=output_dir, loss_type=[loss_type], beta=0.1, refine_lambda=0.5, learning_rate=1e-3,
        lr_scheduler_type="constant_with_warmup", warmup_steps=10, max_steps=steps,
        per_device_train_batch_size=batch_size, per_device_eval_batch_size=64, precompute_ref_batch_size=64,
        logging_steps=max(steps // 10, 1), logging_strategy="steps", report_to=[], save_strategy="no",
        eval_strategy="no", ref_cache_dir=cache_dir, use_cpu=device == "cpu", seed=seed, data_seed=seed,
        dataloader_num_workers=0, disable_tqdm=False,
    )


def _held_out(metrics: dict) -> tuple[float, float, float, float]:
    return (metrics["eval_rewards/accuracies"], metrics["eval_rewards/margins"], metrics["eval_rewards/chosen"],
            metrics["eval_rewards/rejected"])


def run_demo(device: str = "cpu", model_name: str = "tiny-llama", steps: int | None = None,
             dpo_steps: int | None = None, batch_size: int = 8, seed: int = 0,
             cache_dir: str = "fastpref_ref_cache") -> dict[str, float]:
    """Run the demo (module docstring), print its summary, and return the figures it printed."""
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("device='cuda' but torch sees no CUDA device")
    steps = steps or DEFAULT_STEPS.get(device, 300)
    dpo_steps = dpo_steps or steps
    started = time.perf_counter()

    with contextlib.suppress(ImportError):
        from fastpref.op_demo import compare_logps_head

        print(compare_logps_head(device), flush=True)
    threads = torch.get_num_threads()
    if device == "cpu":
        # A 0.1 M-parameter model is dispatch-bound: one thread avoids OpenMP synchronisation on every tiny op.
        torch.set_num_threads(1)
    try:
        return _train_and_report(device, model_name, steps, dpo_steps, batch_size, seed, cache_dir, started)
    finally:
        torch.set_num_threads(threads)


def _train_and_report(device: str, model_name: str, steps: int, dpo_steps: int, batch_size: int, seed: int,
                      cache_dir: str, started: float) -> dict[str, float]:
    from fastpref.data import load_preference_dataset
    from fastpref.data.tiny_models import build_model
    from fastpref.data.tokenizer import build_tokenizer
    from fastpref.trainer import PreferenceTrainer
    from fastpref.trainer.models import align_special_tokens


    tokenizer = build_tokenizer()
    train = load_preference_dataset("demo", split="train")
    held_out = load_preference_dataset("demo", split="test")
    torch.manual_seed(seed)
    initial = align_special_tokens(build_model(model_name, vocab_size=len(tokenizer)), tokenizer)
    params = sum(p.numel() for p in initial.parameters())
    print(f"\nmodel: {model_name} ({params / 1e6:.2f} M parameters, random init), data: {len(train)} training "
          f"pairs, {len(held_out)} held out; device {device}", flush=True)

    with tempfile.TemporaryDirectory() as output_dir:
        sr_timer = StepTimer()
        precompute_started = time.perf_counter()
        sr = PreferenceTrainer(copy.deepcopy(initial), args=_config("sr_dpo", steps, batch_size, device, cache_dir,
                                                                    output_dir, seed),
                               train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
                               callbacks=[sr_timer])
        precompute = time.perf_counter() - precompute_started
        before = _held_out(sr.evaluate())
        _labelled(sr, "Sr-DPO").train()
        after = _held_out(sr.evaluate())

        dpo_timer = StepTimer()
        dpo = PreferenceTrainer(copy.deepcopy(initial), args=_config("sigmoid", dpo_steps, batch_size, device,
                                                                     cache_dir, output_dir, seed),
                                train_dataset=train, eval_dataset=held_out, processing_class=tokenizer,
                                callbacks=[dpo_timer])
        _labelled(dpo, "DPO").train()
        dpo_after = _held_out(dpo.evaluate())

    sr_step, dpo_step = sr_timer.median(), dpo_timer.median()
    wall = time.perf_counter() - started
    print("\n" + "\n".join([
        f"Sr-DPO, {steps} steps of {batch_size} pairs (beta 0.1, lambda 0.5, the paper's refinement prompt):",
        f"                      before     after   (plain DPO after {dpo_steps} steps)",
        f"  held-out accuracy   {before[0]:6.3f}    {after[0]:6.3f}    {dpo_after[0]:6.3f}",
        f"  held-out margin     {before[1]:6.3f}    {after[1]:6.3f}    {dpo_after[1]:6.3f}",
        f"  reward chosen       {before[2]:6.3f}    {after[2]:6.3f}    {dpo_after[2]:6.3f}",
        f"  reward rejected     {before[3]:6.3f}    {after[3]:6.3f}    {dpo_after[3]:6.3f}",
        "  (accuracy: fraction of held-out pairs with reward(chosen) > reward(rejected); rewards are beta * "
        "log(policy/reference), all 0 before training)",
        f"time per step (median): Sr-DPO {sr_step * 1e3:.1f} ms, plain DPO {dpo_step * 1e3:.1f} ms "
        f"-> Sr-DPO costs {sr_step / dpo_step:.2f}x DPO (reference log-probs cached for both; the refinement "
        "prompt's keys/values computed once per step)",
        f"reference log-probs: {'computed' if sr.reference_passes else 'loaded'} in {precompute:.0f} s "
        f"(cache {cache_dir}/, reused by the next run)   demo wall time: {wall:.0f} s",
    ]), flush=True)
    return {"accuracy_before": before[0], "accuracy_after": after[0], "margin_before": before[1],
            "margin_after": after[1], "dpo_accuracy_after": dpo_after[0], "sr_dpo_step_s": sr_step,
            "dpo_step_s": dpo_step, "wall_s": wall}
