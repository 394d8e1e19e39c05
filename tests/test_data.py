"""fastpref.data, fastpref.data.tokenizer, fastpref.data.tiny_models: the synthetic set, loading, tokenization and
truncation, reward-augmented relabeling, self-critique pairs, the tiny models."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys

import datasets
import pytest
import torch

from fastpref.data import (
    SR_DPO_REFINEMENT_PROMPT,
    extract_prompt,
    load_preference_dataset,
    parse_score,
    reward_augment,
    reward_conditioned_prompt,
    self_critique_pairs,
    tokenize_pair,
)
from fastpref.data import synthetic
from fastpref.data.tiny_models import MODEL_NAMES, build_model
from fastpref.data.tokenization import TRUNCATION_MODES, refinement_prefix_ids, tokenize_ranked
from fastpref.data.tokenizer import build_tokenizer


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer()


# --- synthetic set -------------------------------------------------------------------------------------------

def test_bundled_file_is_what_the_generator_produces():
    with open(synthetic.DEMO_PATH, encoding="utf-8") as f:
        bundled = [json.loads(line) for line in f]
    assert bundled == synthetic.demo_rows()
    assert len(bundled) == synthetic.DEMO_TRAIN_SIZE + synthetic.DEMO_TEST_SIZE


def test_generator_rows_are_graded_and_deterministic():
    rows = synthetic.generate(300, seed=7)
    assert rows == synthetic.generate(300, seed=7) and rows != synthetic.generate(300, seed=8)
    for row in rows:
        assert set(row) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"}
        assert 0.0 <= row["score_rejected"] < row["score_chosen"] <= 10.0
    assert len({row["score_chosen"] - row["score_rejected"] for row in rows}) > 5  # graded, not binary
    with pytest.raises(ValueError, match="n must be"):
        synthetic.generate(-1, seed=0)


def test_ranked_stream_is_pinned():
    """The ranked rows of a seed stay what they were (the examples' data depend on it; the bundled file pins
    ``generate``'s stream): the digest of generate_ranked(200, k=5, seed=3) from before the two generators shared
    their prompt draw."""
    rows = synthetic.generate_ranked(200, k=5, seed=3)
    digest = hashlib.sha256(json.dumps(rows, sort_keys=True).encode()).hexdigest()
    assert digest == "9ba061a266a9630ca8651be7fc1d6921b60196b46d9b6f59e20559b5ae0ac2ad"
    assert rows != synthetic.generate_ranked(200, k=5, seed=4)
    assert all(len(row["completions"]) == len(row["scores"]) == 5 for row in rows)
    with pytest.raises(ValueError, match="n must be"):
        synthetic.generate_ranked(-1, k=2, seed=0)
    with pytest.raises(ValueError, match="k must be"):
        synthetic.generate_ranked(3, k=1, seed=0)


def test_scores_follow_the_rules():
    """Re-derive each response's score from its text: every part right or wrong as the docstring says."""
    for row in synthetic.generate(200, seed=11):
        words = row["prompt"].replace(",", "").rstrip(".").lower().split()
        word = words[words.index("say") + 1]
        a, b = (int(v) for v in words[-1].split("+"))
        right_parts = {}
        for key in ("chosen", "rejected"):
            opener, keyword, arithmetic, closer = row[key].split()
            right = {"opener": opener == "Sure!", "keyword": keyword == word + ".",
                     "sum": arithmetic == f"{a}+{b}={a + b}.", "closer": closer == "Done."}
            weight = sum(synthetic.PART_WEIGHTS[part] for part, ok in right.items() if ok)
            assert row[f"score_{key}"] == round(10 * weight / 7, 2)
            right_parts[key] = {part for part, ok in right.items() if ok}
        assert right_parts["rejected"] < right_parts["chosen"]  # strict subset: every pair strictly ordered


# --- tokenizer and models ------------------------------------------------------------------------------------

def test_tokenizer_is_deterministic_and_lossless(tokenizer):
    assert 256 < len(tokenizer) <= 512
    ids = {tokenizer.bos_token_id, tokenizer.eos_token_id, tokenizer.pad_token_id}
    assert None not in ids and len(ids) == 3
    text = "héllo ☃ Score: -3.5\n\ttabs"
    encoded = tokenizer(text)["input_ids"]
    assert encoded[0] == tokenizer.bos_token_id
    assert tokenizer.decode(encoded, skip_special_tokens=True) == text
    assert [tokenizer.decode([i]) for i in tokenizer("12+345", add_special_tokens=False)["input_ids"]] == list("12+345")
    code = "from fastpref.data.tokenizer import build_tokenizer; print(build_tokenizer().backend_tokenizer.to_str())"
    other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                           cwd="/tmp").stdout.strip()
    assert other == tokenizer.backend_tokenizer.to_str()


def test_chat_template(tokenizer):
    messages = [{"role": "system", "content": "S"}, {"role": "user", "content": "U"}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert text == "<|bos|><|system|>S<|end|><|user|>U<|end|><|assistant|>"


@pytest.mark.parametrize("name", MODEL_NAMES[:5])
def test_tiny_models(name, tokenizer):
    torch.manual_seed(0)
    model = build_model(name, len(tokenizer))
    assert model.config.vocab_size == len(tokenizer)
    assert sum(p.numel() for p in model.parameters()) < 500_000
    tied = model.get_output_embeddings().weight is model.get_input_embeddings().weight
    assert tied == (name in ("tiny-gpt2", "tiny-gemma2"))
    assert getattr(model.config, "final_logit_softcapping", None) == (30.0 if name == "tiny-gemma2" else None)
    ids = torch.randint(0, len(tokenizer), (1, 40))
    model.train()
    first = model(input_ids=ids, use_cache=False).logits
    torch.testing.assert_close(model(input_ids=ids, use_cache=False).logits, first, rtol=0, atol=0)  # no dropout
    model(input_ids=ids, labels=ids, use_cache=False).loss.backward()
    assert model.get_output_embeddings().weight.grad is not None


@pytest.mark.parametrize("name, vocab_size, params", [("qwen2.5-0.5b-shape", 151936, 494_032_768),
                                                      ("llama-3.2-1b-shape", 128256, 1_235_814_400)])
def test_gpu_shapes_match_the_published_models(name, vocab_size, params):
    with torch.device("meta"):  # shapes only, no memory
        model = build_model(name, vocab_size)
    assert sum(p.numel() for p in model.parameters()) == params


def test_build_model_overrides_and_errors():
    model = build_model("tiny-llama", 300, num_hidden_layers=1, hidden_size=32)
    assert model.config.num_hidden_layers == 1 and model.config.hidden_size == 32
    assert {"small-llama", "qwen2.5-0.5b-shape", "llama-3.2-1b-shape"} <= set(MODEL_NAMES)
    with pytest.raises(ValueError, match="unknown model name"):
        build_model("tiny-nothing", 300)
    with pytest.raises(ValueError, match="vocab_size"):
        build_model("tiny-llama", 0)


# --- loading -------------------------------------------------------------------------------------------------

def test_load_demo_splits():
    train, test = load_preference_dataset("demo", split="train"), load_preference_dataset("demo", split="test")
    assert (len(train), len(test)) == (synthetic.DEMO_TRAIN_SIZE, synthetic.DEMO_TEST_SIZE)
    assert test[0] == synthetic.demo_rows()[synthetic.DEMO_TRAIN_SIZE]
    assert len(load_preference_dataset("demo")) == synthetic.DEMO_SIZE
    with pytest.raises(ValueError, match="split"):
        load_preference_dataset("demo", split="validation")


def test_load_files_and_dirs(tmp_path):
    rows = synthetic.generate(12, seed=2)
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "a.json").write_text(json.dumps(rows))
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "a.parquet"))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows)}).save_to_disk(str(tmp_path / "dict"))
    for source in ("a.jsonl", "a.json", "a.parquet", "saved"):
        assert load_preference_dataset(tmp_path / source).to_list() == rows
    assert load_preference_dataset(tmp_path / "dict", split="train").to_list() == rows
    with pytest.raises(ValueError, match="splits"):
        load_preference_dataset(tmp_path / "dict")
    with pytest.raises(ValueError, match="split='train' applies to"):
        load_preference_dataset(tmp_path / "a.jsonl", split="train")
    with pytest.raises(ValueError, match="neither 'demo' nor an existing"):
        load_preference_dataset(tmp_path / "missing.jsonl")
    (tmp_path / "bad.jsonl").write_text(json.dumps({"prompt": "p", "chosen": "c"}) + "\n")
    with pytest.raises(ValueError, match="rejected"):
        load_preference_dataset(tmp_path / "bad.jsonl")


def test_implicit_prompt(tmp_path):
    standard = {"chosen": "Q: two plus two? A: four", "rejected": "Q: two plus two? A: five"}
    assert extract_prompt(standard) == {"prompt": "Q: two plus two? A:", "chosen": " four", "rejected": " five"}
    user = {"role": "user", "content": "hi"}
    conversational = {"chosen": [user, {"role": "assistant", "content": "hello"}],
                      "rejected": [user, {"role": "assistant", "content": "go away"}]}
    out = extract_prompt(conversational)
    assert out["prompt"] == [user] and out["chosen"] == [{"role": "assistant", "content": "hello"}]
    (tmp_path / "implicit.jsonl").write_text(json.dumps(standard) + "\n")
    assert load_preference_dataset(tmp_path / "implicit.jsonl")[0]["prompt"] == "Q: two plus two? A:"
    with pytest.raises(ValueError, match="share no prompt"):
        extract_prompt({"chosen": "abc", "rejected": "xyz"})


# --- tokenize_pair -------------------------------------------------------------------------------------------

ROW = {"prompt": "Say fox and add 3+8.", "chosen": " Sure! fox. 3+8=11. Done.", "rejected": " Ugh. cat. 3+8=9."}
CHAT = {"prompt": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say fox and add 3+8."}],
        "chosen": [{"role": "assistant", "content": "Sure! fox. 3+8=11. Done."}],
        "rejected": [{"role": "assistant", "content": "Ugh. cat."}]}


def test_standard_pair_matches_whole_text_tokenization(tokenizer):
    out = tokenize_pair(ROW, tokenizer, max_length=None)
    for key in ("chosen", "rejected"):
        whole = tokenizer(ROW["prompt"] + ROW[key] + tokenizer.eos_token)["input_ids"]
        assert out["prompt_input_ids"] + out[f"{key}_input_ids"] == whole
        assert out[f"{key}_input_ids"][-1] == tokenizer.eos_token_id
    assert tokenizer.decode(out["prompt_input_ids"]) == tokenizer.bos_token + ROW["prompt"]
    assert "aug_prompt_input_ids" not in out
    # An eos already present is not doubled.
    twice = tokenize_pair({**ROW, "chosen": ROW["chosen"] + tokenizer.eos_token}, tokenizer)
    assert twice["chosen_input_ids"] == out["chosen_input_ids"]


def test_conversational_pair_uses_the_chat_template(tokenizer):
    out = tokenize_pair(CHAT, tokenizer, refinement_prompt=SR_DPO_REFINEMENT_PROMPT)
    prompt_text = tokenizer.apply_chat_template(CHAT["prompt"], tokenize=False, add_generation_prompt=True)
    assert tokenizer.decode(out["prompt_input_ids"]) == prompt_text
    assert tokenizer.decode(out["chosen_input_ids"]) == "Sure! fox. 3+8=11. Done.<|end|>"
    aug_text = tokenizer.decode(out["aug_prompt_input_ids"])
    assert aug_text == ("<|bos|><|system|>Be brief.<|end|><|user|>" + SR_DPO_REFINEMENT_PROMPT
                        + " Say fox and add 3+8.<|end|><|assistant|>")
    no_template = build_tokenizer()
    no_template.chat_template = None
    with pytest.raises(ValueError, match="chat template"):
        tokenize_pair(CHAT, no_template)
    with pytest.raises(ValueError, match="'chosen' must be a list of messages"):
        tokenize_pair({**CHAT, "chosen": "Sure!"}, tokenizer)
    with pytest.raises(ValueError, match="no user message"):
        tokenize_pair({**CHAT, "prompt": CHAT["prompt"][:1]}, tokenizer, refinement_prompt="p")


def test_augmented_standard_prompt(tokenizer):
    out = tokenize_pair(ROW, tokenizer, refinement_prompt=SR_DPO_REFINEMENT_PROMPT)
    assert tokenizer.decode(out["aug_prompt_input_ids"]) == "<|bos|>" + SR_DPO_REFINEMENT_PROMPT + " " + ROW["prompt"]
    assert out["chosen_input_ids"] == tokenize_pair(ROW, tokenizer)["chosen_input_ids"]


@pytest.mark.parametrize("max_length", [12, 16, 19, 25, 40])
def test_keep_end_truncation(tokenizer, max_length):
    full = tokenize_pair(ROW, tokenizer, refinement_prompt="Be good. Query:", max_length=None)
    out = tokenize_pair(ROW, tokenizer, refinement_prompt="Be good. Query:", max_length=max_length,
                        truncation_mode="keep_end")
    longest = max(len(full["chosen_input_ids"]), len(full["rejected_input_ids"]))
    kept = min(max(max_length - longest, 1), len(full["prompt_input_ids"]))
    assert out["prompt_input_ids"] == full["prompt_input_ids"][-kept:]
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert len(out["prompt_input_ids"]) + len(out[key]) <= max_length
        assert out[key] == full[key][: max_length - kept]
    # The augmented prompt keeps the bos and p whole (the prefix the trainer caches, even when the plain prompt
    # lost its bos) and ends with exactly the plain prompt's kept tokens.
    aug = out["aug_prompt_input_ids"]
    prefix = [tokenizer.bos_token_id, *tokenizer("Be good. Query:", add_special_tokens=False)["input_ids"]]
    assert aug[:len(prefix)] == prefix
    if kept == len(full["prompt_input_ids"]):
        assert aug == full["aug_prompt_input_ids"]
    else:
        assert aug[-kept:] == out["prompt_input_ids"]


def test_default_truncation_mode_is_trls(tokenizer):
    """tokenize_pair and PreferenceConfig share TRL 1.16's DPOConfig default, keep_start."""
    import inspect

    from trl import DPOConfig

    default = inspect.signature(tokenize_pair).parameters["truncation_mode"].default
    assert default == DPOConfig.__dataclass_fields__["truncation_mode"].default == "keep_start"
    assert TRUNCATION_MODES[0] == default


@pytest.mark.parametrize("conversational", [False, True])
def test_refinement_prefix_is_the_template_and_p(tokenizer, conversational):
    """refinement_prefix_ids is bos (+ the chat template's user-turn opening) + p's tokens, whatever the queries,
    and every augmented prompt tokenize_pair makes starts with it, also when truncation cuts the plain prompt's
    start (its bos) or the query begins like p."""
    p = "Be good. Query:"
    prefix = refinement_prefix_ids(tokenizer, p, conversational=conversational)
    opening = tokenizer("<|user|>", add_special_tokens=False)["input_ids"] if conversational else []
    assert prefix == [tokenizer.bos_token_id, *opening, *tokenizer(p, add_special_tokens=False)["input_ids"]]
    for query in ("Say fox and add 3+8.", "Be good and say 1.", "Query: 7", " spaced", "x"):
        prompt = [{"role": "user", "content": query}] if conversational else query
        row = {"prompt": prompt, "chosen": ROW["chosen"], "rejected": ROW["rejected"]}
        if conversational:
            row = {**row, "chosen": CHAT["chosen"], "rejected": CHAT["rejected"]}
        for mode, max_length in (("keep_end", 14), ("keep_start", 1024), ("keep_end", None)):
            aug = tokenize_pair(row, tokenizer, refinement_prompt=p, truncation_mode=mode,
                                max_length=max_length)["aug_prompt_input_ids"]
            assert aug[:len(prefix)] == prefix and len(aug) > len(prefix), (query, mode)


MULTI_TURN = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
              {"role": "user", "content": "Say fox."}]


@pytest.mark.parametrize("system", [False, True])
def test_refinement_before_conversation(tokenizer, system):
    """before_conversation puts p at the start of the first message (the system message or the first user turn);
    last_user_turn inside the last user turn; the prompt starts with refinement_prefix_ids of its first role."""
    p = "Be good. Query:"
    prompt = [CHAT["prompt"][0], *MULTI_TURN] if system else MULTI_TURN
    row = {"prompt": prompt, "chosen": CHAT["chosen"], "rejected": CHAT["rejected"]}

    def rendered(messages):
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]

    for position, target in (("before_conversation", 0), ("last_user_turn", len(prompt) - 1)):
        aug = tokenize_pair(row, tokenizer, refinement_prompt=p, max_length=None,
                            refinement_position=position)["aug_prompt_input_ids"]
        moved = [dict(message) for message in prompt]
        moved[target]["content"] = p + " " + moved[target]["content"]
        assert aug == rendered(moved), position
    aug = tokenize_pair(row, tokenizer, refinement_prompt=p, refinement_position="before_conversation")
    prefix = refinement_prefix_ids(tokenizer, p, conversational=True, first_role="system" if system else "user")
    assert aug["aug_prompt_input_ids"][:len(prefix)] == prefix
    string = tokenize_pair(ROW, tokenizer, refinement_prompt=p, refinement_position="before_conversation")
    assert string == tokenize_pair(ROW, tokenizer, refinement_prompt=p)
    with pytest.raises(ValueError, match="refinement_position"):
        tokenize_pair(ROW, tokenizer, refinement_prompt=p, refinement_position="first")


@pytest.mark.parametrize("max_length", [14, 17, 30])
def test_keep_start_truncation(tokenizer, max_length):
    full = tokenize_pair(ROW, tokenizer, refinement_prompt="Be good. Query:", max_length=None)
    out = tokenize_pair(ROW, tokenizer, refinement_prompt="Be good. Query:", max_length=max_length,
                        truncation_mode="keep_start")
    assert out["prompt_input_ids"] == full["prompt_input_ids"]
    for key in ("chosen_input_ids", "rejected_input_ids"):
        assert out[key] == full[key][: max_length - len(full["prompt_input_ids"])]
    assert out["aug_prompt_input_ids"] == full["aug_prompt_input_ids"]


def test_max_prompt_length_and_errors(tokenizer):
    full = tokenize_pair(ROW, tokenizer, max_length=None)
    for mode, cut in (("keep_end", slice(-5, None)), ("keep_start", slice(None, 5))):
        out = tokenize_pair(ROW, tokenizer, max_prompt_length=5, truncation_mode=mode)
        assert out["prompt_input_ids"] == full["prompt_input_ids"][cut]
    with pytest.raises(ValueError, match="empty chosen response after truncation"):
        tokenize_pair(ROW, tokenizer, max_length=len(full["prompt_input_ids"]), truncation_mode="keep_start")
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_pair(ROW, tokenizer, truncation_mode="left")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_pair(ROW, tokenizer, max_length=1)
    with pytest.raises(ValueError, match="refinement_prompt"):
        tokenize_pair(ROW, tokenizer, refinement_prompt="")
    with pytest.raises(ValueError, match="'chosen' must be a string"):
        tokenize_pair({**ROW, "chosen": 3}, tokenizer)


RANKED_ROW = {"prompt": "Question: what is the sum of 17 and 25, given as digits?",
              "completions": [" 42, since 17 + 25 = 42 exactly.", " 41", " It is 42."]}


@pytest.mark.parametrize("mode, max_length", [(mode, None) for mode in TRUNCATION_MODES] + [
    ("keep_end", 9), ("keep_end", 13), ("keep_end", 41), ("keep_end", 60),
    ("keep_start", 41), ("keep_start", 44), ("keep_start", 49)])  # the prompt has 36 tokens, the completions 29, 4, 9
def test_ranked_row_truncates_as_a_pair(tokenizer, mode, max_length):
    """Each completion is cut as a pair of it and the longest completion is: one prompt for all K (keep_end used to
    cut the prompt per completion and then refuse the row for its different prompts)."""
    out = tokenize_ranked(RANKED_ROW, tokenizer, max_length=max_length, truncation_mode=mode)
    assert len({len(ids) for ids in out["completions_input_ids"]}) > 1  # ragged: the longest one decides
    longest = RANKED_ROW["completions"][0]
    for completion, ids in zip(RANKED_ROW["completions"], out["completions_input_ids"], strict=True):
        pair = tokenize_pair({"prompt": RANKED_ROW["prompt"], "chosen": completion, "rejected": longest}, tokenizer,
                             max_length=max_length, truncation_mode=mode)
        assert out["prompt_input_ids"] == pair["prompt_input_ids"]
        assert ids == pair["chosen_input_ids"]
        assert max_length is None or len(out["prompt_input_ids"]) + len(ids) <= max_length


def test_ranked_row_errors(tokenizer):
    prompt = tokenize_pair({**RANKED_ROW, "chosen": "a", "rejected": "b"}, tokenizer, max_length=None)
    with pytest.raises(ValueError, match=r"empty completions\[0\] response after truncation"):
        tokenize_ranked(RANKED_ROW, tokenizer, max_length=len(prompt["prompt_input_ids"]), truncation_mode="keep_start")
    with pytest.raises(ValueError, match="different prompt tokens"):
        tokenize_ranked({"prompt": "Answer: the", "completions": [" n", "n"]}, tokenizer)
    with pytest.raises(ValueError, match="truncation_mode"):
        tokenize_ranked(RANKED_ROW, tokenizer, truncation_mode="left")


def test_tokenized_demo_sequences_are_short(tokenizer):
    lengths = [len(out["prompt_input_ids"]) + max(len(out["chosen_input_ids"]), len(out["rejected_input_ids"]))
               for out in (tokenize_pair(row, tokenizer) for row in synthetic.generate(100, seed=5))]
    assert 15 <= min(lengths) and max(lengths) <= 60


# --- reward-augmented relabeling -----------------------------------------------------------------------------

def test_reward_augment_rows():
    rows = [{**row, "tau": 0.8, "offset": 1.0, "ref_chosen_logps": -3.0}
            for row in synthetic.generate(3, seed=4)]
    out = reward_augment(rows, template="score={score:g}.")
    assert isinstance(out, list) and len(out) == 6
    for i, row in enumerate(rows):
        as_is, swapped = out[2 * i], out[2 * i + 1]
        assert as_is["prompt"] == f"score={row['score_chosen']:g}.\n{row['prompt']}"
        assert (as_is["chosen"], as_is["rejected"]) == (row["chosen"], row["rejected"])
        assert (as_is["score_chosen"], as_is["tau"]) == (row["score_chosen"], 0.8)
        assert swapped["prompt"] == f"score={row['score_rejected']:g}.\n{row['prompt']}"
        assert (swapped["chosen"], swapped["rejected"]) == (row["rejected"], row["chosen"])
        assert (swapped["score_chosen"], swapped["score_rejected"]) == (row["score_rejected"], row["score_chosen"])
        assert swapped["tau"] == pytest.approx(0.2)
        assert "offset" not in as_is and "ref_chosen_logps" not in swapped


def test_reward_augment_dataset_and_conversational():
    rows = [{**CHAT, "score_chosen": 9.0, "score_rejected": 2.5}]
    out = reward_augment(datasets.Dataset.from_list(rows))
    assert isinstance(out, datasets.Dataset) and len(out) == 2
    assert out[0]["prompt"][0]["content"] == "Write a response whose quality score is 9 out of 10.\nBe brief."
    assert out[1]["prompt"][0]["content"].startswith("Write a response whose quality score is 2.5 out of 10.")
    assert out[1]["chosen"] == CHAT["rejected"]
    no_system = reward_conditioned_prompt(CHAT["prompt"][1:], 10, template="s={score}")
    assert no_system == [{"role": "system", "content": "s=10"}, CHAT["prompt"][1]]
    with pytest.raises(ValueError, match="score_rejected"):
        reward_augment([{"prompt": "p", "chosen": "a", "rejected": "b", "score_chosen": 1.0}])
    with pytest.raises(ValueError, match="template"):
        reward_augment(rows, template="{quality}")
    with pytest.raises(TypeError, match="dataset_or_rows"):
        reward_augment("rows")


def test_reward_augment_without_system_role_scores_the_first_user_turn():
    turns = [{"role": "user", "content": "Hi."}, {"role": "assistant", "content": "Hello."},
             {"role": "user", "content": "Say fox."}]
    rows = [{"prompt": [CHAT["prompt"][0], *turns], "chosen": CHAT["chosen"], "rejected": CHAT["rejected"],
             "score_chosen": 7.0, "score_rejected": 3.0}]
    out = reward_augment(rows, template="s={score:g}", system_role=False)
    assert [message["content"] for message in out[0]["prompt"]] == ["Be brief.", "s=7\nHi.", "Hello.", "Say fox."]
    assert out[1]["prompt"][1]["content"] == "s=3\nHi."
    assert rows[0]["prompt"][1]["content"] == "Hi."   # the input rows are not modified
    assert reward_conditioned_prompt("Say fox.", 9, template="s={score}", system_role=False) == "s=9\nSay fox."
    with pytest.raises(ValueError, match="first user turn"):
        reward_conditioned_prompt(CHAT["prompt"][:1], 9, system_role=False)


def test_reward_augment_drops_tied_pairs_with_a_count():
    rows = synthetic.generate(5, seed=6)
    for i in (1, 3):
        rows[i] = {**rows[i], "score_rejected": rows[i]["score_chosen"]}
    with pytest.warns(UserWarning, match=r"dropped 2 of 5 pairs with tied scores .*rows \[1, 3\]"):
        out = reward_augment(rows, template="s={score:g}")
    assert len(out) == 6
    assert [row["chosen"] for row in out[::2]] == [rows[i]["chosen"] for i in (0, 2, 4)]


# --- self-critique pairs -------------------------------------------------------------------------------------

def test_parse_score_keeps_signs():
    assert parse_score("Score: -3.5") == -3.5
    assert parse_score("I'd say the score is −2 (out of 10), not 7") == -2.0
    assert parse_score("Rating=+4.25/10") == 4.25
    assert parse_score("The answer deserves 6.") == 6.0
    assert parse_score("score: - 1") == -1.0
    assert parse_score("somewhere in 3-5") == 5.0  # a range, not −5
    assert parse_score("Score:-2.5e1") == -25.0
    with pytest.raises(ValueError, match="no score"):
        parse_score("excellent")


def _teacher(text: str) -> str:
    """A deterministic teacher: answers, critiques and revises by simple string rules."""
    if text.startswith("Here is a request, a response and a critique"):
        request = text.split("Request: ")[1].split("\n")[0]
        return f"polite answer to {request}" if "skip" not in request else f"rude answer to {request}"
    if text.startswith("Here is a request and a response"):
        return "too rude"
    return f"rude answer to {text}"


def _text_judge(prompt: str, response: str) -> str:
    return f"Thoughts... Score: {-3.5 if response.startswith('rude') else 2.0 + len(prompt) / 10}"


def test_self_critique_pairs_with_a_text_judge():
    rows = self_critique_pairs(["hi", "tell me more", "skip this"], _teacher, _text_judge, temperature=2.0)
    assert [row["prompt"] for row in rows] == ["hi", "tell me more"]  # identical revision skipped
    for row in rows:
        assert row["chosen"] == f"polite answer to {row['prompt']}"
        assert row["rejected"] == f"rude answer to {row['prompt']}"
        assert row["score_rejected"] == -3.5
        assert row["score_chosen"] == pytest.approx(2.0 + len(row["prompt"]) / 10)
        assert row["tau"] == pytest.approx(1 / (1 + math.exp(-(row["score_chosen"] + 3.5) / 2.0)))
    kept = self_critique_pairs(["skip this"], _teacher, _text_judge, keep_identical=True)
    assert kept[0]["tau"] == 0.5


def test_self_critique_pairs_numeric_judge_and_soft_labels():
    # A judge that prefers the first answer gives tau < 0.5: the chosen revision is likely worse.
    rows = self_critique_pairs(["q"], _teacher, lambda p, r: 1.0 if r.startswith("rude") else -1.0)
    assert rows[0]["tau"] == pytest.approx(1 / (1 + math.exp(2.0)))
    extreme = self_critique_pairs(["q"], _teacher, lambda p, r: 0.0 if r.startswith("rude") else 1e4,
                                  temperature=0.01)
    assert extreme[0]["tau"] == 1.0
    with pytest.raises(ValueError, match="temperature"):
        self_critique_pairs(["q"], _teacher, _text_judge, temperature=0.0)
    with pytest.raises(ValueError, match="non-finite"):
        self_critique_pairs(["q"], _teacher, lambda p, r: float("nan"))
    with pytest.raises(ValueError, match="prompts"):
        self_critique_pairs([""], _teacher, _text_judge)
