"""setup.py as pip's build isolation runs it (torch not importable): a short message, not a traceback; the
pure-Python switch FASTPREF_NO_EXT read with fastpref's one flag rule (1/true/yes/on, any case, stripped)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

# Runs setup.py as pip does (`setup.py --name` stands for the metadata step), with `import torch` failing as it
# does inside an isolated build environment.
HIDE_TORCH_AND_RUN_SETUP = """
import runpy, sys
class HideTorch:
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)
sys.meta_path.insert(0, HideTorch())
sys.argv = ["setup.py", "--name"]
runpy.run_path("setup.py", run_name="__main__")
"""


def _setup_without_torch(no_ext: str | None) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "FASTPREF_NO_EXT"}
    if no_ext is not None:
        env["FASTPREF_NO_EXT"] = no_ext
    return subprocess.run([sys.executable, "-c", HIDE_TORCH_AND_RUN_SETUP], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("no_ext", [None, "0", "", "false", "no", "2"])
def test_build_without_torch_stops_in_a_few_lines_naming_the_fix(no_ext):
    done = _setup_without_torch(no_ext)
    assert done.returncode != 0
    assert "Traceback" not in done.stderr and len(done.stderr.strip().splitlines()) <= 8
    assert "No module named 'torch'" in done.stderr
    assert "pip install --no-build-isolation ." in done.stderr and "FASTPREF_NO_EXT=1" in done.stderr


@pytest.mark.parametrize("no_ext", ["1", " TRUE ", "Yes", "on"])
def test_pure_python_build_needs_no_torch(no_ext):
    done = _setup_without_torch(no_ext)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == "fastpref"
    assert "building no compiled extension" in done.stderr
