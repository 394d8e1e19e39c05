"""``fastpref rounds``: the round loop (:func:`fastpref.rounds.run_rounds`) from the command line.

    fastpref rounds --model tiny-llama --prompts demo --rounds 2 --scorer keyword=e --output_dir runs/r \\
        [--eval_prompts demo] [--samples_per_prompt 4] [--max_new_tokens 64] [--pairing all_pairs] \\
        [--length_penalty 0.01] [--apo_alpha 0.3] [any PreferenceConfig field, e.g. --max_steps 20]

Scorers (``--scorer`` repeats and sums; ``W*SPEC`` weights a term): ``reward-model=PATH`` (a local
sequence-classification model), ``judge=package.module:function`` (a judge callable), ``implicit`` or
``implicit=REFERENCE_DIR`` (DICE's implicit reward with ``--implicit_beta``), ``keyword=WORD[,WORD...]`` (a known
reward: occurrences of the words), ``demo-task`` (the synthetic demo task's known reward,
:class:`fastpref.rounds.scorers.DemoTaskReward`). ``--length_penalty A`` adds −A·|y| (tokens). Prompts: ``demo`` (the bundled
synthetic set's prompts: its train split for ``--prompts``, its test split for ``--eval_prompts``), a ``.txt``
file (one prompt a line) or a ``.jsonl``/``.json`` file of rows with a ``prompt`` field.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from fastpref.rounds.loop import RoundsConfig, run_rounds
from fastpref.rounds.pairing import PAIRING_RULES
from fastpref.rounds.scorers import (DemoTaskReward, ImplicitRewardScorer, JudgeScorer, KeywordCount,
                                     LengthPenalty, RewardModelScorer, Scorer, SumScorer)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="fastpref rounds", description="Iterative preference rounds: sample, "
                                     "score, pair, train, with the previous policy as reference.",
                                     epilog="Other --options go to fastpref.PreferenceConfig (e.g. --max_steps).")
    parser.add_argument("--model", required=True, help="local model directory or a built-in name (tiny-llama …)")
    parser.add_argument("--prompts", required=True, help="'demo', a .txt file, or a .jsonl/.json with 'prompt'")
    parser.add_argument("--eval_prompts", default=None, help="held-out prompts in the same forms")
    parser.add_argument("--num_prompts", type=int, default=None, help="use the first N training prompts")
    parser.add_argument("--num_eval_prompts", type=int, default=None, help="use the first N held-out prompts")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument("--scorer", action="append", default=[], help="scorer spec (repeatable, summed)")
    parser.add_argument("--eval_scorer", action="append", default=None, help="held-out scorer (default: --scorer)")
    parser.add_argument("--length_penalty", type=float, default=0.0, help="add -A*|y| (tokens) to the score")
    parser.add_argument("--implicit_beta", type=float, default=0.1, help="beta of the implicit-reward scorer")
    parser.add_argument("--replay_dataset", default=None, help="offline pairs (JSONL) for the replay pool")
    parser.add_argument("--use_peft", action="store_true", help="train LoRA adapters each round (merged after)")
    parser.add_argument("--lora_r", type=int, default=16)
    parser.add_argument("--lora_alpha", type=int, default=32)
    defaults = RoundsConfig()
    for name in ("rounds", "samples_per_prompt", "max_new_tokens", "top_k", "generation_batch_size",
                 "eval_samples_per_prompt", "seed"):
        parser.add_argument(f"--{name}", type=int, default=getattr(defaults, name))
    for name in ("temperature", "top_p", "margin", "replay_share", "length_offset", "apo_alpha"):
        parser.add_argument(f"--{name}", type=float, default=getattr(defaults, name))
    parser.add_argument("--pairing", choices=PAIRING_RULES, default=defaults.pairing)
    return parser


def load_prompts(source: str, split: str, limit: int | None = None) -> list:
    """Prompts from ``demo`` (its ``split``), a ``.txt`` file or a ``.jsonl``/``.json`` file; duplicates dropped."""
    if source == "demo":
        from fastpref.data import load_preference_dataset

        prompts = load_preference_dataset("demo", split=split)["prompt"]
    else:
        path = Path(source)
        if not path.is_file():
            raise ValueError(f"prompts: {source!r} is neither 'demo' nor a file")
        if path.suffix == ".txt":
            prompts = [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        elif path.suffix in (".jsonl", ".json"):
            text = path.read_text(encoding="utf-8")
            rows = json.loads(text) if path.suffix == ".json" else [json.loads(l) for l in text.splitlines() if l.strip()]
            if not all(isinstance(row, dict) and "prompt" in row for row in rows):
                raise ValueError(f"{path}: every row needs a 'prompt' field")
            prompts = [row["prompt"] for row in rows]
        else:
            raise ValueError(f"prompts: unsupported file type {path.suffix!r} (want .txt, .jsonl, .json)")
    unique = list({json.dumps(p, sort_keys=True): p for p in prompts}.values())
    return unique[:limit] if limit else unique


def parse_scorer(specs: list[str], *, length_penalty: float = 0.0, implicit_beta: float = 0.1) -> Scorer:
    """The sum of the scorers named by ``specs`` (module docstring), plus −length_penalty·|y|."""
    terms = []
    for spec in specs:
        weight, star, rest = spec.partition("*")
        weight, spec = (float(weight), rest) if star else (1.0, spec)
        kind, _, value = spec.partition("=")
        if kind == "reward-model" and value:
            scorer = RewardModelScorer(value)
        elif kind == "judge" and value:
            scorer = JudgeScorer.from_import_path(value)
        elif kind == "implicit":
            reference = None
            if value:
                from transformers import AutoModelForCausalLM

                reference = AutoModelForCausalLM.from_pretrained(value)
            scorer = ImplicitRewardScorer(beta=implicit_beta, reference=reference)
        elif kind == "keyword" and value:
            scorer = KeywordCount(value.split(","))
        elif kind == "demo-task" and not value:
            scorer = DemoTaskReward()
        else:
            raise ValueError(f"--scorer {spec!r}: expected reward-model=PATH, judge=module:function, implicit[=DIR], "
                             "keyword=WORD[,WORD] or demo-task")
        terms.append((weight, scorer))
    if length_penalty:
        terms.append((1.0, LengthPenalty(length_penalty)))
    if not terms:
        raise ValueError("give at least one --scorer (or --length_penalty)")
    return SumScorer(terms)


def main(argv: list[str]) -> int:
    from transformers import HfArgumentParser

    from fastpref.trainer import PreferenceConfig

    options, rest = _parser().parse_known_args(argv)
    (args,) = HfArgumentParser((PreferenceConfig,)).parse_args_into_dataclasses(
        args=["--output_dir", options.output_dir, *rest])
    config = RoundsConfig(**{f.name: getattr(options, f.name) for f in RoundsConfig.__dataclass_fields__.values()})
    scorer = parse_scorer(options.scorer, length_penalty=options.length_penalty, implicit_beta=options.implicit_beta)
    eval_scorer = parse_scorer(options.eval_scorer, implicit_beta=options.implicit_beta) if options.eval_scorer \
        else None
    prompts = load_prompts(options.prompts, "train", options.num_prompts)
    eval_prompts = None
    if options.eval_prompts:
        eval_prompts = load_prompts(options.eval_prompts, "test", options.num_eval_prompts)
    replay = None
    if options.replay_dataset:
        from fastpref.data import load_preference_dataset

        replay = load_preference_dataset(options.replay_dataset).to_list()
    peft_config = None
    if options.use_peft:
        from peft import LoraConfig

        peft_config = LoraConfig(r=options.lora_r, lora_alpha=options.lora_alpha, target_modules="all-linear",
                                 task_type="CAUSAL_LM")
    result = run_rounds(options.model, prompts, scorer, args=args, config=config, peft_config=peft_config,
                        eval_prompts=eval_prompts, eval_scorer=eval_scorer, replay_data=replay)
    if result.initial:
        print(f"round 0: heldout_reward={result.initial['heldout_reward']:.4g}")
    for metrics in result.rounds:
        held = f" heldout_reward={metrics['heldout_reward']:.4g}" if "heldout_reward" in metrics else ""
        print(f"round {metrics['round']}: pairs={metrics['pairs']} sample_reward={metrics['sample_reward']:.4g}"
              f"{held}")
    print(f"rounds written under {options.output_dir}")
    return 0


if __name__ == "__main__":  # python -m fastpref.rounds.cli …, until `fastpref rounds` is wired into fastpref/cli.py
    raise SystemExit(main(sys.argv[1:]))
