"""Sr-DPO with fastpref's PreferenceTrainer under any accelerate launch (one process, DDP, FSDP2, DeepSpeed).

    accelerate launch --config_file examples/accelerate/ddp_cpu.yaml examples/accelerate/train_sr_dpo.py \
        --output /tmp/run --batch 4 --layout tree

The engine comes from the launcher (its config file sets the environment accelerate reads); this script only
builds the model, data and PreferenceConfig. ``--batch`` is per process: keep ``batch × processes`` fixed to
train on the same global batch. With ``--report FILE`` rank 0 writes the logged losses and the trainable
parameters (a ``torch.save`` state dict next to it) for comparing runs. The default model and data are
fastpref's tiny built-in ones so the script runs anywhere; pass ``--model`` to load a hub or local model.
DeepSpeed on CPU: set ``DS_ACCELERATOR=cpu`` and ``FASTPREF_DDP_BACKEND=gloo`` (passed as ``ddp_backend``; see
docs/scaling.md for why accelerate needs it).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import torch

from fastpref import PreferenceConfig, PreferenceTrainer
from fastpref.data import load_preference_dataset
from fastpref.data.tiny_models import MODEL_NAMES, build_model
from fastpref.data.tokenizer import build_tokenizer
from fastpref.model.prefix_kv import gathered_parameters


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--output", required=True, help="output directory (reference cache under output/ref_cache)")
    parser.add_argument("--model", default="tiny-llama", help="a fastpref tiny model name, a hub id or a path")
    parser.add_argument("--data", default="demo", help="a preference dataset name or file (fastpref's loader)")
    parser.add_argument("--pairs", type=int, default=8, help="pairs of the dataset to train on")
    parser.add_argument("--batch", type=int, default=4, help="pairs per process and step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--layout", default="auto", choices=["auto", "padded", "packed", "tree"])
    parser.add_argument("--lora", action="store_true", help="train LoRA adapters (the base is the reference)")
    parser.add_argument("--loss", default="sr_dpo")
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--optim", default="adamw_torch")
    parser.add_argument("--cache-dir", default=None, help="reference cache directory (default output/ref_cache)")
    parser.add_argument("--report", default=None, help="rank 0 writes losses here and parameters to REPORT.pt")
    return parser.parse_args(argv)


def build_model_and_tokenizer(name: str):
    if name in MODEL_NAMES:
        tokenizer = build_tokenizer()
        torch.manual_seed(0)
        return build_model(name, vocab_size=len(tokenizer)), tokenizer
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(name), AutoTokenizer.from_pretrained(name)


def lora_config():
    from peft import LoraConfig

    # Random B, so the adapted policy differs from the reference from the first step.
    return LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"], task_type="CAUSAL_LM",
                      init_lora_weights=False)


def _use_cpu() -> bool:
    """CPU without a GPU, except under DeepSpeed: accelerate skips DeepSpeed's set-up for ``cpu=True``
    (accelerate/state.py: ``if not cpu``), and DeepSpeed picks its CPU accelerator itself (DS_ACCELERATOR=cpu)."""
    return not torch.cuda.is_available() and os.environ.get("ACCELERATE_USE_DEEPSPEED", "false") != "true"


def build_trainer(args: argparse.Namespace) -> PreferenceTrainer:
    model, tokenizer = build_model_and_tokenizer(args.model)
    output = Path(args.output)
    config = PreferenceConfig(
        output_dir=str(output), ref_cache_dir=args.cache_dir or str(output / "ref_cache"), loss_type=args.loss,
        stream_layout=args.layout, per_device_train_batch_size=args.batch, max_steps=args.steps,
        learning_rate=args.lr, optim=args.optim, logging_steps=1, save_strategy="no", report_to=[], seed=0,
        disable_tqdm=True, use_cpu=_use_cpu(),
        ddp_backend=os.environ.get("FASTPREF_DDP_BACKEND"))
    data = load_preference_dataset(args.data, split="train").select(range(args.pairs))
    return PreferenceTrainer(model, args=config, train_dataset=data, processing_class=tokenizer,
                             peft_config=lora_config() if args.lora else None)


def write_report(trainer: PreferenceTrainer, path: Path) -> None:
    """Rank 0: losses, world size and reference passes to ``path``; trainable parameters to ``path``.pt.
    Every rank calls it (gathering sharded parameters is collective)."""
    model = trainer.accelerator.unwrap_model(trainer.model)
    with gathered_parameters(model):  # ZeRO-3: whole weights; FSDP2: full_tensor() gathers each DTensor
        state = {name: (p.full_tensor() if hasattr(p, "full_tensor") else p).detach().cpu().clone()
                 for name, p in model.named_parameters() if p.requires_grad}
    if trainer.is_world_process_zero():
        torch.save(state, path.with_suffix(".pt"))
        losses = [entry["loss"] for entry in trainer.state.log_history if "loss" in entry]
        path.write_text(json.dumps({"losses": losses, "world": trainer.accelerator.num_processes,
                                    "distributed_type": str(trainer.accelerator.distributed_type),
                                    "reference_passes": trainer.reference_passes}))


def main(argv: list[str] | None = None) -> PreferenceTrainer:
    args = parse_args(argv)
    trainer = build_trainer(args)
    trainer.train()
    if args.report:
        write_report(trainer, Path(args.report))
    trainer.accelerator.wait_for_everyone()
    return trainer


if __name__ == "__main__":
    trained = main()
    trained.accelerator.end_training()  # destroys the process group
    # gloo's threads can abort the interpreter's teardown after all work is written; leave without it.
    sys.stdout.flush()
    os._exit(0)
