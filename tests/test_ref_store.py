"""fastpref.trainer.ref_store: fingerprints and the atomic, corruption-checked reference log-prob cache."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import datasets
import pytest
import torch

from fastpref.data import SR_DPO_REFINEMENT_PROMPT
from fastpref.data.synthetic import generate
from fastpref.data.tiny_models import build_model
from fastpref.trainer.ref_store import (
    RefLogpsStore,
    StaleReferenceCacheError,
    dataset_fingerprint,
    fingerprint,
    fingerprint_parts,
    model_fingerprint,
    tokenizer_fingerprint,
)
from fastpref.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


@pytest.fixture(scope="module")
def parts(tokenizer):
    torch.manual_seed(0)
    model = build_model("tiny-llama", len(tokenizer))
    return dict(model=model_fingerprint(model), tokenizer=tokenizer_fingerprint(tokenizer),
                dataset=dataset_fingerprint(generate(40, seed=3)), max_length=64, truncation_mode="keep_end",
                refinement_prompt=SR_DPO_REFINEMENT_PROMPT, logps="sum")


def _tensors(seed: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {"ref_chosen_logps": torch.randn(37, generator=g) * 30 - 50,
            "ref_rejected_logps": torch.randn(37, generator=g) * 30 - 50,
            "example_index": torch.randperm(37, generator=g)}


def test_fingerprint_is_stable_and_order_free():
    a = fingerprint(x=1, y="a", t=torch.arange(5.0), d={"k": [1, 2.5, None]})
    b = fingerprint(d={"k": [1, 2.5, None]}, t=torch.arange(5.0), y="a", x=1)
    assert a == b and len(a) == 64
    assert fingerprint(x=1) != fingerprint(x=1.0) != fingerprint(x="1")
    assert fingerprint(t=torch.zeros(4)) != fingerprint(t=torch.zeros(2, 2))
    assert fingerprint(t=torch.zeros(4)) != fingerprint(t=torch.zeros(4, dtype=torch.float64))
    with pytest.raises(TypeError, match="cannot fingerprint"):
        fingerprint(x=object())
    with pytest.raises(ValueError):
        fingerprint()


@pytest.mark.parametrize("changed", ["model", "tokenizer", "dataset", "max_length", "truncation_mode",
                                     "refinement_prompt", "logps"])
def test_fingerprint_changes_with_each_part(parts, tokenizer, changed):
    torch.manual_seed(0)
    model = build_model("tiny-llama", len(tokenizer))
    with torch.no_grad():
        model.model.layers[1].mlp.down_proj.weight[3, 7] += 1e-6
    rows = generate(40, seed=3)
    rows[17] = {**rows[17], "score_rejected": rows[17]["score_rejected"] + 0.01}
    tokenizer_other = build_tokenizer()
    tokenizer_other.chat_template = tokenizer.chat_template.replace("<|end|>", "\n")
    new = {"model": model_fingerprint(model), "tokenizer": tokenizer_fingerprint(tokenizer_other),
           "dataset": dataset_fingerprint(rows), "max_length": 65, "truncation_mode": "keep_start",
           "refinement_prompt": SR_DPO_REFINEMENT_PROMPT + " ", "logps": "mean"}[changed]
    assert new != parts[changed]
    assert fingerprint(**{**parts, changed: new}) != fingerprint(**parts)


def test_component_fingerprints_are_reproducible(tokenizer):
    torch.manual_seed(0)
    a = build_model("tiny-gpt2", len(tokenizer))
    torch.manual_seed(0)
    b = build_model("tiny-gpt2", len(tokenizer))
    assert model_fingerprint(a) == model_fingerprint(b)
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(build_tokenizer())
    assert tokenizer_fingerprint(tokenizer) != tokenizer_fingerprint(build_tokenizer(vocab_size=400))
    tokenizer("some text", truncation=True, max_length=3)  # runtime call settings do not change the tokenizer
    assert tokenizer_fingerprint(tokenizer) == tokenizer_fingerprint(build_tokenizer())


def test_dataset_fingerprint_sees_content_not_layout(tmp_path):
    rows = generate(50, seed=1)
    dataset = datasets.Dataset.from_list(rows)
    assert dataset_fingerprint(dataset) == dataset_fingerprint(datasets.Dataset.from_list(rows))
    dataset.save_to_disk(str(tmp_path / "ds"))
    assert dataset_fingerprint(datasets.load_from_disk(str(tmp_path / "ds"))) == dataset_fingerprint(dataset)
    assert dataset_fingerprint(dataset.select(range(49))) != dataset_fingerprint(dataset)
    assert dataset_fingerprint(dataset.select(list(range(1, 50)) + [0])) != dataset_fingerprint(dataset)
    with pytest.raises(TypeError):
        dataset_fingerprint("not a dataset")


def test_dataset_fingerprint_is_independent_of_batch_size():
    """The digest is taken row by row: reading 1, 7 or all rows at a time gives one fingerprint (a digest per
    batch would differ), for a Dataset and for a list of rows; moving a value across rows still changes it."""
    rows = generate(23, seed=2)
    dataset = datasets.Dataset.from_list(rows)
    for source in (dataset, rows):
        prints = {dataset_fingerprint(source, batch_size=size) for size in (1, 7, 23, 1024)}
        assert len(prints) == 1
    assert dataset_fingerprint(dataset) != dataset_fingerprint(rows)  # the column names are part of a Dataset's
    merged = [{**rows[0], "prompt": rows[0]["prompt"] + rows[1]["prompt"]}, {**rows[1], "prompt": ""}, *rows[2:]]
    assert dataset_fingerprint(merged, batch_size=7) != dataset_fingerprint(rows, batch_size=7)


def test_model_fingerprint_excludes_named_parameters(tokenizer):
    """One model fingerprint: ``exclude`` leaves out parameters by name (a peft adapter), nothing else changes."""
    torch.manual_seed(0)
    model = build_model("tiny-llama", len(tokenizer))
    base = model_fingerprint(model)
    with torch.no_grad():
        model.model.layers[0].self_attn.q_proj.weight[0, 0] += 1.0
    assert model_fingerprint(model) != base
    torch.manual_seed(0)
    pristine = build_model("tiny-llama", len(tokenizer))
    assert model_fingerprint(model, exclude=(".q_proj.",)) == model_fingerprint(pristine, exclude=(".q_proj.",))
    assert model_fingerprint(model, exclude=(".k_proj.",)) != model_fingerprint(pristine, exclude=(".k_proj.",))


def test_store_miss_save_hit_across_instances(tmp_path, parts):
    fp = fingerprint(**parts)
    store = RefLogpsStore(tmp_path / "cache")
    assert store.load(fp) is None
    tensors = _tensors()
    path = store.save(fp, tensors, parts=fingerprint_parts(**parts))
    assert path.exists() and path.parent == tmp_path / "cache"
    loaded = RefLogpsStore(tmp_path / "cache").load(fp)  # a later run
    assert loaded.keys() == tensors.keys()
    for key in tensors:
        assert loaded[key].dtype == tensors[key].dtype and torch.equal(loaded[key], tensors[key])
    assert [p.name for p in (tmp_path / "cache").iterdir()] == [path.name]  # no temp file left


def test_names_separate_caches(tmp_path, parts):
    fp = fingerprint(**parts)
    store = RefLogpsStore(tmp_path, on_mismatch="raise")
    store.save(fp, _tensors(1), name="train")
    assert store.load(fp, name="eval") is None  # another dataset's cache is no mismatch
    other_dir = RefLogpsStore(tmp_path / "other", on_mismatch="raise")
    other_dir.save(fingerprint(x=2), _tensors(2), name="train-v2")
    assert other_dir.load(fp, name="train") is None  # nor is a name that merely extends it
    assert torch.equal(store.load(fp, name="train")["ref_chosen_logps"], _tensors(1)["ref_chosen_logps"])


@pytest.mark.parametrize("changed", ["dataset", "max_length"])
def test_mismatch_recomputes_or_raises(tmp_path, parts, changed, caplog):
    old_parts = fingerprint_parts(**parts)
    RefLogpsStore(tmp_path).save(fingerprint(**parts), _tensors(), parts=old_parts)
    new = {**parts, changed: "other"}
    new_fp, new_parts = fingerprint(**new), fingerprint_parts(**new)
    with caplog.at_level(logging.INFO, logger="fastpref"):  # normal use (a new dataset): an info line
        assert RefLogpsStore(tmp_path).load(new_fp, parts=new_parts) is None
    assert f"changed parts: {changed}; recomputing" in caplog.text
    with pytest.raises(StaleReferenceCacheError, match=f"changed parts: {changed}"):
        RefLogpsStore(tmp_path, on_mismatch="raise").load(new_fp, parts=new_parts)
    with pytest.raises(ValueError, match="on_mismatch"):
        RefLogpsStore(tmp_path, on_mismatch="ignore")


def test_torn_write_loads_as_none(tmp_path, parts):
    fp = fingerprint(**parts)
    store = RefLogpsStore(tmp_path)
    path = store.save(fp, _tensors())
    size = path.stat().st_size
    for cut in (size - 1, size // 2, 10, 0):
        data = path.read_bytes()
        path.write_bytes(data[:cut])
        with pytest.warns(RuntimeWarning, match="unreadable|corrupt"):
            assert store.load(fp) is None
        store.save(fp, _tensors())


def test_corrupt_bytes_fail_the_checksum(tmp_path, parts):
    fp = fingerprint(**parts)
    store = RefLogpsStore(tmp_path)
    path = store.save(fp, _tensors())
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40  # inside the last tensor's data: the file still parses
    path.write_bytes(bytes(data))
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert store.load(fp) is None
    # A valid file saved under another fingerprint and renamed is rejected too.
    other = store.save(fingerprint(x=1), _tensors())
    os.replace(other, path)
    with pytest.warns(RuntimeWarning, match="corrupt"):
        assert store.load(fp) is None


def test_failed_write_keeps_the_old_file(tmp_path, parts, monkeypatch):
    fp = fingerprint(**parts)
    store = RefLogpsStore(tmp_path)
    store.save(fp, _tensors(0))

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", failing_replace)
    with pytest.raises(OSError, match="disk full"):
        store.save(fp, _tensors(1))
    monkeypatch.undo()
    assert torch.equal(store.load(fp)["ref_chosen_logps"], _tensors(0)["ref_chosen_logps"])
    assert sorted(p.suffix for p in Path(tmp_path).iterdir()) == [".safetensors"]


def test_stale_temp_files_are_removed_when_a_store_opens(tmp_path):
    """Temps of a dead writer on this host, or older than STALE_TEMP_SECONDS, go; a live writer's stays."""
    import subprocess
    import sys
    import time

    from fastpref.trainer import ref_store

    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                              text=True, check=True)
    dead_pid = int(finished.stdout)
    host = ref_store._HOST
    dead = tmp_path / f".train-{host}-{dead_pid}-x1.tmp"
    live = tmp_path / f".train-aug-{host}-{os.getpid()}-x2.tmp"
    old = tmp_path / f".eval-otherhost-{os.getpid()}-x3.tmp"
    foreign_fresh = tmp_path / f".eval-otherhost-{dead_pid}-x4.tmp"  # another host's pid cannot be checked here
    unrelated = tmp_path / "notes.tmp"
    for path in (dead, live, old, foreign_fresh, unrelated):
        path.write_bytes(b"partial")
    hour_ago = time.time() - 3600
    os.utime(old, (hour_ago, hour_ago))
    RefLogpsStore(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(p.name for p in (live, foreign_fresh, unrelated))
    store = RefLogpsStore(tmp_path / "absent")  # a directory that does not exist yet is no error
    assert not store.cache_dir.exists()


def test_check_writable_names_the_directory(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("not a directory")
    store = RefLogpsStore(blocker / "cache")
    with pytest.raises(OSError, match="ref_cache_dir .*a_file/cache.* is not writable"):
        store.check_writable()
    RefLogpsStore(tmp_path / "fine").check_writable()
    assert list((tmp_path / "fine").iterdir()) == []  # the probe is gone


def test_bad_arguments(tmp_path):
    store = RefLogpsStore(tmp_path)
    with pytest.raises(ValueError, match="fp"):
        store.load("../etc")
    with pytest.raises(ValueError, match="name"):
        store.save(fingerprint(x=1), _tensors(), name="../x")
    with pytest.raises(ValueError, match="empty"):
        store.save(fingerprint(x=1), {})
    with pytest.raises(TypeError, match="tensors"):
        store.save(fingerprint(x=1), {"a": [1.0]})
