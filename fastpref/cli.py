"""The ``fastpref`` command line (also ``python -m fastpref``).

    fastpref demo [--device cpu|cuda] [--model tiny-llama] [--steps 300]
    fastpref train --model tiny-llama --dataset prefs.jsonl --output_dir runs/x [any PreferenceConfig field]
    fastpref precompute-ref --model tiny-llama --dataset prefs.jsonl [PreferenceConfig fields]
    fastpref bench [NAME ...] [-- script args]     (benchmarks/bench_*.py scripts, test_*.py via pytest)

``train`` and ``precompute-ref`` accept every :class:`fastpref.PreferenceConfig` field (``--loss_type sr_dpo``,
``--beta 0.1``, ``--max_steps 100`` …) through ``transformers.HfArgumentParser``; the model is a local directory
or a built-in name (:data:`fastpref.data.tiny_models.MODEL_NAMES`), the data a JSONL/JSON/parquet file, a saved
``datasets`` directory, or ``demo``.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

COMMANDS = ("train", "precompute-ref", "demo", "bench")


@dataclass
class ScriptArguments:
    """What ``train`` / ``precompute-ref`` read besides the PreferenceConfig fields."""

    model: str = field(metadata={"help": "Local model directory or a built-in name (e.g. tiny-llama)."})
    dataset: str = field(metadata={"help": "JSONL/JSON/parquet file, saved datasets dir, or 'demo'."})
    dataset_split: str | None = field(default=None, metadata={"help": "Split of a DatasetDict dir (or of 'demo')."})
    eval_dataset: str | None = field(default=None, metadata={"help": "Held-out data in the same forms."})
    eval_split: str | None = field(default=None, metadata={"help": "Split of the eval dataset."})
    tokenizer: str | None = field(default=None, metadata={"help": "Tokenizer dir; default: the model's, else "
                                                                  "fastpref's local tokenizer."})
    use_peft: bool = field(default=False, metadata={"help": "Train LoRA adapters (reference = adapters off)."})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha."})
    lora_dropout: float = field(default=0.0, metadata={"help": "LoRA dropout."})
    lora_target_modules: list[str] = field(default_factory=lambda: ["all-linear"],
                                           metadata={"help": "Modules LoRA adapts."})


def _parse(argv: list[str]):
    from transformers import HfArgumentParser

    from fastpref.trainer import PreferenceConfig

    parser = HfArgumentParser((ScriptArguments, PreferenceConfig))
    script, config = parser.parse_args_into_dataclasses(args=argv)
    return script, config


def _build_trainer(script: ScriptArguments, config):
    from transformers import AutoTokenizer

    from fastpref.data import load_preference_dataset
    from fastpref.trainer import PreferenceTrainer

    train = load_preference_dataset(script.dataset, split=script.dataset_split)
    evaluation = None
    if script.eval_dataset is not None:
        evaluation = load_preference_dataset(script.eval_dataset, split=script.eval_split)
    tokenizer = AutoTokenizer.from_pretrained(script.tokenizer) if script.tokenizer else None
    peft_config = None
    if script.use_peft:
        from peft import LoraConfig

        targets = script.lora_target_modules
        peft_config = LoraConfig(r=script.lora_r, lora_alpha=script.lora_alpha, lora_dropout=script.lora_dropout,
                                 target_modules=targets[0] if targets == ["all-linear"] else targets,
                                 task_type="CAUSAL_LM")
    return PreferenceTrainer(script.model, args=config, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, peft_config=peft_config)


def cmd_train(argv: list[str]) -> int:
    script, config = _parse(argv)
    trainer = _build_trainer(script, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        print(", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"saved to {config.output_dir}")
    return 0


def cmd_precompute_ref(argv: list[str]) -> int:
    script, config = _parse(argv)
    trainer = _build_trainer(script, config)
    action = "computed" if trainer.reference_passes else "found in the cache (no reference pass)"
    print(f"reference log-probs {action}: {config.ref_cache_dir}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from fastpref.demo import run_demo
    from fastpref.data.tiny_models import MODEL_NAMES

    parser = argparse.ArgumentParser(prog="fastpref demo", description="Sr-DPO on a tiny model and synthetic "
                                     "preference data, with a fused-head check and DPO timing for comparison.")
    parser.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    parser.add_argument("--model", default="tiny-llama", choices=MODEL_NAMES)
    parser.add_argument("--steps", type=int, default=None, help="Sr-DPO steps (default: 300 on cpu)")
    parser.add_argument("--dpo-steps", type=int, default=None, help="plain-DPO steps (default: --steps)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    options = parser.parse_args(argv)
    run_demo(device=options.device, model_name=options.model, steps=options.steps, dpo_steps=options.dpo_steps,
             batch_size=options.batch_size, seed=options.seed)
    return 0


def benchmarks_dir() -> Path | None:
    """``benchmarks/`` of a source checkout (next to the package), or None for an installed package."""
    candidate = Path(__file__).resolve().parent.parent / "benchmarks"
    return candidate if candidate.is_dir() else None


def cmd_bench(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    names, passthrough = argv[:split], argv[split + 1:]
    directory = benchmarks_dir()
    if directory is None:
        print("fastpref bench: no benchmarks/ directory next to the package — the benchmark scripts ship with "
              "the source checkout only (git clone, then run `fastpref bench` from it).")
        return 1
    # bench_*.py are scripts; test_*.py are pytest-benchmark suites.
    scripts = {p.stem: p for p in sorted(directory.glob("*.py")) if p.stem.startswith(("bench_", "test_"))}
    if not scripts:
        print(f"fastpref bench: {directory} holds no benchmark scripts")
        return 1
    unknown = [n for n in names if n not in scripts]
    if unknown:
        print(f"fastpref bench: unknown benchmark(s) {unknown}; available: {', '.join(scripts)}")
        return 2
    status = 0
    for name in names or list(scripts):
        print(f"== {name} ==", flush=True)
        runner = [sys.executable, "-m", "pytest", "-q"] if name.startswith("test_") else [sys.executable]
        done = subprocess.run([*runner, str(scripts[name]), *passthrough], cwd=directory.parent, check=False)
        status = status or done.returncode
    return status


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    handlers = {"train": cmd_train, "precompute-ref": cmd_precompute_ref, "demo": cmd_demo, "bench": cmd_bench}
    if command not in handlers:
        print(f"fastpref: unknown command {command!r}; expected one of {', '.join(COMMANDS)}", file=sys.stderr)
        return 2
    return handlers[command](rest)


if __name__ == "__main__":
    raise SystemExit(main())
