"""A synthetic preference task with graded quality scores, small enough for a random-init tiny model.

Each prompt asks for a keyword and a sum: ``"Say fox and add 3+8."``. A response has four parts, each either
right or wrong, and its quality score adds the weights of the parts it gets right (scaled to 0..10):

============  =========================  ===========================  ======
part          right                      wrong                        weight
============  =========================  ===========================  ======
opener        ``Sure!``                  ``Ugh.``                     1
keyword       the prompt's word          another word                 2
sum           ``3+8=11.``                ``3+8=9.`` (off by 1..3)     3
closer        ``Done.``                  ``Whatever.``                1
============  =========================  ===========================  ======

A pair holds two responses to the same prompt: ``chosen`` gets a random non-empty set of parts right (each part
with probability 0.6), ``rejected`` spoils a random non-empty subset of those, so the rejected response's right
parts are a strict subset of the chosen one's and every pair is strictly ordered by score. The signal is local
and graded: the opener and closer are global style tokens (learned in a few dozen steps), the keyword needs a
copy from the prompt, the sum a lookup of the operands — so held-out reward accuracy rises early and keeps
improving as the harder parts are learned.

The bundled ``demo_prefs.jsonl`` is ``generate(DEMO_SIZE, DEMO_SEED)`` written by :func:`write_demo_file`;
rows ``[0, DEMO_TRAIN_SIZE)`` are the training split and the remaining ``DEMO_TEST_SIZE`` rows the held-out
split (see :func:`fastpref.data.load_preference_dataset`).
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = (
    "cat", "dog", "sun", "tree", "fish", "bird", "moon", "star", "rock", "leaf", "rain", "snow",
    "milk", "bread", "boat", "lamp", "door", "ring", "bell", "kite", "frog", "bee", "owl", "fox",
)
PROMPT_TEMPLATES = ("Say {word} and add {a}+{b}.", "Please say {word}, then add {a}+{b}.")
PART_WEIGHTS = {"opener": 1, "keyword": 2, "sum": 3, "closer": 1}

DEMO_SEED = 0
DEMO_TRAIN_SIZE = 2048
DEMO_TEST_SIZE = 256
DEMO_SIZE = DEMO_TRAIN_SIZE + DEMO_TEST_SIZE
DEMO_PATH = Path(__file__).with_name("demo_prefs.jsonl")


def _response(rng: random.Random, word: str, a: int, b: int, right: dict[str, bool]) -> str:
    opener = "Sure!" if right["opener"] else "Ugh."
    keyword = word if right["keyword"] else rng.choice([w for w in WORDS if w != word])
    total = a + b if right["sum"] else max(0, a + b + rng.choice((-3, -2, -1, 1, 2, 3)))
    if not right["sum"] and total == a + b:  # the clamp at 0 landed on the right answer
        total = a + b + rng.choice((1, 2, 3))
    closer = "Done." if right["closer"] else "Whatever."
    return f" {opener} {keyword}. {a}+{b}={total}. {closer}"


def _score(right: dict[str, bool]) -> float:
    return round(10.0 * sum(PART_WEIGHTS[p] for p, ok in right.items() if ok) / sum(PART_WEIGHTS.values()), 2)


def _prompts(n: int, seed: int):
    """Check ``n``; return ``random.Random(seed)`` and a lazy iterator of ``n`` (word, a, b, prompt) draws from it,
    between which the caller draws each row's responses from the same generator."""
    if not isinstance(n, int) or n < 0:
        raise ValueError(f"n must be a non-negative int, got {n!r}")
    rng = random.Random(seed)
    return rng, (_prompt(rng) for _ in range(n))


def _prompt(rng: random.Random) -> tuple[str, int, int, str]:
    word, a, b = rng.choice(WORDS), rng.randrange(10), rng.randrange(10)
    return word, a, b, rng.choice(PROMPT_TEMPLATES).format(word=word, a=a, b=b)


def generate(n: int, seed: int) -> list[dict]:
    """Return ``n`` preference rows (prompt, chosen, rejected, score_chosen, score_rejected), deterministic in
    ``seed``; ``score_chosen > score_rejected`` in every row."""
    rng, prompts = _prompts(n, seed)
    rows = []
    for word, a, b, prompt in prompts:
        better = {part: rng.random() < 0.6 for part in PART_WEIGHTS}
        if not any(better.values()):
            better[rng.choice(tuple(PART_WEIGHTS))] = True
        right_parts = [part for part, ok in better.items() if ok]
        spoiled = rng.sample(right_parts, rng.randint(1, len(right_parts)))
        worse = {part: ok and part not in spoiled for part, ok in better.items()}
        rows.append({
            "prompt": prompt,
            "chosen": _response(rng, word, a, b, better),
            "rejected": _response(rng, word, a, b, worse),
            "score_chosen": _score(better),
            "score_rejected": _score(worse),
        })
    return rows


def generate_ranked(n: int, k: int, seed: int) -> list[dict]:
    """Return ``n`` ranked rows (prompt, completions, scores) of ``k`` responses each, deterministic in ``seed``: each
    response gets each part right with probability 0.5 and is scored as above (equal scores can occur)."""
    rng, prompts = _prompts(n, seed)
    if not isinstance(k, int) or k < 2:
        raise ValueError(f"k must be an int >= 2, got {k!r}")
    rows = []
    for word, a, b, prompt in prompts:
        parts = [{part: rng.random() < 0.5 for part in PART_WEIGHTS} for _ in range(k)]
        rows.append({"prompt": prompt, "completions": [_response(rng, word, a, b, right) for right in parts],
                     "scores": [_score(right) for right in parts]})
    return rows


def demo_rows() -> list[dict]:
    """The rows of the bundled demo file, as the generator produces them."""
    return generate(DEMO_SIZE, DEMO_SEED)


def write_demo_file(path: str | Path = DEMO_PATH) -> Path:
    """(Re)write the bundled demo file:
    ``python -c "from fastpref.data.synthetic import write_demo_file; write_demo_file()"``."""
    path = Path(path)
    with open(path, "w", encoding="utf-8") as f:
        for row in demo_rows():
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    return path

