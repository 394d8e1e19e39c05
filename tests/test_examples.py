"""Every runnable example under ``examples/`` (one per seed-paper family) runs to the end on the CPU.

Each example checks its own outcome and exits non-zero when it does not hold (a loss that did not fall, a
weight that did not reach the loss, …), so this test fails on a broken example, not only on a crash. The online
rounds example takes minutes (an SFT warm-up, then sampling): it is marked slow and run with fewer steps.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"
# Command-line arguments that shorten an example for the test (the defaults are what a user runs).
SHORTER = {"rounds_known_reward.py": ["--rounds", "1", "--warmup_steps", "4", "--prompts", "8", "--eval_prompts", "4"]}
SLOW = {"rounds_known_reward.py"}


def _examples():
    for path in sorted(EXAMPLES.glob("*.py")):
        marks = [pytest.mark.slow] if path.name in SLOW else []
        yield pytest.param(path, id=path.stem, marks=marks)


@pytest.mark.parametrize("path", list(_examples()))
def test_example_runs(path, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    args = [sys.executable, str(path), *SHORTER.get(path.name, [])]
    result = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=900)
    assert result.returncode == 0, f"{path.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
