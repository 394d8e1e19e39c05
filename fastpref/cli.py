"""The ``fastpref`` command line (also ``python -m fastpref``): ``demo``, ``train``, ``precompute-ref``, ``rounds``,
``bench``.

``main`` dispatches to one ``cmd_*`` per command and turns fastpref's errors (bad arguments, bad data, a missing
file or backend) into one line on stderr and exit status 1; ``--debug`` / ``FASTPREF_DEBUG=1`` re-raises them.
``train`` and ``precompute-ref`` parse :class:`ScriptArguments` and every ``PreferenceConfig`` field with
``transformers.HfArgumentParser``; their help groups fastpref's options before transformers' own.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import subprocess
import sys
import textwrap
import traceback
from dataclasses import dataclass, field
from pathlib import Path

from fastpref._ext import env_flag
from fastpref.backends import BackendUnavailableError

HELP = """\
fastpref: fused kernels and a thin trainer for DPO-family preference optimization.

usage: fastpref [--debug] COMMAND [OPTIONS]

commands:
  demo             Sr-DPO on a tiny model and synthetic data, a fused-head check, and a DPO comparison
  train            train a model on preference data and save it to --output_dir
  precompute-ref   compute the reference log-probs of a dataset into the cache (or find them there)
  rounds           online rounds: sample, score, pair, train, with each round's policy as the next reference
  bench            run the benchmark scripts of a source checkout

examples:
  fastpref demo
  fastpref train --model tiny-llama --dataset prefs.jsonl --output_dir runs/x --loss_type sr_dpo --max_steps 100
  fastpref precompute-ref --model runs/x --dataset prefs.jsonl --output_dir runs/x-ref
  fastpref rounds --model tiny-llama --prompts demo --rounds 2 --scorer demo-task --output_dir runs/r
  fastpref bench --help

`fastpref COMMAND --help` describes a command's options. Errors print one line; --debug (anywhere on the line,
or FASTPREF_DEBUG=1) shows the full traceback instead.
"""

#: Errors that reach the user as one line (with --debug, as a traceback): fastpref's argument and data checks
#: (ValueError, TypeError), a missing or unreadable file (OSError), a backend that cannot run.
USER_ERRORS = (ValueError, TypeError, OSError, BackendUnavailableError)
CONFIG_COMMANDS = ("train", "precompute-ref")
PACKAGE_DIR = Path(__file__).resolve().parent

#: Models whose hidden size is below this run on one CPU thread unless OMP_NUM_THREADS is set (THREADS_HELP).
ONE_THREAD_BELOW_HIDDEN_SIZE = 512
THREADS_HELP = (
    f"CPU threads: on CPU, unless OMP_NUM_THREADS is set, models with a hidden size under "
    f"{ONE_THREAD_BELOW_HIDDEN_SIZE} (the built-in tiny ones) run on one thread: their matrices are too small to "
    "split, and more threads spend their time waiting on each other (far more so on a busy machine). Larger "
    "models keep torch's default (one thread per core). OMP_NUM_THREADS=N chooses N threads.")

# TrainingArguments fields that `train --help` describes; --help-all describes the others as well.
COMMON_TRAINING_FIELDS = (
    "output_dir", "num_train_epochs", "max_steps", "per_device_train_batch_size", "per_device_eval_batch_size",
    "gradient_accumulation_steps", "learning_rate", "lr_scheduler_type", "warmup_steps", "weight_decay",
    "max_grad_norm", "optim", "logging_steps", "eval_strategy", "eval_steps", "save_strategy", "save_steps",
    "save_total_limit", "seed", "bf16", "fp16", "activation_checkpointing", "use_cpu", "report_to",
    "resume_from_checkpoint", "disable_tqdm", "run_name")


@dataclass
class ScriptArguments:
    """What ``train`` / ``precompute-ref`` read besides the PreferenceConfig fields."""

    model: str = field(metadata={"help": "Local model directory or a built-in name (tiny-llama, tiny-qwen2, …).",
                                 "aliases": ["--model_name_or_path"]})
    dataset: str = field(metadata={"help": "JSONL/JSON/parquet file, saved datasets dir, or 'demo'.",
                                   "aliases": ["--dataset_name"]})
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


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    """Defaults after each optional option (as HfArgumentParser shows them); description and epilog as written."""

    def _get_help_string(self, action):
        return action.help if action.required else super()._get_help_string(action)


def _paragraphs(*texts: str) -> str:
    return "\n\n".join(textwrap.fill(text, width=100) for text in texts)


def _parser(command: str, describe_all: bool):
    """HfArgumentParser for ScriptArguments + PreferenceConfig whose help lists, in order: the script arguments,
    PreferenceConfig's own fields, the common TrainingArguments fields, then (``describe_all``) the others."""
    from transformers import HfArgumentParser, TrainingArguments

    from fastpref.trainer import PreferenceConfig

    output = " --output_dir DIR" if command == "train" else ""
    what = ("Train a causal LM on preference data with fastpref.PreferenceTrainer and save it to --output_dir."
            if command == "train" else "Compute the reference log-probs of a dataset into --ref_cache_dir, or find "
            "them there already.")
    training = {f.name for f in dataclasses.fields(TrainingArguments) if f.init}
    own = [f.name for f in dataclasses.fields(PreferenceConfig) if f.name not in training and f.init]
    # transformers renamed gradient_checkpointing to activation_checkpointing (the old name warns); older releases
    # have only the old one
    common = [name if name in training else "gradient_checkpointing" for name in COMMON_TRAINING_FIELDS
              if name in training or name == "activation_checkpointing"]
    others = sorted(training - set(common))
    notes = [THREADS_HELP, "Errors print one line; --debug (or FASTPREF_DEBUG=1) shows the traceback."]
    if not describe_all:
        notes.append("Every other transformers.TrainingArguments field is accepted too (--help-all describes "
                     "them): " + " ".join(f"--{name}" for name in others))
    parser = HfArgumentParser((ScriptArguments, PreferenceConfig), prog=f"fastpref {command}",
                              usage=f"fastpref {command} --model MODEL --dataset DATA{output} [OPTIONS]",
                              description=what, epilog=_paragraphs(*notes), formatter_class=_HelpFormatter)
    groups = [("script arguments", [f.name for f in dataclasses.fields(ScriptArguments)]),
              ("preference optimization (fastpref.PreferenceConfig)", own),
              ("training (transformers.TrainingArguments; --help-all lists every field)", common)]
    if describe_all:
        groups.append(("other transformers.TrainingArguments fields", others))
    _show_in_groups(parser, groups, hide_the_rest=not describe_all)
    return parser


def _show_in_groups(parser: argparse.ArgumentParser, groups, hide_the_rest: bool) -> None:
    """List options under titled groups in the given order (help only; parsing is unchanged). argparse keeps a
    group's options in ``_group_actions``; an option moves by leaving the default group for its new one."""
    default = parser._optionals
    for title, names in groups:
        group, names = parser.add_argument_group(title), set(names)
        for action in [a for a in default._group_actions if a.dest in names]:
            default._group_actions.remove(action)
            group._group_actions.append(action)
    for action in default._group_actions:
        if hide_the_rest and action.dest != "help":
            action.help = argparse.SUPPRESS
    for action in parser._actions:
        if action.choices is not None and len(action.choices) > 8:  # --optim: 41 names in the usage column
            action.metavar = "NAME"


def _parse(argv: list[str], command: str = "train"):
    if "--help-all" in argv:
        _parser(command, describe_all=True).print_help()
        raise SystemExit(0)
    parser = _parser(command, describe_all=False)
    script, config, unknown = parser.parse_args_into_dataclasses(args=argv, return_remaining_strings=True)
    if unknown:
        parser.error(f"unrecognized arguments: {' '.join(unknown)}")
    return script, config


def _hidden_size(model: str) -> int | None:
    """The hidden size of a built-in model name or a local model directory, None when it cannot be read."""
    from transformers import AutoConfig

    from fastpref.data.tiny_models import MODEL_NAMES, build_config

    try:
        config = build_config(model, 2) if model in MODEL_NAMES else AutoConfig.from_pretrained(model)
    except (OSError, ValueError):
        return None
    return getattr(config, "hidden_size", None)


def set_cpu_threads(model: str, config) -> None:
    """One torch thread for a small model on CPU when OMP_NUM_THREADS is not set (:data:`THREADS_HELP`)."""
    import torch

    if os.environ.get("OMP_NUM_THREADS", "").strip() or config.device.type != "cpu":
        return
    hidden = _hidden_size(model)
    if hidden is not None and hidden < ONE_THREAD_BELOW_HIDDEN_SIZE:
        torch.set_num_threads(1)


def _build_trainer(script: ScriptArguments, config):
    from transformers import AutoTokenizer

    from fastpref.data import load_preference_dataset
    from fastpref.trainer import PreferenceTrainer

    if script.tokenizer is not None and not Path(script.tokenizer).is_dir():
        raise FileNotFoundError(f"--tokenizer {script.tokenizer!r}: no such directory")
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
    set_cpu_threads(script.model, config)
    return PreferenceTrainer(script.model, args=config, train_dataset=train, eval_dataset=evaluation,
                             processing_class=tokenizer, peft_config=peft_config)


def cmd_train(argv: list[str]) -> int:
    script, config = _parse(argv, "train")
    trainer = _build_trainer(script, config)
    trainer.train(resume_from_checkpoint=config.resume_from_checkpoint)
    trainer.save_model(config.output_dir)
    if trainer.eval_dataset is not None:
        metrics = trainer.evaluate()
        print(", ".join(f"{k}={v:.4g}" for k, v in metrics.items() if isinstance(v, float)))
    print(f"saved to {config.output_dir}")
    return 0


def cmd_precompute_ref(argv: list[str]) -> int:
    script, config = _parse(argv, "precompute-ref")
    trainer = _build_trainer(script, config)
    action = "computed" if trainer.reference_passes else "found in the cache (no reference pass)"
    print(f"reference log-probs {action}: {config.ref_cache_dir}")
    return 0


def cmd_demo(argv: list[str]) -> int:
    from fastpref.data.tiny_models import MODEL_NAMES
    from fastpref.demo import run_demo

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
    candidate = PACKAGE_DIR.parent / "benchmarks"
    return candidate if candidate.is_dir() else None


def _benchmark_scripts(directory: Path) -> dict[str, Path]:
    """bench_*.py (scripts) and test_*.py (pytest-benchmark suites) of ``benchmarks/``, by name."""
    return {p.stem: p for p in sorted(directory.glob("*.py")) if p.stem.startswith(("bench_", "test_"))}


def cmd_bench(argv: list[str]) -> int:
    split = argv.index("--") if "--" in argv else len(argv)
    names, passthrough = argv[:split], argv[split + 1:]
    directory = benchmarks_dir()
    scripts = _benchmark_scripts(directory) if directory is not None else {}
    if "-h" in names or "--help" in names:
        listed = ", ".join(scripts) if scripts else "none here (they ship with the source checkout only)"
        print("usage: fastpref bench [NAME ...] [-- ARGS]\n\nRun benchmarks/ scripts of a source checkout (all of "
              "them without a NAME): bench_*.py with python, test_*.py with pytest; ARGS after -- go to each.\n\n"
              f"benchmarks: {listed}")
        return 0
    if directory is None:
        print("fastpref bench: no benchmarks/ directory next to the package — the benchmark scripts ship with "
              "the source checkout only (git clone, then run `fastpref bench` from it).")
        return 1
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


def cmd_rounds(argv: list[str]) -> int:
    from fastpref.rounds.cli import main as rounds_main

    return rounds_main(argv)


HANDLERS = {"train": cmd_train, "precompute-ref": cmd_precompute_ref, "demo": cmd_demo, "rounds": cmd_rounds,
            "bench": cmd_bench}


def pop_debug(argv: list[str], command: str) -> tuple[list[str], bool]:
    """``argv`` without fastpref's ``--debug`` flags (before a ``--``), and whether there was one. For train /
    precompute-ref only a bare ``--debug`` is fastpref's: TrainingArguments' own ``--debug`` takes values."""
    end = argv.index("--") if "--" in argv else len(argv)
    kept, debug = [], False
    for i, arg in enumerate(argv[:end]):
        bare = i + 1 == end or argv[i + 1].startswith("-")
        if arg == "--debug" and (bare or command not in CONFIG_COMMANDS):
            debug = True
        else:
            kept.append(arg)
    return kept + argv[end:], debug


def raised_by_fastpref(error: BaseException) -> bool:
    """True when the innermost frame of ``error``'s traceback is fastpref's own code (one of its checks)."""
    frames = traceback.extract_tb(error.__traceback__)
    return bool(frames) and Path(frames[-1].filename).resolve().is_relative_to(PACKAGE_DIR)


def error_line(command: str, error: BaseException) -> str:
    """One line for ``error``: its message (with its type unless fastpref raised it) and where to see more."""
    message = " ".join(str(error).split()) or "(no message)"
    if not raised_by_fastpref(error):
        message = f"{type(error).__name__}: {message}"
    return f"fastpref {command}: error: {message} (--debug shows the traceback)"


def _show_info_lines() -> None:
    """fastpref's info lines (reference-cache reuse, written files) on stderr, once per process."""
    logger = logging.getLogger("fastpref")
    logger.setLevel(logging.INFO)
    if not any(getattr(handler, "_fastpref_cli", False) for handler in logger.handlers):
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(message)s"))
        handler._fastpref_cli = True
        logger.addHandler(handler)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug = argv[:1] == ["--debug"]
    argv = argv[1:] if debug else argv
    if not argv or argv[0] in ("-h", "--help"):
        print(HELP, file=sys.stdout if argv else sys.stderr)
        return 0 if argv else 2
    command, rest = argv[0], argv[1:]
    if command not in HANDLERS:
        print(f"fastpref: unknown command {command!r}; expected one of {', '.join(HANDLERS)} (fastpref --help)",
              file=sys.stderr)
        return 2
    rest, debug_here = pop_debug(rest, command)
    _show_info_lines()
    try:
        return HANDLERS[command](rest)
    except USER_ERRORS as error:
        if debug or debug_here or env_flag("FASTPREF_DEBUG"):
            raise
        print(error_line(command, error), file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
