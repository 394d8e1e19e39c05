"""The round loop: sample, score, pair, train one :class:`fastpref.PreferenceTrainer` stage, repeat — each round's
trained policy becomes the next round's policy and reference.

Round t (1-based) with policy π_{t−1} (π_0 the given model):

1. sample K responses per prompt from π_{t−1} (:mod:`fastpref.rounds.sampling`, seed ``config.seed + t``);
2. score them (a :class:`fastpref.rounds.scorers.Scorer`, bound to π_{t−1} and the model it was trained
   against, π_{t−2});
3. build pairs (:mod:`fastpref.rounds.pairing`), optionally add iLR-DPO length offsets and replayed pairs of
   earlier rounds (and of offline ``replay_data``);
4. train a PreferenceTrainer stage on them with π_{t−1} as the model, so its reference is π_{t−1} (a
   precomputed, cached reference by default, in ``round-t/ref_cache``; with LoRA the adapters of a fresh
   ``peft_config`` are trained and merged afterwards, the reference being the merged model with adapters off);
5. optionally APO's extrapolation (arXiv 2410.06293): θ_t ← θ̂_t + α·(θ̂_t − θ_{t−1});
6. write ``round-t/``: ``samples.jsonl`` (every sample with its score), ``pairs.jsonl`` (this round's pairs, TRL
   format with ``score_chosen``/``score_rejected``, and ``offset`` when used), ``replay.jsonl`` (replayed pairs,
   when any), ``checkpoint/`` (π_t and the tokenizer), ``metrics.json``, and last the marker ``DONE``, written
   atomically: a round is finished exactly when its marker exists.

A run started again with the same ``output_dir`` resumes after the last finished round: the directories of
unfinished rounds are removed and those rounds redone (with the same seeds, so an interrupted run ends where an
uninterrupted one would, given deterministic kernels).
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from fastpref.rounds.pairing import PAIRING_RULES, add_length_offsets, build_pairs, mix_replay, training_rows
from fastpref.rounds.sampling import SamplingConfig, sample_responses
from fastpref.rounds.scorers import RoundModels, Scorer, as_scorer, checked_scores

MARKER = "DONE"
EVAL_SEED_OFFSET = 100_003  # held-out sampling seed = config.seed + this, the same in every round


@dataclass
class RoundsConfig:
    """Settings of :func:`run_rounds` (the trainer's own settings are a :class:`fastpref.PreferenceConfig`).

    Sampling: ``samples_per_prompt`` (K), ``max_new_tokens``, ``temperature`` (0 = greedy), ``top_p``, ``top_k``,
    ``generation_batch_size`` (prompts per generate call). Pairs: ``pairing`` ("best_vs_worst" or "all_pairs"),
    ``margin`` (keep pairs whose score gap exceeds it), ``replay_share`` (ρ of each round's training set from
    earlier rounds' pairs), ``length_offset`` (iLR-DPO α: offset = α·(|y_w| − |y_l|) tokens). APO:
    ``apo_alpha`` (0 = off). Held-out: ``eval_samples_per_prompt`` (default K). ``seed`` drives sampling and
    replay; the trainer of round t uses ``args.seed + t − 1``.
    """

    rounds: int = 2
    samples_per_prompt: int = 4
    max_new_tokens: int = 64
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    generation_batch_size: int = 16
    pairing: str = "best_vs_worst"
    margin: float = 0.0
    replay_share: float = 0.0
    length_offset: float = 0.0
    apo_alpha: float = 0.0
    eval_samples_per_prompt: int | None = None
    seed: int = 0

    def __post_init__(self):
        if not isinstance(self.rounds, int) or self.rounds < 1:
            raise ValueError(f"rounds must be an int >= 1, got {self.rounds!r}")
        if self.pairing not in PAIRING_RULES:
            raise ValueError(f"pairing must be one of {PAIRING_RULES}, got {self.pairing!r}")
        if not 0 <= self.replay_share < 1:
            raise ValueError(f"replay_share must be in [0, 1), got {self.replay_share!r}")
        if self.margin < 0:
            raise ValueError(f"margin must be >= 0, got {self.margin!r}")
        self.sampling()  # validates the sampling options

    def sampling(self, held_out: bool = False) -> SamplingConfig:
        k = self.eval_samples_per_prompt if held_out and self.eval_samples_per_prompt else self.samples_per_prompt
        return SamplingConfig(samples_per_prompt=k, max_new_tokens=self.max_new_tokens,
                              temperature=self.temperature, top_p=self.top_p, top_k=self.top_k,
                              batch_size=self.generation_batch_size)


@dataclass
class RoundsResult:
    """``policy``: the last round's model; ``rounds``: each round's metrics (finished earlier ones read back from
    disk); ``initial``: the held-out metrics of the starting policy (empty without held-out prompts)."""

    policy: torch.nn.Module
    rounds: list[dict] = field(default_factory=list)
    initial: dict = field(default_factory=dict)


def round_dir(output_dir: str | os.PathLike, t: int) -> Path:
    return Path(output_dir) / f"round-{t}"


def write_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` through a synced temporary file in the same directory and ``os.replace``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    handle, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}-", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def write_jsonl(path: Path, rows: list[dict]) -> None:
    write_atomic(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def is_finished(directory: Path) -> bool:
    """True when ``directory`` holds a readable round marker."""
    try:
        return isinstance(json.loads((directory / MARKER).read_text(encoding="utf-8")), dict)
    except (OSError, ValueError):
        return False


def finished_rounds(output_dir: str | os.PathLike, rounds: int) -> int:
    """The number of leading rounds 1, 2, … of ``output_dir`` that are finished."""
    done = 0
    while done < rounds and is_finished(round_dir(output_dir, done + 1)):
        done += 1
    return done


# ---- models ------------------------------------------------------------------------------------------------------

def resolve_tokenizer(model, tokenizer=None):
    """The given tokenizer, the one saved in a model directory, or fastpref's local tokenizer."""
    if tokenizer is not None:
        return tokenizer
    if isinstance(model, (str, os.PathLike)) and Path(model).is_dir():
        from transformers import AutoTokenizer

        return AutoTokenizer.from_pretrained(str(model))
    from fastpref.data.tokenizer import build_tokenizer

    return build_tokenizer()


def load_policy(model, tokenizer, seed: int = 0) -> torch.nn.Module:
    """A causal LM from a model object (used as is, trained in place), a local directory, or a built-in tiny name
    (:data:`fastpref.data.tiny_models.MODEL_NAMES`, random weights from ``seed``, the tokenizer's special ids)."""
    if isinstance(model, torch.nn.Module):
        return model
    from transformers import AutoModelForCausalLM

    from fastpref.data.tiny_models import MODEL_NAMES, build_model

    if isinstance(model, str) and model in MODEL_NAMES:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            built = build_model(model, vocab_size=len(tokenizer))
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            setattr(built.config, name, getattr(tokenizer, name))
            setattr(built.generation_config, name, getattr(tokenizer, name))
        return built
    if not Path(model).is_dir():
        raise ValueError(f"model {model!r} is neither a model object, a local model directory nor a built-in name "
                         f"({', '.join(MODEL_NAMES)})")
    return AutoModelForCausalLM.from_pretrained(str(model))


def load_checkpoint(directory: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(str(directory))


@torch.no_grad()
def extrapolate(model: torch.nn.Module, start: torch.nn.Module, alpha: float) -> None:
    """APO's Nesterov step in parameter space, in place: θ ← θ + α·(θ − θ_start) for every floating parameter."""
    start_params = dict(start.named_parameters())
    for name, param in model.named_parameters():
        if name not in start_params:
            raise ValueError(f"extrapolate: parameter {name!r} of the trained model is not in the round's start model")
        if param.is_floating_point():
            param.add_(param - start_params[name].to(param.device, param.dtype), alpha=alpha)


# ---- one round ---------------------------------------------------------------------------------------------------

@dataclass
class _Run:
    root: Path
    args: Any
    config: RoundsConfig
    tokenizer: Any
    prompts: list
    scorer: Scorer
    eval_prompts: list | None
    eval_scorer: Scorer | None
    peft_config: Any
    keep_start: bool


def _token_length(tokenizer):
    return lambda text: len(tokenizer(text, add_special_tokens=False)["input_ids"])


def _score_samples(run: _Run, policy, previous, t: int) -> tuple[list[list[str]], torch.Tensor]:
    run.scorer.bind(RoundModels(policy=policy, reference=previous, tokenizer=run.tokenizer, round=t))
    responses = sample_responses(policy, run.tokenizer, run.prompts, run.config.sampling(), seed=run.config.seed + t)
    k = run.config.samples_per_prompt
    flat_prompts = [p for p in run.prompts for _ in range(k)]
    flat = [r for group in responses for r in group]
    scores = checked_scores(run.scorer.score(flat_prompts, flat), len(flat), "scorer").reshape(len(run.prompts), k)
    return responses, scores


def _pairs(run: _Run, directory: Path, responses, scores, pool: list[dict], t: int) -> tuple[list[dict], list[dict]]:
    """This round's new pairs and its replayed ones (both written to ``directory``)."""
    config = run.config
    write_jsonl(directory / "samples.jsonl", [
        {"prompt": p, "response": r, "score": s} for p, group, values in zip(run.prompts, responses, scores.tolist())
        for r, s in zip(group, values)])
    pairs = build_pairs(run.prompts, responses, scores, rule=config.pairing, margin=config.margin)
    replay = mix_replay(pairs, pool, config.replay_share, seed=config.seed + t) if config.replay_share else []
    if config.length_offset:
        pairs = add_length_offsets(pairs, config.length_offset, _token_length(run.tokenizer))
        replay = [row if "offset" in row else add_length_offsets([row], config.length_offset,
                                                                  _token_length(run.tokenizer))[0] for row in replay]
    write_jsonl(directory / "pairs.jsonl", pairs)
    if replay:
        write_jsonl(directory / "replay.jsonl", replay)
    return pairs, replay


def _train(run: _Run, policy, rows: list[dict], directory: Path, t: int) -> tuple[dict, torch.nn.Module]:
    """One PreferenceTrainer stage on ``rows`` with ``policy`` as model (and so as reference); returns its
    metrics and the trained model (LoRA adapters merged)."""
    from datasets import Dataset

    from fastpref.trainer import PreferenceTrainer

    args = dataclasses.replace(run.args, output_dir=str(directory / "trainer"),
                               ref_cache_dir=str(directory / "ref_cache"), seed=run.args.seed + t - 1)
    trainer = PreferenceTrainer(policy, args=args, train_dataset=Dataset.from_list(rows),
                                processing_class=run.tokenizer, peft_config=run.peft_config)
    output = trainer.train()
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    metrics = {"train_loss": output.training_loss, "train_steps": trainer.state.global_step,
               "reference_passes": trainer.reference_passes}
    if logged:
        metrics.update({f"last/{k}": v for k, v in logged[-1].items() if isinstance(v, (int, float))})
    trained = trainer.accelerator.unwrap_model(trainer.model)
    if callable(getattr(trained, "merge_and_unload", None)):
        trained = trained.merge_and_unload()
    return metrics, trained


def held_out_reward(policy, tokenizer, prompts: list, scorer: Scorer, config: RoundsConfig) -> dict:
    """Mean score (and mean response length in characters) of samples on held-out ``prompts``, drawn with the same
    seed in every round."""
    responses = sample_responses(policy, tokenizer, prompts, config.sampling(held_out=True),
                                 seed=config.seed + EVAL_SEED_OFFSET)
    flat = [r for group in responses for r in group]
    flat_prompts = [p for p, group in zip(prompts, responses) for _ in group]
    scores = checked_scores(scorer.score(flat_prompts, flat), len(flat), "eval scorer")
    return {"heldout_reward": scores.mean().item(), "heldout_length": sum(map(len, flat)) / max(len(flat), 1)}


def _run_round(run: _Run, t: int, policy, previous, pool: list[dict]):
    directory = round_dir(run.root, t)
    responses, scores = _score_samples(run, policy, previous, t)
    pairs, replay = _pairs(run, directory, responses, scores, pool, t)
    start = copy.deepcopy(policy).eval().requires_grad_(False) if run.keep_start else None
    metrics = {"round": t, "pairs": len(pairs), "replayed_pairs": len(replay),
               "sample_reward": scores.mean().item(), "sample_reward_max_mean": scores.max(dim=1).values.mean().item()}
    if pairs:
        train_metrics, policy = _train(run, policy, training_rows(pairs + replay), directory, t)
        metrics.update(train_metrics)
        if run.config.apo_alpha:
            extrapolate(policy, start, run.config.apo_alpha)
    else:
        warnings.warn(f"round {t}: no pairs (every prompt's samples tie within margin={run.config.margin}); the "
                      "policy is carried over untrained", RuntimeWarning, stacklevel=3)
    reference = start if pairs else previous  # what the (possibly untrained) policy was trained against
    if run.eval_prompts:
        run.eval_scorer.bind(RoundModels(policy=policy, reference=reference, tokenizer=run.tokenizer, round=t))
        metrics.update(held_out_reward(policy, run.tokenizer, run.eval_prompts, run.eval_scorer, run.config))
    policy.save_pretrained(str(directory / "checkpoint"))
    run.tokenizer.save_pretrained(str(directory / "checkpoint"))
    write_atomic(directory / "metrics.json", json.dumps(metrics, indent=2))
    write_atomic(directory / MARKER, json.dumps({"round": t, "pairs": len(pairs)}))
    return policy, reference, metrics, pairs


# ---- the loop ----------------------------------------------------------------------------------------------------

def _check_prompts(prompts, name: str) -> list:
    prompts = list(prompts)
    if not prompts:
        raise ValueError(f"{name} is empty")
    for prompt in prompts:
        if not ((isinstance(prompt, str) and prompt) or (isinstance(prompt, list) and prompt)):
            raise ValueError(f"{name}: every prompt must be a non-empty string or message list, got {prompt!r}")
    return prompts


def _prepare_output(root: Path, config: RoundsConfig) -> int:
    """Record the settings, remove unfinished (or stale) round directories, return the finished rounds."""
    settings = {k: v for k, v in dataclasses.asdict(config).items() if k != "rounds"}
    record = root / "rounds.json"
    if record.exists():
        saved = json.loads(record.read_text(encoding="utf-8"))
        changed = sorted(k for k in set(saved) | set(settings) if saved.get(k) != settings.get(k))
        if changed:
            warnings.warn(f"{root}: resuming with changed settings {changed}; finished rounds keep the old ones",
                          RuntimeWarning, stacklevel=3)
    write_atomic(record, json.dumps(settings, indent=2))
    done = finished_rounds(root, config.rounds)
    if done < config.rounds:  # the rounds after the last finished one are redone: clear what they left
        for directory in root.glob("round-*"):
            suffix = directory.name[len("round-"):]
            if directory.is_dir() and suffix.isdigit() and int(suffix) > done:
                shutil.rmtree(directory)
    return done


def _resumed_state(run: _Run, model, done: int, seed: int):
    """(policy, the policy's own reference or None) when rounds 1..done are finished."""
    if done == 0:
        return load_policy(model, run.tokenizer, seed), None
    policy = load_checkpoint(round_dir(run.root, done) / "checkpoint")
    needs_previous = run.scorer.needs_models or (run.eval_scorer is not None and run.eval_scorer.needs_models)
    if not needs_previous:
        return policy, None
    if done == 1:
        previous = load_policy(model, run.tokenizer, seed)
    else:
        previous = load_checkpoint(round_dir(run.root, done - 1) / "checkpoint")
    return policy, previous.eval().requires_grad_(False)


def _initial_metrics(run: _Run, policy, done: int) -> dict:
    path = run.root / "initial_metrics.json"
    if path.exists():
        return json.loads(path.read_text(encoding="utf-8"))
    if not run.eval_prompts or done > 0:
        return {}
    run.eval_scorer.bind(RoundModels(policy=policy, reference=None, tokenizer=run.tokenizer, round=0))
    metrics = held_out_reward(policy, run.tokenizer, run.eval_prompts, run.eval_scorer, run.config)
    write_atomic(path, json.dumps(metrics, indent=2))
    return metrics


def run_rounds(model, prompts, scorer, *, args, config: RoundsConfig | None = None, tokenizer=None,
               peft_config=None, eval_prompts=None, eval_scorer=None, replay_data=None) -> RoundsResult:
    """Run ``config.rounds`` rounds of sample → score → pair → train (module docstring) under ``args.output_dir``.

    Args:
        model: a causal LM object (trained in place), a local model directory, or a built-in tiny name.
        prompts: training prompts (strings, or lists of ``{"role", "content"}`` messages).
        scorer: a :class:`fastpref.rounds.scorers.Scorer` (or any object with ``score(prompts, responses)``).
        args: the :class:`fastpref.PreferenceConfig` of every round's trainer; ``output_dir`` is the rounds' root
            (each round's trainer writes to ``round-t/trainer``, its reference cache to ``round-t/ref_cache``).
        config: :class:`RoundsConfig`.
        tokenizer: default: the model directory's, else fastpref's local tokenizer.
        peft_config: train LoRA adapters each round (merged into the policy after the round).
        eval_prompts / eval_scorer: held-out prompts and their scorer (default: ``scorer``); each round reports
            ``heldout_reward``, and ``initial_metrics.json`` holds the starting policy's.
        replay_data: offline pairs (TRL rows) that join the replay pool from round 1.
    """
    from fastpref.trainer import PreferenceConfig

    if not isinstance(args, PreferenceConfig):
        raise TypeError(f"args must be a fastpref.PreferenceConfig, got {type(args).__name__}")
    config = RoundsConfig() if config is None else config
    scorer = as_scorer(scorer)
    eval_prompts = _check_prompts(eval_prompts, "eval_prompts") if eval_prompts is not None else None
    eval_scorer = as_scorer(eval_scorer) if eval_scorer is not None else scorer
    tokenizer = resolve_tokenizer(model, tokenizer)
    run = _Run(root=Path(args.output_dir), args=args, config=config, tokenizer=tokenizer,
               prompts=_check_prompts(prompts, "prompts"), scorer=scorer, eval_prompts=eval_prompts,
               eval_scorer=eval_scorer, peft_config=peft_config,
               keep_start=scorer.needs_models or eval_scorer.needs_models or bool(config.apo_alpha))
    done = _prepare_output(run.root, config)
    policy, previous = _resumed_state(run, model, done, args.seed)
    policy.to(args.device)
    if previous is not None:
        previous.to(args.device)
    result = RoundsResult(policy=policy, initial=_initial_metrics(run, policy, done), rounds=[
        json.loads((round_dir(run.root, t) / "metrics.json").read_text(encoding="utf-8")) for t in range(1, done + 1)])
    pool = [dict(row) for row in replay_data or []]
    for t in range(1, done + 1):
        pool += read_jsonl(round_dir(run.root, t) / "pairs.jsonl")
    for t in range(done + 1, config.rounds + 1):
        policy, previous, metrics, pairs = _run_round(run, t, policy, previous, pool)
        pool += pairs
        result.rounds.append(metrics)
    result.policy = policy
    return result
