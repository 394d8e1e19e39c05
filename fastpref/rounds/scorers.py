"""Scorers: ``score(prompts, responses) -> torch.Tensor`` [N] float64, one score per (prompt, response).

- :class:`RewardModelScorer`: a sequence-classification reward model (``AutoModelForSequenceClassification``,
  from a local path or an object); the score is its logit for the text prompt ⊕ response.
- :class:`JudgeScorer`: a callable judge ``judge(prompt, response)`` returning a number or a reply that
  :func:`fastpref.data.parse_score` reads ("Score: -3.5" → −3.5).
- :class:`ImplicitRewardScorer`: the policy's own DPO implicit reward β·[log π(y|x) − log π_ref(y|x)] (DICE,
  arXiv 2406.09760), both log-probs from the fused head (:func:`fastpref.model.head.sequence_logps`, no logits).
- :class:`LengthPenalty`: −α·|y| in tokens or characters (DICE's length-regularized reward shaping; iLR-DPO's
  length term, arXiv 2406.11817, when used to rank samples).
- :class:`KeywordCount`: how often given strings occur in the response — a known reward computable from text;
  :class:`DemoTaskReward`: the known reward of the synthetic demo task.

Scorers compose: ``rm + LengthPenalty(0.01)`` and ``2.0 * judge`` are :class:`SumScorer` s. A scorer that needs
the round's models (the implicit reward) sets ``needs_models`` and gets them from :meth:`Scorer.bind`, which the
round loop calls before scoring each round.
"""

from __future__ import annotations

import importlib
import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from fastpref.data import parse_score, tokenize_pair
from fastpref.rounds.sampling import Prompt


@dataclass
class RoundModels:
    """What a round gives its scorers: the current ``policy``; ``reference``, the model the policy was trained
    against in the previous round (None in round 1); the policy's ``tokenizer``; the 1-based ``round``."""

    policy: torch.nn.Module
    reference: torch.nn.Module | None
    tokenizer: Any
    round: int


class Scorer:
    """Base of the scorers: subclasses implement :meth:`score`; ``+`` and ``*`` build :class:`SumScorer` s."""

    needs_models = False

    def score(self, prompts: Sequence[Prompt], responses: Sequence[str]) -> torch.Tensor:
        raise NotImplementedError

    def bind(self, models: RoundModels) -> None:
        """Called by the round loop before each round's scoring (no-op unless the scorer needs the models)."""

    def __add__(self, other: Scorer) -> SumScorer:
        return SumScorer([(1.0, self), (1.0, as_scorer(other))])

    def __radd__(self, other) -> Scorer:  # sum([a, b]) starts from 0
        return self if isinstance(other, (int, float)) and other == 0 else as_scorer(other) + self

    def __mul__(self, weight: float) -> SumScorer:
        return SumScorer([(float(weight), self)])

    __rmul__ = __mul__


def as_scorer(scorer) -> Scorer:
    """``scorer`` itself when it is a :class:`Scorer`; an object with a ``score(prompts, responses)`` method
    wrapped into one."""
    if isinstance(scorer, Scorer):
        return scorer
    if callable(getattr(scorer, "score", None)):
        return _Wrapped(scorer)
    raise TypeError(f"a scorer needs a score(prompts, responses) method; got {type(scorer).__name__}")


class _Wrapped(Scorer):
    def __init__(self, inner):
        self.inner = inner
        self.needs_models = bool(getattr(inner, "needs_models", False))

    def score(self, prompts, responses):
        return self.inner.score(prompts, responses)

    def bind(self, models):
        if callable(getattr(self.inner, "bind", None)):
            self.inner.bind(models)


def checked_scores(scores, count: int, name: str) -> torch.Tensor:
    """``scores`` as a float64 CPU tensor [count]; raises naming ``name`` on a wrong shape or a non-finite value."""
    values = torch.as_tensor(scores, dtype=torch.float64).detach().cpu().reshape(-1)
    if values.numel() != count:
        raise ValueError(f"{name} returned {values.numel()} scores for {count} responses")
    if not torch.isfinite(values).all():
        bad = int((~torch.isfinite(values)).nonzero()[0])
        raise ValueError(f"{name} returned a non-finite score {values[bad].item()} for response {bad}")
    return values


def _check_pairs(prompts: Sequence, responses: Sequence[str]) -> None:
    if len(prompts) != len(responses):
        raise ValueError(f"prompts and responses must have the same length, got {len(prompts)} and "
                         f"{len(responses)}")
    for response in responses:
        if not isinstance(response, str):
            raise TypeError(f"responses must be strings, got {type(response).__name__}")


class SumScorer(Scorer):
    """Σ_i w_i · s_i(x, y) over weighted terms ``[(w_i, scorer_i), ...]``."""

    def __init__(self, terms: Sequence[tuple[float, Scorer]]):
        flat: list[tuple[float, Scorer]] = []
        for weight, scorer in terms:
            if not math.isfinite(weight):
                raise ValueError(f"scorer weights must be finite, got {weight!r}")
            scorer = as_scorer(scorer)
            if isinstance(scorer, SumScorer):
                flat += [(weight * w, s) for w, s in scorer.terms]
            else:
                flat.append((float(weight), scorer))
        if not flat:
            raise ValueError("SumScorer needs at least one term")
        self.terms = flat
        self.needs_models = any(s.needs_models for _, s in flat)

    def score(self, prompts, responses):
        total = torch.zeros(len(responses), dtype=torch.float64)
        for weight, scorer in self.terms:
            total += weight * checked_scores(scorer.score(prompts, responses), len(responses), type(scorer).__name__)
        return total

    def bind(self, models):
        for _, scorer in self.terms:
            scorer.bind(models)


class JudgeScorer(Scorer):
    """``judge(prompt, response)`` per response: a number, or text read by :func:`fastpref.data.parse_score`."""

    def __init__(self, judge: Callable[[Prompt, str], float | str]):
        if not callable(judge):
            raise TypeError(f"judge must be callable, got {type(judge).__name__}")
        self.judge = judge

    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        values = []
        for prompt, response in zip(prompts, responses):
            verdict = self.judge(prompt, response)
            values.append(parse_score(verdict) if isinstance(verdict, str) else float(verdict))
        return checked_scores(values, len(responses), "judge")

    @classmethod
    def from_import_path(cls, path: str) -> JudgeScorer:
        """The judge named ``"package.module:function"``."""
        module, _, name = path.partition(":")
        if not module or not name:
            raise ValueError(f"a judge import path looks like 'package.module:function', got {path!r}")
        return cls(getattr(importlib.import_module(module), name))


class KeywordCount(Scorer):
    """Σ_k (occurrences of ``keywords[k]`` in the response, non-overlapping) — case-sensitive unless
    ``ignore_case``."""

    def __init__(self, keywords: Sequence[str], ignore_case: bool = False):
        keywords = [keywords] if isinstance(keywords, str) else list(keywords)
        if not keywords or not all(isinstance(k, str) and k for k in keywords):
            raise ValueError(f"keywords must be non-empty strings, got {keywords!r}")
        self.keywords = [k.lower() for k in keywords] if ignore_case else keywords
        self.ignore_case = ignore_case

    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        texts = [r.lower() for r in responses] if self.ignore_case else list(responses)
        return torch.tensor([float(sum(t.count(k) for k in self.keywords)) for t in texts], dtype=torch.float64)


class LengthPenalty(Scorer):
    """−α·|y|: ``unit="tokens"`` counts the response's tokens (the tokenizer given here, else the policy's from
    :meth:`bind`), ``unit="chars"`` its characters. DICE's length-regularized reward shaping r − α|y|."""

    def __init__(self, alpha: float, unit: str = "tokens", tokenizer=None):
        if not math.isfinite(alpha) or alpha < 0:
            raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
        if unit not in ("tokens", "chars"):
            raise ValueError(f"unit must be 'tokens' or 'chars', got {unit!r}")
        self.alpha, self.unit, self.tokenizer = float(alpha), unit, tokenizer

    def bind(self, models):
        if self.tokenizer is None:
            self.tokenizer = models.tokenizer

    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        if self.unit == "chars":
            lengths = [len(r) for r in responses]
        else:
            if self.tokenizer is None:
                raise ValueError("LengthPenalty(unit='tokens') needs a tokenizer: pass one or let the round loop "
                                 "bind the policy's")
            lengths = [len(self.tokenizer(r, add_special_tokens=False)["input_ids"]) for r in responses]
        return -self.alpha * torch.tensor(lengths, dtype=torch.float64)


def _pair_text(tokenizer, prompt: Prompt, response: str) -> str:
    if isinstance(prompt, str):
        return prompt + response
    return tokenizer.apply_chat_template([*prompt, {"role": "assistant", "content": response}], tokenize=False)


class RewardModelScorer(Scorer):
    """The logit ``label`` of a sequence-classification reward model on prompt ⊕ response (for message prompts,
    the chat template of the conversation with the response as the assistant turn).

    ``model``: a local directory (loaded with ``AutoModelForSequenceClassification``, its tokenizer from the same
    directory unless ``tokenizer`` is given) or a model object (then ``tokenizer`` is required). Texts are scored
    ``batch_size`` at a time, right-padded; the model pools its last non-pad token (``config.pad_token_id`` is set
    from the tokenizer when missing). ``max_length`` truncates from the left (the response end survives).
    """

    def __init__(self, model, tokenizer=None, *, label: int = 0, batch_size: int = 16, max_length: int | None = None,
                 device: str | torch.device | None = None):
        from transformers import AutoModelForSequenceClassification, AutoTokenizer

        if isinstance(model, str):
            tokenizer = tokenizer if tokenizer is not None else AutoTokenizer.from_pretrained(model)
            model = AutoModelForSequenceClassification.from_pretrained(model)
        if tokenizer is None:
            raise ValueError("RewardModelScorer: pass the reward model's tokenizer with a model object")
        if tokenizer.pad_token_id is None:
            raise ValueError("RewardModelScorer: the reward model's tokenizer has no pad token")
        if not 0 <= label < model.config.num_labels:
            raise ValueError(f"label must index the reward model's {model.config.num_labels} logits, got {label}")
        if model.config.pad_token_id is None:
            model.config.pad_token_id = tokenizer.pad_token_id
        device = device if device is not None else ("cuda" if torch.cuda.is_available() else "cpu")
        self.model = model.to(device).eval().requires_grad_(False)
        self.tokenizer, self.label, self.batch_size, self.max_length = tokenizer, label, batch_size, max_length

    @torch.no_grad()
    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        device = next(self.model.parameters()).device
        values = []
        for start in range(0, len(responses), self.batch_size):
            ids = [self._ids(p, r) for p, r in zip(prompts[start:start + self.batch_size],
                                                    responses[start:start + self.batch_size])]
            width = max(len(i) for i in ids)
            input_ids = torch.full((len(ids), width), self.tokenizer.pad_token_id, dtype=torch.long)
            attention_mask = torch.zeros((len(ids), width), dtype=torch.long)
            for row, seq in enumerate(ids):
                input_ids[row, :len(seq)] = torch.tensor(seq)
                attention_mask[row, :len(seq)] = 1
            logits = self.model(input_ids=input_ids.to(device), attention_mask=attention_mask.to(device)).logits
            values.append(logits[:, self.label].double().cpu())
        return checked_scores(torch.cat(values) if values else [], len(responses), "reward model")

    def _ids(self, prompt: Prompt, response: str) -> list[int]:
        text = _pair_text(self.tokenizer, prompt, response)
        ids = self.tokenizer(text, add_special_tokens=isinstance(prompt, str))["input_ids"]
        return ids[-self.max_length:] if self.max_length else ids


def response_token_ids(tokenizer, prompt: Prompt, response: str) -> tuple[list[int], list[int]]:
    """(prompt ids, response ids) of one sample exactly as the trainer tokenizes it (eos appended)."""
    pair = {"prompt": prompt, "chosen": _as_completion(prompt, response), "rejected": _as_completion(prompt, response)}
    out = tokenize_pair(pair, tokenizer, max_length=None)
    return out["prompt_input_ids"], out["chosen_input_ids"]


def _as_completion(prompt: Prompt, response: str):
    return response if isinstance(prompt, str) else [{"role": "assistant", "content": response}]


class ImplicitRewardScorer(Scorer):
    """DICE's score: β·[log π(y|x) − log π_ref(y|x)] (summed over response tokens, or averaged per token with
    ``average=True``), both from the fused log-prob head.

    π is the round's policy; π_ref the model it was trained against in the previous round (from :meth:`bind`),
    or, in round 1 or with ``fixed_reference=True``, the ``reference`` given here (e.g. the SFT model a DPO policy
    was trained from). ``batch_size`` samples share one packed forward.
    """

    needs_models = True

    def __init__(self, beta: float = 0.1, reference: torch.nn.Module | None = None, *, average: bool = False,
                 fixed_reference: bool = False, batch_size: int = 16):
        if not math.isfinite(beta) or beta <= 0:
            raise ValueError(f"beta must be a finite number > 0, got {beta!r}")
        if fixed_reference and reference is None:
            raise ValueError("fixed_reference=True needs a reference model")
        self.beta, self.own_reference, self.average = float(beta), reference, average
        self.fixed_reference, self.batch_size = fixed_reference, batch_size
        self.policy = self.reference = self.tokenizer = None

    def bind(self, models):
        self.policy, self.tokenizer = models.policy, models.tokenizer
        use_own = self.fixed_reference or models.reference is None
        self.reference = self.own_reference if use_own else models.reference
        if self.reference is None:
            raise ValueError(f"ImplicitRewardScorer in round {models.round}: no reference model — the policy is "
                             "its own reference here (the implicit reward would be 0); pass reference= (the model "
                             "the initial policy was DPO-trained from)")

    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        if self.policy is None:
            raise ValueError("ImplicitRewardScorer.bind(models) must be called before score()")
        samples = [response_token_ids(self.tokenizer, p, r) for p, r in zip(prompts, responses)]
        policy = sequence_logps_of(self.policy, samples, self.batch_size)
        reference = sequence_logps_of(self.reference, samples, self.batch_size)
        rewards = self.beta * (policy - reference)
        if self.average:
            rewards = rewards / torch.tensor([len(r) for _, r in samples], dtype=torch.float64)
        return checked_scores(rewards, len(responses), "implicit reward")


@torch.no_grad()
def sequence_logps_of(model, samples: Sequence[tuple[list[int], list[int]]], batch_size: int = 16) -> torch.Tensor:
    """log π(response | prompt) [N] float64 for (prompt ids, response ids) samples, ``batch_size`` per packed
    forward through the fused head (eval mode; the model's mode is restored)."""
    from fastpref.model.head import sequence_logps

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    out = []
    try:
        for start in range(0, len(samples), batch_size):
            ids, positions, labels, bounds = [], [], [], [0]
            for prompt, response in samples[start:start + batch_size]:
                sequence = prompt + response
                ids += sequence
                positions += range(len(sequence))
                labels += [-100] * (len(prompt) - 1) + response + [-100]
                bounds.append(len(ids))
            as_row = lambda values: torch.tensor([values], dtype=torch.long, device=device)  # noqa: E731
            result = sequence_logps(model, as_row(ids), as_row(positions), as_row(labels),
                                    torch.tensor(bounds, dtype=torch.long, device=device))
            out.append(result.logps.double().cpu())
    finally:
        model.train(was_training)
    return torch.cat(out) if out else torch.zeros(0, dtype=torch.float64)


_DEMO_PROMPT = re.compile(r"say (\w+)(?: and|, then) add (\d+)\+(\d+)\.", re.IGNORECASE)


class DemoTaskReward(Scorer):
    """The known reward of fastpref's synthetic demo task (:mod:`fastpref.data.synthetic`), read from text: for a
    prompt "Say {word} and add {a}+{b}." a response earns 1 for the opener "Sure!", 2 for the word, 3 for
    "{a}+{b}={a+b}" and 1 for the closer "Done.", scaled to 0..10 (the scores of the bundled demo pairs)."""

    def score(self, prompts, responses):
        _check_pairs(prompts, responses)
        values = []
        for prompt, response in zip(prompts, responses):
            match = _DEMO_PROMPT.search(prompt if isinstance(prompt, str) else prompt[-1]["content"])
            if match is None:
                raise ValueError(f"DemoTaskReward: {prompt!r} is not a prompt of the synthetic demo task")
            word, a, b = match.group(1), int(match.group(2)), int(match.group(3))
            words = re.findall(r"[A-Za-z]+", response)
            points = (1 if "Sure!" in response else 0) + (2 if word in words else 0) \
                + (3 if re.search(rf"(?<!\d){a}\+{b}={a + b}(?!\d)", response) else 0) \
                + (1 if "Done." in response else 0)
            values.append(round(10.0 * points / 7, 2))
        return torch.tensor(values, dtype=torch.float64)
