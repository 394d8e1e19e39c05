"""The ``fastpref`` command line: train on a JSONL file, precompute-ref with cache reuse, help, bench."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
from trainer_helpers import demo_rows

from fastpref import cli


@pytest.fixture
def jsonl(tmp_path):
    path = tmp_path / "prefs.jsonl"
    rows = demo_rows("train", 6)
    path.write_text("".join(json.dumps({k: rows[i][k] for k in ("prompt", "chosen", "rejected")}) + "\n"
                            for i in range(len(rows))))
    return path


def _common(tmp_path) -> list[str]:
    return ["--ref_cache_dir", str(tmp_path / "cache"), "--report_to", "none", "--use_cpu", "true",
            "--save_strategy", "no", "--per_device_train_batch_size", "2", "--disable_tqdm", "true"]


def test_cli_train_on_jsonl_then_precompute_ref_from_the_saved_model(jsonl, tmp_path, capsys):
    out = tmp_path / "run"
    status = cli.main(["train", "--model", "tiny-llama", "--dataset", str(jsonl), "--output_dir", str(out),
                       "--max_steps", "2", "--loss_type", "sr_dpo", "--learning_rate", "1e-3", *_common(tmp_path)])
    assert status == 0
    assert (out / "config.json").exists() and "saved to" in capsys.readouterr().out

    args = ["precompute-ref", "--model", str(out), "--dataset", str(jsonl), "--output_dir", str(tmp_path / "p"),
            *_common(tmp_path)]
    assert cli.main(args) == 0
    assert "computed" in capsys.readouterr().out
    assert cli.main(args) == 0
    assert "found in the cache" in capsys.readouterr().out


def test_cli_help_and_unknown_command(tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastpref", "--help"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and "fastpref demo" in done.stdout
    assert cli.main(["frobnicate"]) == 2


def test_cli_bench_without_a_source_checkout(monkeypatch, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert cli.main(["bench"]) == 1
    assert "source checkout" in capsys.readouterr().out


def test_cli_bench_unknown_name_lists_the_scripts(capsys):
    directory = cli.benchmarks_dir()
    if directory is None:
        pytest.skip("not a source checkout")
    status = cli.main(["bench", "no_such_benchmark"])
    assert status in (1, 2)
    assert "no_such_benchmark" in capsys.readouterr().out or status == 1


@pytest.mark.slow
def test_demo_prints_its_summary(tmp_path, monkeypatch, capsys):
    """A short demo run: the op comparison, before/after held-out figures, and both times per step."""
    from fastpref.demo import run_demo

    monkeypatch.chdir(tmp_path)
    figures = run_demo(steps=40, dpo_steps=20, cache_dir=str(tmp_path / "cache"))
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "Sr-DPO costs" in printed
    assert figures["accuracy_before"] == 0.0 and figures["accuracy_after"] > 0.5
    assert figures["sr_dpo_step_s"] > 0 and figures["dpo_step_s"] > 0
