"""The ``fastpref`` command line: train on a JSONL file, precompute-ref with cache reuse, errors as one line, help,
TRL's argument names, the CPU thread default, bench."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys

import pytest
import torch
from trainer_helpers import demo_rows

from fastpref import cli
from fastpref.backends import BackendUnavailableError
from fastpref.data.loading import PreferenceDataError


@pytest.fixture(autouse=True)
def _restore_torch_threads():
    """The CLI sets torch's thread count for small models on CPU; keep it from leaking into other tests."""
    threads = torch.get_num_threads()
    yield
    torch.set_num_threads(threads)


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
    assert done.returncode == 0
    assert "usage: fastpref [--debug] COMMAND" in done.stdout
    for command in ("demo", "train", "precompute-ref", "bench"):
        assert f"\n  {command} " in done.stdout
    for markup in (":data:", ":class:", ":func:", "``"):  # the module docstring's Sphinx markup
        assert markup not in done.stdout
    assert cli.main(["frobnicate"]) == 2


def test_train_help_is_grouped_with_fastpref_options_first(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--help"])
    text = capsys.readouterr().out
    assert done.value.code == 0 and text.startswith("usage: fastpref train --model MODEL --dataset DATA")
    order = [text.index(title) for title in ("script arguments:", "preference optimization (fastpref",
                                               "training (transformers.TrainingArguments")]
    assert order == sorted(order) and text.index("  --beta ") < text.index("  --output_dir ")
    assert text.index("  --model MODEL") < text.index("  --beta ")
    assert "  --adam_beta1 " not in text and "--adam_beta1" in text  # listed by name only
    assert "  --activation_checkpointing " in text  # not its deprecated alias, which warns
    assert "  --gradient_checkpointing " not in text
    assert "OMP_NUM_THREADS" in text and "--debug" in text
    assert len(text.splitlines()) < 400
    with pytest.raises(SystemExit):
        cli.main(["precompute-ref", "--help-all"])
    text = capsys.readouterr().out
    assert text.startswith("usage: fastpref precompute-ref") and "  --adam_beta1 " in text


def test_common_training_fields_are_training_arguments_fields():
    from transformers import TrainingArguments

    names = {f.name for f in dataclasses.fields(TrainingArguments)}
    assert set(cli.COMMON_TRAINING_FIELDS) <= names


def test_trl_argument_names_are_aliases(tmp_path):
    script, config = cli._parse(["--model_name_or_path", "tiny-llama", "--dataset_name", "demo", "--output_dir",
                                 str(tmp_path), "--beta", "0.25"])
    assert (script.model, script.dataset, config.beta) == ("tiny-llama", "demo", 0.25)


def test_an_unknown_option_is_a_usage_error(tmp_path, capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["train", "--model", "tiny-llama", "--dataset", "demo", "--output_dir", str(tmp_path), "--frob"])
    assert done.value.code == 2 and "unrecognized arguments: --frob" in capsys.readouterr().err


# --- errors: one line on stderr, exit status 1, the traceback with --debug -----------------------------------

def _train(tmp_path, dataset, *extra: str) -> list[str]:
    return ["train", "--model", "tiny-llama", "--dataset", str(dataset), "--output_dir", str(tmp_path / "out"),
            *_common(tmp_path), *extra]


def _one_error_line(capsys) -> str:
    captured = capsys.readouterr()
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in captured.err, captured.err
    return lines[0]


@pytest.fixture
def broken_jsonl(jsonl):
    lines = jsonl.read_text().splitlines() * 7
    lines[33] = lines[33].replace('"chosen":', '"chosen"')
    jsonl.write_text("\n".join(lines) + "\n")
    return jsonl


def test_broken_jsonl_is_one_line_naming_file_line_and_column(broken_jsonl, tmp_path, capsys):
    assert cli.main(_train(tmp_path, broken_jsonl)) == 1
    line = _one_error_line(capsys)
    assert line.startswith(f"fastpref train: error: {broken_jsonl}, line 34 column ") and "invalid JSON" in line


def test_a_wrong_type_names_the_line_and_column(jsonl, tmp_path, capsys):
    rows = [json.loads(line) for line in jsonl.read_text().splitlines()]
    rows[3]["chosen"] = 42
    jsonl.write_text("".join(json.dumps(row) + "\n" for row in rows))
    assert cli.main(_train(tmp_path, jsonl)) == 1
    assert f"{jsonl}, line 4, column 'chosen': " in _one_error_line(capsys)


@pytest.mark.parametrize("how", ["bare flag at the end", "before the command", "environment"])
def test_debug_shows_the_traceback(broken_jsonl, tmp_path, monkeypatch, how):
    argv = _train(tmp_path, broken_jsonl)
    if how == "bare flag at the end":
        argv.append("--debug")
    elif how == "before the command":
        argv.insert(0, "--debug")
    else:
        monkeypatch.setenv("FASTPREF_DEBUG", " On ")
    with pytest.raises(PreferenceDataError, match="line 34"):
        cli.main(argv)


def test_debug_with_values_stays_the_training_argument():
    argv = ["--beta", "0.1", "--debug", "underflow_overflow", "--debug"]
    assert cli.pop_debug(argv, "train") == (["--beta", "0.1", "--debug", "underflow_overflow"], True)
    assert cli.pop_debug(["--debug", "x", "--", "--debug"], "bench") == (["x", "--", "--debug"], True)
    assert cli.pop_debug(["--steps", "3"], "demo") == (["--steps", "3"], False)


def _raise(error):
    def build(script, config):
        raise error
    return build


@pytest.mark.parametrize("make, expected", [
    (lambda tmp: ["--dataset", str(tmp / "missing.jsonl")], "is neither 'demo' nor an existing file"),
    (lambda tmp: ["--beta", "-1"], "error: beta must be > 0, got -1.0"),
    (lambda tmp: ["--tokenizer", str(tmp / "no_tokenizer")], "--tokenizer"),
])
def test_fastpref_errors_take_the_one_line_path(jsonl, tmp_path, capsys, make, expected):
    argv = _train(tmp_path, jsonl)
    argv[argv.index("--dataset"):argv.index("--dataset") + 2] = []
    extra = make(tmp_path)
    argv += extra if "--dataset" in extra else ["--dataset", str(jsonl), *extra]
    assert cli.main(argv) == 1
    assert expected in _one_error_line(capsys)


def test_errors_from_elsewhere_name_their_type_and_bugs_keep_their_traceback(jsonl, tmp_path, monkeypatch,
                                                                              capsys):
    monkeypatch.setattr(cli, "_build_trainer", _raise(BackendUnavailableError("backend 'triton': no GPU")))
    assert cli.main(_train(tmp_path, jsonl)) == 1
    assert _one_error_line(capsys).endswith("error: BackendUnavailableError: backend 'triton': no GPU "
                                            "(--debug shows the traceback)")
    monkeypatch.setattr(cli, "_build_trainer", _raise(FileNotFoundError(2, "No such file", "x.bin")))
    assert cli.main(_train(tmp_path, jsonl)) == 1
    assert "error: FileNotFoundError: [Errno 2] No such file: 'x.bin'" in _one_error_line(capsys)
    monkeypatch.setattr(cli, "_build_trainer", _raise(RuntimeError("an internal bug")))
    with pytest.raises(RuntimeError, match="an internal bug"):
        cli.main(_train(tmp_path, jsonl))


def test_a_real_process_exits_non_zero_with_one_line(broken_jsonl, tmp_path):
    done = subprocess.run([sys.executable, "-m", "fastpref", *_train(tmp_path, broken_jsonl)], capture_output=True,
                          text=True, cwd=tmp_path, timeout=600)
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().splitlines() == [next(line for line in done.stderr.splitlines() if line)]
    assert f"{broken_jsonl}, line 34 column " in done.stderr


# --- CPU threads -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model, omp, expected", [
    ("tiny-llama", None, 1), ("tiny-gpt2", None, 1), ("tiny-llama", "2", 2), ("small-llama", None, 2),
])
def test_small_models_on_cpu_default_to_one_thread(tmp_path, monkeypatch, model, omp, expected):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    if omp is not None:
        monkeypatch.setenv("OMP_NUM_THREADS", omp)
    _, config = cli._parse(["--model", model, "--dataset", "demo", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    torch.set_num_threads(2)
    cli.set_cpu_threads(model, config)
    assert torch.get_num_threads() == expected


def test_a_saved_small_model_directory_defaults_to_one_thread(tmp_path, monkeypatch):
    from fastpref.data.tiny_models import build_model

    build_model("tiny-qwen2", 300).save_pretrained(tmp_path / "m")
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    _, config = cli._parse(["--model", "x", "--dataset", "demo", "--output_dir", str(tmp_path), "--use_cpu", "true"])
    torch.set_num_threads(2)
    cli.set_cpu_threads(str(tmp_path / "m"), config)
    assert torch.get_num_threads() == 1


# --- bench -------------------------------------------------------------------------------------------------

def test_cli_bench_without_a_source_checkout(monkeypatch, capsys):
    monkeypatch.setattr(cli, "benchmarks_dir", lambda: None)
    assert cli.main(["bench"]) == 1
    assert "source checkout" in capsys.readouterr().out


def _benchmark_names() -> list[str]:
    directory = cli.benchmarks_dir()
    if directory is None:
        pytest.skip("not a source checkout")
    names = [p.stem for p in directory.glob("bench_*.py")] + [p.stem for p in directory.glob("test_*.py")]
    assert names
    return names


def test_cli_bench_unknown_name_lists_the_scripts(capsys):
    names = _benchmark_names()
    assert cli.main(["bench", "no_such_benchmark"]) == 2
    out = capsys.readouterr().out
    assert "unknown benchmark(s) ['no_such_benchmark']" in out and all(name in out for name in names)


@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_cli_bench_help_lists_the_scripts(capsys, flag):
    names = _benchmark_names()
    assert cli.main(["bench", flag]) == 0
    out = capsys.readouterr().out
    assert out.startswith("usage: fastpref bench") and "unknown" not in out and all(name in out for name in names)


@pytest.mark.slow
def test_demo_prints_its_summary(tmp_path, monkeypatch, capsys):
    """A short demo run: the op comparison, before/after held-out figures, and both times per step."""
    from fastpref.demo import run_demo

    monkeypatch.chdir(tmp_path)
    figures = run_demo(steps=40, dpo_steps=20, cache_dir=str(tmp_path / "cache"))
    printed = capsys.readouterr().out
    assert "held-out accuracy" in printed and "Sr-DPO costs" in printed
    assert "\nSr-DPO training log:" in printed and "\nDPO training log:" in printed and "{'loss'" not in printed
    assert figures["accuracy_before"] == 0.0 and figures["accuracy_after"] > 0.5
    assert figures["sr_dpo_step_s"] > 0 and figures["dpo_step_s"] > 0


def test_demo_log_table_is_labelled_and_aligned(capsys):
    """Each training log of the demo: a label, a header, one row per log of the same width as the header."""
    from types import SimpleNamespace

    from fastpref.demo import LogTable

    table = LogTable("Sr-DPO")
    for step, loss in ((10, 0.6931), (20, 12.5), (300, 0.0012)):
        table.on_log(None, SimpleNamespace(global_step=step), None, logs={
            "loss": loss, "rewards/accuracies": 0.5, "rewards/margins": -0.25, "grad_norm": 3.0})
    table.on_log(None, SimpleNamespace(global_step=300), None, logs={"train_runtime": 1.0})  # no loss: no row
    lines = capsys.readouterr().out.strip("\n").split("\n")
    assert lines[0] == "Sr-DPO training log:" and lines[1].split() == ["step", "loss", "accuracy", "margin", "grad",
                                                                       "norm"]
    assert len(lines) == 5 and len({len(line) for line in lines[1:]}) == 1
    assert lines[4].split() == ["300", "0.0012", "0.5000", "-0.2500", "3.0000"]


def test_rounds_is_a_fastpref_command(capsys):
    from fastpref.cli import main

    with pytest.raises(SystemExit) as done:
        main(["rounds", "--help"])
    assert done.value.code == 0
    assert capsys.readouterr().out.startswith("usage: fastpref rounds")
