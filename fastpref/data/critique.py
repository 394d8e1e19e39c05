"""Self-critique preference pairs with soft labels (Gallego, "Refined Direct Preference Optimization with
Synthetic Data for Behavioral Alignment of LLMs" — rDPO, arXiv 2402.08005).

For each prompt x a teacher answers (y₀ = generate(x)), critiques its answer (c = generate(critique(x, y₀))) and
revises it (y₁ = generate(revise(x, y₀, c))). An external judge scores both responses, s₀ = judge(x, y₀) and
s₁ = judge(x, y₁); the revision is ``chosen``, the first answer ``rejected``, and the soft label is

    τ = σ((s₁ − s₀) / T),

the probability that the chosen response is the better one (used by the ``rdpo`` loss:
−τ log σ(βh) − (1−τ) log σ(−βh)). A judge may return a number or text such as ``"Score: -3.5"``; the
text is parsed by :func:`parse_score`, which keeps the sign (the original rDPO notebooks dropped minus signs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable

from fastpref.data.prompts import CRITIQUE_TEMPLATE, REVISE_TEMPLATE

# A signed decimal number; ASCII hyphen-minus, the Unicode minus sign and the en dash all count as minus, but
# not a dash right after a word or number ("3-5" is a range, not 3 and −5).
_NUMBER = r"((?<![\w.])[-+−–]?\s*\d+(?:\.\d+)?(?:[eE][-+]?\d+)?)"
_LABELLED = re.compile(r"(?:score|rating)\s*(?:[:=]|is)?\s*" + _NUMBER, re.IGNORECASE)
_ANY = re.compile(_NUMBER)


def parse_score(text: str) -> float:
    """The score in a judge's reply: the number after "score"/"rating" if there is one (the last such), else
    the last number in the text; signs kept (``"Score: -3.5"`` → −3.5). Raises ``ValueError`` without a number."""
    if not isinstance(text, str):
        raise TypeError(f"judge reply must be a string or a number, got {type(text).__name__}")
    found = _LABELLED.findall(text) or _ANY.findall(text)
    if not found:
        raise ValueError(f"no score in the judge's reply {text!r}")
    number = re.sub(r"\s+", "", found[-1]).replace("−", "-").replace("–", "-")
    return float(number)


def _judged(judge: Callable[[str, str], float | str], prompt: str, response: str) -> float:
    verdict = judge(prompt, response)
    score = parse_score(verdict) if isinstance(verdict, str) else float(verdict)
    if not math.isfinite(score):
        raise ValueError(f"judge returned a non-finite score {verdict!r} for prompt {prompt!r}")
    return score


def self_critique_pairs(prompts: Iterable[str], generate: Callable[[str], str],
                        judge: Callable[[str, str], float | str], *, critique_template: str = CRITIQUE_TEMPLATE,
                        revise_template: str = REVISE_TEMPLATE, temperature: float = 1.0,
                        keep_identical: bool = False) -> list[dict]:
    """Build rDPO self-critique pairs (see the module docstring).

    ``critique_template`` is formatted with ``prompt`` and ``response``; ``revise_template`` with ``prompt``,
    ``response`` and ``critique``. Returns one row per prompt with ``prompt``, ``chosen`` (the revision),
    ``rejected`` (the first answer), ``score_chosen``, ``score_rejected`` and ``tau`` = σ((s_chosen −
    s_rejected)/temperature). A revision identical to the first answer carries no preference and is skipped
    unless ``keep_identical``.
    """
    if not isinstance(temperature, (int, float)) or not temperature > 0 or not math.isfinite(temperature):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    rows = []
    for prompt in prompts:
        if not isinstance(prompt, str) or not prompt:
            raise ValueError(f"prompts must be non-empty strings, got {prompt!r}")
        answer = generate(prompt)
        critique = generate(critique_template.format(prompt=prompt, response=answer))
        revision = generate(revise_template.format(prompt=prompt, response=answer, critique=critique))
        if revision == answer and not keep_identical:
            continue
        score_revision, score_answer = _judged(judge, prompt, revision), _judged(judge, prompt, answer)
        margin = (score_revision - score_answer) / temperature
        tau = 1.0 / (1.0 + math.exp(-margin)) if margin >= 0 else math.exp(margin) / (1.0 + math.exp(margin))
        rows.append({"prompt": prompt, "chosen": revision, "rejected": answer,
                     "score_chosen": score_revision, "score_rejected": score_answer, "tau": tau})
    return rows
