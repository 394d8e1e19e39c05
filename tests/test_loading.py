"""fastpref.data.loading: bad preference data is refused before a dataset is built, with an error that names the
file, the line (JSONL) or row, and the column — never a JSONDecodeError at "line 1" or a pyarrow ArrowTypeError."""

from __future__ import annotations

import json

import datasets
import pytest

from fastpref.data.loading import PreferenceDataError, load_preference_dataset

GOOD = {"prompt": "Add 2+2.", "chosen": " 4.", "rejected": " 5.", "score_chosen": 9.0, "score_rejected": 2}
USER = {"role": "user", "content": "Add 2+2."}


def _jsonl(tmp_path, rows, name="prefs.jsonl"):
    path = tmp_path / name
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def _error(path) -> str:
    with pytest.raises(PreferenceDataError) as caught:
        load_preference_dataset(path)
    assert isinstance(caught.value, ValueError)
    return str(caught.value)


def test_broken_json_names_the_file_line_and_column(tmp_path):
    lines = [json.dumps(GOOD)] * 40
    lines[5] = ""  # a blank line still counts as a line of the file
    broken = json.dumps(GOOD).replace('"chosen":', '"chosen"')
    lines[33] = broken
    message = _error(_jsonl(tmp_path, lines))
    with pytest.raises(json.JSONDecodeError) as within_the_line:
        json.loads(broken)
    column = within_the_line.value.colno
    assert message.startswith(f"{tmp_path / 'prefs.jsonl'}, line 34 column {column}: invalid JSON")


def test_broken_json_file_names_its_line(tmp_path):
    path = tmp_path / "prefs.json"
    path.write_text("[\n" + json.dumps(GOOD) + ",\n" + json.dumps(GOOD)[:-1] + "\n]\n")
    assert _error(path).startswith(f"{path}, line 4 column 1: invalid JSON")


@pytest.mark.parametrize("bad, column, shown", [
    ({"chosen": 3}, "'chosen'", "got int 3"),
    ({"rejected": None}, "'rejected'", "got NoneType"),
    ({"prompt": [{"role": "user", "content": 7}]}, "'prompt'", "got list"),
    ({"prompt": [{"content": "hi"}]}, "'prompt'", "got list"),
    ({"score_chosen": "high"}, "'score_chosen'", "expected a number, got str 'high'"),
    ({"tau": True}, "'tau'", "expected a number, got bool"),
])
def test_a_bad_value_names_the_line_and_column(tmp_path, bad, column, shown):
    message = _error(_jsonl(tmp_path, [GOOD] * 6 + [{**GOOD, **bad}] + [GOOD] * 3))
    assert message.startswith(f"{tmp_path / 'prefs.jsonl'}, line 7, column {column}: ") and shown in message


def test_rows_must_agree_with_the_first_row(tmp_path):
    conversational = {"prompt": [USER], "chosen": [{"role": "assistant", "content": "4"}],
                      "rejected": [{"role": "assistant", "content": "5"}]}
    message = _error(_jsonl(tmp_path, [GOOD, GOOD, {**GOOD, **conversational}]))
    assert message.startswith(f"{tmp_path / 'prefs.jsonl'}, line 3, column 'prompt': a message list, but ")
    assert "line 1 has a string" in message
    mixed = _error(_jsonl(tmp_path, [{**GOOD, "prompt": [USER]}]))
    assert "line 1: 'prompt' is a message list, 'chosen' is a string" in mixed
    # A column the first row lacks would be dropped without a word by datasets.Dataset.from_list.
    plain = {k: GOOD[k] for k in ("prompt", "chosen", "rejected")}
    assert "line 2: has columns ['tau'] that " in _error(_jsonl(tmp_path, [plain, {**plain, "tau": 0.5}]))
    assert "line 2: lacks columns ['tau'] that " in _error(_jsonl(tmp_path, [{**plain, "tau": 0.5}, plain]))


def test_rows_that_are_not_preference_examples(tmp_path):
    assert "line 2: expected an object" in _error(_jsonl(tmp_path, [GOOD, [1, 2]]))
    assert "line 1: no 'rejected' column" in _error(_jsonl(tmp_path, [{"prompt": "p", "chosen": "c"}]))
    assert _error(_jsonl(tmp_path, [])).endswith(": no rows")
    path = tmp_path / "prefs.json"
    path.write_text(json.dumps([GOOD, GOOD, {**GOOD, "chosen": 1.5}]))
    assert _error(path).startswith(f"{path}, row index 2, column 'chosen': ")


def test_implicit_prompt_failure_names_the_row(tmp_path):
    rows = [{"chosen": "Q: hi A: yes", "rejected": "Q: hi A: no"}, {"chosen": "abc", "rejected": "xyz"}]
    assert "line 2: implicit prompt" in _error(_jsonl(tmp_path, rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "p.parquet"))
    assert "row index 1: implicit prompt" in _error(tmp_path / "p.parquet")


def test_parquet_and_saved_datasets_are_checked_by_column_and_row(tmp_path):
    datasets.Dataset.from_list([GOOD, {**GOOD, "chosen": None}]).to_parquet(str(tmp_path / "null.parquet"))
    assert _error(tmp_path / "null.parquet").startswith(f"{tmp_path / 'null.parquet'}, row index 1, column 'chosen'")
    datasets.Dataset.from_list([{**GOOD, "rejected": 4}]).save_to_disk(str(tmp_path / "ints"))
    assert "column 'rejected': holds Value('int64')" in _error(tmp_path / "ints")
    datasets.Dataset.from_list([{**GOOD, "tau": "x"}]).to_parquet(str(tmp_path / "tau.parquet"))
    assert "column 'tau': holds Value('string'), expected numbers" in _error(tmp_path / "tau.parquet")


def test_good_conversational_and_scored_files_still_load(tmp_path):
    conversational = {"chosen": [USER, {"role": "assistant", "content": "4"}],
                      "rejected": [USER, {"role": "assistant", "content": "5"}], "score_chosen": 1, "tau": None}
    loaded = load_preference_dataset(_jsonl(tmp_path, [conversational, {**conversational, "tau": 0.25}]))
    assert loaded[1]["prompt"] == [USER] and loaded[1]["tau"] == 0.25 and loaded[0]["tau"] is None
    datasets.Dataset.from_list([conversational]).to_parquet(str(tmp_path / "c.parquet"))
    assert load_preference_dataset(tmp_path / "c.parquet")[0]["chosen"] == [{"role": "assistant", "content": "4"}]
    assert load_preference_dataset(_jsonl(tmp_path, [GOOD] * 3)).to_list() == [GOOD] * 3


RANKED = [{"prompt": f"Q{i}:", "completions": [f" a{i}", " b", " c"][: 2 + i % 2],
           "scores": [1.0, 0.5, -2.0][: 2 + i % 2]} for i in range(4)]


def test_ranked_rows_load_from_every_pair_source(tmp_path):
    """Ranked (listwise) rows load from parquet and save_to_disk folders (a Dataset's, a DatasetDict's split) as
    from JSONL, each row checked and located."""
    datasets.Dataset.from_list(RANKED).to_parquet(str(tmp_path / "r.parquet"))
    datasets.Dataset.from_list(RANKED).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(RANKED)}).save_to_disk(str(tmp_path / "dict"))
    assert load_preference_dataset(_jsonl(tmp_path, RANKED)).to_list() == RANKED
    assert load_preference_dataset(tmp_path / "r.parquet").to_list() == RANKED
    assert load_preference_dataset(tmp_path / "saved").to_list() == RANKED
    assert load_preference_dataset(tmp_path / "dict", split="train").to_list() == RANKED
    bad = [RANKED[0], {**RANKED[1], "scores": [1.0, float("nan"), 0.0]}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "bad.parquet"))
    assert _error(tmp_path / "bad.parquet").startswith(f"{tmp_path / 'bad.parquet'}, row index 1: rows[1] scores "
                                                       "must be finite")
    datasets.Dataset.from_list([RANKED[0], {**RANKED[0], "completions": None}]).save_to_disk(str(tmp_path / "null"))
    assert _error(tmp_path / "null").startswith(f"{tmp_path / 'null'}, row index 1: rows[1] 'completions' must be a "
                                                "list, got NoneType")
