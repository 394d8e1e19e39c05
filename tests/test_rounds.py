"""fastpref.rounds: pairing rules, replay, each scorer against hand-computed values, left-padded sampling, APO's
extrapolation, the round loop end to end with resume, round 2's reference, and the ``fastpref rounds`` entry."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch
from trainer_helpers import TOKENIZER, config, tiny_model

from fastpref.rounds import (ImplicitRewardScorer, JudgeScorer, KeywordCount, LengthPenalty, RewardModelScorer,
                             RoundModels, RoundsConfig, SamplingConfig, Scorer, add_length_offsets, build_pairs,
                             extrapolate, mix_replay, replay_count, run_rounds, sample_responses)
from fastpref.rounds.scorers import DemoTaskReward

EOS = TOKENIZER.eos_token


def _float64_logps(model, prompt: str, response: str) -> torch.Tensor:
    """log π(response ⊕ eos | prompt) from full float64 logits, tokenized independently of the code under test:
    the prompt is where tokenizer(prompt) and tokenizer(prompt + response + eos) stop agreeing."""
    full = TOKENIZER(prompt + response + EOS)["input_ids"]
    alone = TOKENIZER(prompt)["input_ids"]
    cut = 0
    while cut < min(len(full), len(alone)) and full[cut] == alone[cut]:
        cut += 1
    ids = torch.tensor([full])
    logits = model(input_ids=ids, use_cache=False).logits[0].double()
    token_logps = torch.log_softmax(logits[:-1], dim=-1).gather(1, ids[0, 1:, None])[:, 0]
    return token_logps[cut - 1:].sum()


# ---- pairing and replay --------------------------------------------------------------------------------------

def test_best_vs_worst_keeps_the_extremes_and_drops_ties_and_small_gaps():
    prompts = ["a", "b", "c", "d"]
    responses = [["x1", "x2", "x3"], ["y1", "y2"], ["z1", "z2"], ["w", "w", "v"]]
    scores = [[1.0, 3.0, 2.0], [2.0, 2.0], [5.0, 4.5], [1.0, 9.0, 0.0]]
    rows = build_pairs(prompts, responses, scores, rule="best_vs_worst")
    assert [(r["prompt"], r["chosen"], r["rejected"], r["score_chosen"], r["score_rejected"]) for r in rows] == [
        ("a", "x2", "x1", 3.0, 1.0), ("c", "z1", "z2", 5.0, 4.5), ("d", "w", "v", 1.0, 0.0)]  # "w" keeps its 1st score
    assert [r["prompt"] for r in build_pairs(prompts, responses, scores, margin=0.5)] == ["a", "d"]  # gap 0.5: no


def test_all_pairs_are_the_ordered_pairs_over_the_margin():
    scores = [3.0, 1.0, 2.0, 2.0]
    texts = ["s0", "s1", "s2", "s3"]
    got = {(r["chosen"], r["rejected"]) for r in build_pairs(["p"], [texts], [scores], rule="all_pairs")}
    assert got == {("s0", "s1"), ("s0", "s2"), ("s0", "s3"), ("s2", "s1"), ("s3", "s1")}  # s2/s3 tie: dropped
    wide = build_pairs(["p"], [texts], torch.tensor([scores]), rule="all_pairs", margin=1.0)
    assert [(r["chosen"], r["rejected"]) for r in wide] == [("s0", "s1")]
    with pytest.raises(ValueError, match="rule"):
        build_pairs(["p"], [texts], [scores], rule="best")
    with pytest.raises(ValueError, match="non-finite"):
        build_pairs(["p"], [texts], [[1.0, math.nan, 0.0, 0.0]])


def test_replay_share_of_the_training_set():
    pool = [{"prompt": f"p{i}", "chosen": "a", "rejected": "b"} for i in range(100)]
    new = pool[:30]
    assert replay_count(30, 100, 0.25) == 10 and replay_count(30, 4, 0.5) == 4 and replay_count(30, 100, 0.0) == 0
    replayed = mix_replay(new, pool, 0.25, seed=3)
    assert len(replayed) == 10 and len({r["prompt"] for r in replayed}) == 10  # 10 / (30 + 10) = 0.25, no repeats
    assert replayed == mix_replay(new, pool, 0.25, seed=3) and replayed != mix_replay(new, pool, 0.25, seed=4)
    with pytest.raises(ValueError, match="replay_share"):
        mix_replay(new, pool, 1.0, seed=0)


def test_length_offsets_are_alpha_times_the_token_length_gap():
    # digits are one token each in fastpref's tokenizer: "12345" is 5 tokens, "12" is 2
    rows = add_length_offsets([{"prompt": "p", "chosen": "12345", "rejected": "12"}], 0.25,
                              lambda text: len(TOKENIZER(text, add_special_tokens=False)["input_ids"]))
    assert rows[0]["offset"] == pytest.approx(0.25 * (5 - 2))


# ---- scorers -------------------------------------------------------------------------------------------------

def test_keyword_length_and_sums():
    prompts, responses = ["p", "q"], ["abcab c", "xyz 123"]
    assert KeywordCount(["ab", "c"]).score(prompts, responses).tolist() == [4.0, 0.0]
    assert LengthPenalty(0.5, unit="chars").score(prompts, responses).tolist() == [-3.5, -3.5]
    tokens = LengthPenalty(2.0, tokenizer=TOKENIZER).score(["p"], ["123"])
    assert tokens.tolist() == [-6.0]  # three digit tokens
    total = 2 * KeywordCount("ab") + LengthPenalty(0.5, unit="chars") + KeywordCount("z")
    assert total.score(prompts, responses).tolist() == [2 * 2 - 3.5, 1 - 3.5]
    assert total.score(prompts, responses).dtype == torch.float64
    assert sum([KeywordCount("ab"), KeywordCount("c")]).score(prompts, responses).tolist() == [4.0, 0.0]

    class Broken:
        def score(self, prompts, responses):
            return [float("nan")] * len(responses)

    with pytest.raises(ValueError, match="non-finite"):
        (KeywordCount("a") + Broken()).score(prompts, responses)


def test_judge_replies_are_parsed_with_their_sign():
    replies = {"one": "Score: -3.5", "two": 7, "three": "I'd give it a rating of 2 out of 10"}
    judge = JudgeScorer(lambda prompt, response: replies[response])
    assert judge.score(["p"] * 3, ["one", "two", "three"]).tolist() == [-3.5, 7.0, 10.0]
    judge_rating = JudgeScorer(lambda prompt, response: "rating: 2 (out of 10)")
    assert judge_rating.score(["p"], ["x"]).tolist() == [2.0]
    with pytest.raises(ValueError, match="no score"):
        JudgeScorer(lambda prompt, response: "no idea").score(["p"], ["x"])


def test_demo_task_reward_reads_the_parts():
    prompt = "Say fox and add 3+8."
    got = DemoTaskReward().score([prompt] * 4, [" Sure! fox. 3+8=11. Done.", " Ugh. fox. 3+8=9. Done.",
                                                " Sure! dog. 3+8=111. Whatever.", ""])
    assert got.tolist() == [10.0, round(30 / 7, 2), round(10 / 7, 2), 0.0]


def test_reward_model_scorer_matches_unpadded_last_token_pooling(tmp_path):
    from transformers import LlamaConfig, LlamaForSequenceClassification

    torch.manual_seed(0)
    rm = LlamaForSequenceClassification(LlamaConfig(
        vocab_size=len(TOKENIZER), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, num_labels=1, pad_token_id=TOKENIZER.pad_token_id))
    rm.save_pretrained(tmp_path / "rm")
    TOKENIZER.save_pretrained(tmp_path / "rm")
    prompts = ["Say fox and add 3+8.", "Hi", "Please say owl, then add 1+2."]
    responses = [" Sure! fox. 3+8=11. Done.", " a much longer answer with many more tokens in it", ""]
    got = RewardModelScorer(str(tmp_path / "rm"), batch_size=2, device="cpu").score(prompts, responses)

    def pooled(model, dtype):
        out = []
        for prompt, response in zip(prompts, responses):
            ids = torch.tensor([TOKENIZER(prompt + response)["input_ids"]])
            hidden = model.to(dtype).model(input_ids=ids).last_hidden_state[0, -1]
            out.append(hidden @ model.score.weight[0])
        return torch.stack(out).double()

    with torch.no_grad():
        plain = pooled(rm, torch.float32)
        truth = pooled(rm, torch.float64)
    bound = 2 * (plain - truth).abs().max() + 1e-5
    assert got.dtype == torch.float64 and (got - truth).abs().max() <= bound


def test_implicit_reward_matches_float64_full_logits():
    policy, reference = tiny_model(seed=0), tiny_model(seed=1)
    prompts = ["Say fox and add 3+8.", "Please say owl, then add 1+2.", "Say cat and add 0+0."]
    responses = [" Sure! fox. 3+8=11. Done.", "", " Ugh. dog. 1+2=4. Whatever. and more words here"]
    scorer = ImplicitRewardScorer(beta=0.3, batch_size=2)
    scorer.bind(RoundModels(policy=policy, reference=reference, tokenizer=TOKENIZER, round=2))
    got = scorer.score(prompts, responses)

    def rewards(dtype):
        pol, ref = (tiny_model(seed=s).to(dtype) for s in (0, 1))
        with torch.no_grad():
            return torch.stack([0.3 * (_float64_logps(pol, p, r) - _float64_logps(ref, p, r))
                                for p, r in zip(prompts, responses)])

    truth, plain = rewards(torch.float64), rewards(torch.float32)
    assert (got - truth).abs().max() <= 2 * (plain - truth).abs().max() + 1e-5
    assert (truth.abs() > 1e-3).all()  # the two models differ: a scorer returning zeros fails

    own = ImplicitRewardScorer(beta=0.3, reference=reference, batch_size=2)
    own.bind(RoundModels(policy=policy, reference=None, tokenizer=TOKENIZER, round=1))  # round 1: its own reference
    torch.testing.assert_close(own.score(prompts, responses), got, rtol=0, atol=1e-6)
    with pytest.raises(ValueError, match="no reference"):
        ImplicitRewardScorer().bind(RoundModels(policy=policy, reference=None, tokenizer=TOKENIZER, round=1))


# ---- sampling and APO ----------------------------------------------------------------------------------------

def test_batched_left_padded_sampling_equals_one_prompt_at_a_time():
    model = tiny_model()
    prompts = ["Hi", "Say fox and add 3+8.", "Please say owl, then add 1+2. Then say it again."]
    greedy = SamplingConfig(samples_per_prompt=2, max_new_tokens=6, temperature=0.0, batch_size=3)
    batched = sample_responses(model, TOKENIZER, prompts, greedy)
    alone = [sample_responses(model, TOKENIZER, [p], greedy)[0] for p in prompts]
    assert batched == alone and all(len(group) == 2 and group[0] == group[1] for group in batched)
    sampled = SamplingConfig(samples_per_prompt=3, max_new_tokens=6, batch_size=2)
    first = sample_responses(model, TOKENIZER, prompts, sampled, seed=5)
    assert first == sample_responses(model, TOKENIZER, prompts, sampled, seed=5)
    assert first != sample_responses(model, TOKENIZER, prompts, sampled, seed=6)


def test_apo_extrapolation_applies_once_per_parameter_even_when_tied():
    model, start = tiny_model("tiny-gpt2", seed=0), tiny_model("tiny-gpt2", seed=1)  # gpt2 ties wte and lm_head
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    extrapolate(model, start, 0.5)
    for name, param in model.named_parameters():
        start_param = dict(start.named_parameters())[name]
        torch.testing.assert_close(param, before[name] + 0.5 * (before[name] - start_param), rtol=0, atol=1e-6)
    assert model.lm_head.weight.data_ptr() == model.transformer.wte.weight.data_ptr()


# ---- the round loop ------------------------------------------------------------------------------------------

PROMPTS = ["Say fox and add 3+8.", "Please say owl, then add 1+2.", "Say bee and add 4+4."]
HELD_OUT = ["Say cat and add 2+2.", "Please say sun, then add 5+1."]
ROUNDS = RoundsConfig(rounds=2, samples_per_prompt=3, max_new_tokens=6, pairing="all_pairs", apo_alpha=0.5)


class CountingScorer(Scorer):
    """Vowel count plus the implicit reward (so the loop's models reach it); records the rounds it was bound in
    and can raise in a given round (a simulated kill)."""

    needs_models = True

    def __init__(self, reference, interrupt_in: int | None = None):
        self.inner = KeywordCount(list("aeiou")) + ImplicitRewardScorer(beta=0.1, reference=reference)
        self.interrupt_in, self.bound = interrupt_in, []

    def bind(self, models):
        self.bound.append(models.round)
        self.inner.bind(models)

    def score(self, prompts, responses):
        if self.bound and self.bound[-1] == self.interrupt_in:
            raise KeyboardInterrupt
        return self.inner.score(prompts, responses)


def _run(tmp_path, name: str, scorer, rounds: RoundsConfig = ROUNDS):
    args = config(tmp_path / name, max_steps=2, per_device_train_batch_size=4)
    args.output_dir = str(tmp_path / name)
    return run_rounds(tiny_model(seed=0), PROMPTS, scorer, args=args, config=rounds, tokenizer=TOKENIZER,
                      eval_prompts=HELD_OUT, eval_scorer=KeywordCount(list("aeiou")))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("rounds")
    scorer = CountingScorer(tiny_model(seed=1))
    return tmp, _run(tmp, "a", scorer), scorer


def test_round_loop_writes_every_round(finished):
    tmp, result, scorer = finished
    assert scorer.bound == [1, 2]
    assert [m["round"] for m in result.rounds] == [1, 2] and "heldout_reward" in result.initial
    for t in (1, 2):
        directory = tmp / "a" / f"round-{t}"
        assert json.loads((directory / "DONE").read_text())["round"] == t
        pairs = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
        assert pairs and all(set(p) == {"prompt", "chosen", "rejected", "score_chosen", "score_rejected"} and
                             p["score_chosen"] > p["score_rejected"] and p["prompt"] in PROMPTS for p in pairs)
        samples = [json.loads(line) for line in (directory / "samples.jsonl").read_text().splitlines()]
        assert len(samples) == len(PROMPTS) * ROUNDS.samples_per_prompt
        metrics = json.loads((directory / "metrics.json").read_text())
        assert metrics["pairs"] == len(pairs) and metrics["train_steps"] == 2 and "heldout_reward" in metrics
        assert (directory / "checkpoint" / "config.json").exists()


def test_round_two_reference_is_round_one_policy(finished):
    """The reference log-probs cached by round 2's trainer are those of round 1's checkpoint, not the initial
    model's."""
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    tmp, _, _ = finished
    directory = tmp / "a" / "round-2"
    pairs = [json.loads(line) for line in (directory / "pairs.jsonl").read_text().splitlines()]
    (cache,) = list((directory / "ref_cache").glob("train-*.safetensors"))
    cached = load_file(str(cache))["ref_chosen_logps"].double()
    round_one = AutoModelForCausalLM.from_pretrained(str(tmp / "a" / "round-1" / "checkpoint"))
    initial = tiny_model(seed=0)
    with torch.no_grad():
        want = torch.stack([_float64_logps(round_one.double(), p["prompt"], p["chosen"]) for p in pairs])
        initial_logps = torch.stack([_float64_logps(initial.double(), p["prompt"], p["chosen"]) for p in pairs])
    torch.testing.assert_close(cached, want, rtol=0, atol=2e-3)
    assert (initial_logps - want).abs().max() > 0.1  # the initial model would fail this test


def test_a_killed_run_resumes_at_the_last_finished_round(finished, tmp_path):
    tmp, _, _ = finished
    killed = CountingScorer(tiny_model(seed=1), interrupt_in=2)
    with pytest.raises(KeyboardInterrupt):
        _run(tmp_path, "b", killed)
    round_one = tmp_path / "b" / "round-1"
    assert (round_one / "DONE").exists() and not (tmp_path / "b" / "round-2" / "DONE").exists()
    (tmp_path / "b" / "round-2").mkdir(exist_ok=True)
    (tmp_path / "b" / "round-2" / "leftover.txt").write_text("partial")
    stamps = {p: p.stat().st_mtime_ns for p in round_one.rglob("*") if p.is_file()}

    resumed = CountingScorer(tiny_model(seed=1))
    result = _run(tmp_path, "b", resumed)
    assert resumed.bound == [2]  # round 1 is not redone
    assert {p: p.stat().st_mtime_ns for p in round_one.rglob("*") if p.is_file()} == stamps
    assert not (tmp_path / "b" / "round-2" / "leftover.txt").exists()
    assert [m["round"] for m in result.rounds] == [1, 2]
    # the resumed round 2 (policy and its reference loaded from disk) equals the uninterrupted run's
    for name in ("pairs.jsonl", "samples.jsonl"):
        assert (tmp_path / "b" / "round-2" / name).read_text() == (tmp / "a" / "round-2" / name).read_text()

    os.remove(tmp_path / "b" / "round-2" / "DONE")  # a lost marker: the round is redone
    again = CountingScorer(tiny_model(seed=1))
    _run(tmp_path, "b", again, RoundsConfig(**{**ROUNDS.__dict__}))
    assert again.bound == [2]


def test_rounds_cli_entry(tmp_path, capsys):
    from fastpref.rounds.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "cli"
    status = main(["--model", "tiny-llama", "--prompts", str(prompts), "--eval_prompts", str(prompts),
                   "--rounds", "1", "--samples_per_prompt", "2", "--max_new_tokens", "5", "--scorer", "keyword=e,a",
                   "--scorer", "0.5*keyword=o", "--length_penalty", "0.01", "--output_dir", str(out),
                   "--max_steps", "1", "--per_device_train_batch_size", "2", "--report_to", "none",
                   "--use_cpu", "true", "--save_strategy", "no", "--disable_tqdm", "true", "--learning_rate", "1e-3"])
    assert status == 0 and (out / "round-1" / "DONE").exists()
    printed = capsys.readouterr().out
    assert "round 1: pairs=" in printed and "heldout_reward=" in printed
    with pytest.raises(ValueError, match="--scorer"):
        main(["--model", "tiny-llama", "--prompts", str(prompts), "--output_dir", str(out), "--scorer", "magic"])


def test_lora_rounds_merge_the_adapters_into_the_next_reference(tmp_path):
    """With LoRA, round 1's checkpoint is a plain model with the adapters merged, and round 2's cached reference
    log-probs are that model's."""
    from peft import LoraConfig
    from safetensors import safe_open
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM")
    args = config(tmp_path, max_steps=2, per_device_train_batch_size=4, learning_rate=5e-2)
    args.output_dir = str(tmp_path / "lora")
    rounds = RoundsConfig(rounds=2, samples_per_prompt=2, max_new_tokens=5)
    run_rounds(tiny_model(seed=0), PROMPTS, KeywordCount(list("aeiou")), args=args, config=rounds,
               tokenizer=TOKENIZER, peft_config=lora)
    with safe_open(str(tmp_path / "lora" / "round-1" / "checkpoint" / "model.safetensors"), "pt") as handle:
        assert not [key for key in handle.keys() if "lora" in key]
    round_one = AutoModelForCausalLM.from_pretrained(str(tmp_path / "lora" / "round-1" / "checkpoint")).double()
    initial = tiny_model(seed=0).double()
    pairs = [json.loads(line) for line in (tmp_path / "lora" / "round-2" / "pairs.jsonl").read_text().splitlines()]
    (cache,) = list((tmp_path / "lora" / "round-2" / "ref_cache").glob("train-*.safetensors"))
    cached = load_file(str(cache))["ref_rejected_logps"].double()
    with torch.no_grad():
        want = torch.stack([_float64_logps(round_one, p["prompt"], p["rejected"]) for p in pairs])
        before = torch.stack([_float64_logps(initial, p["prompt"], p["rejected"]) for p in pairs])
    torch.testing.assert_close(cached, want, rtol=0, atol=2e-3)
    assert (before - want).abs().max() > 0.05  # the adapters changed the model: the unmerged one would fail


def test_a_round_without_pairs_carries_the_policy_over(tmp_path):
    from transformers import AutoModelForCausalLM

    args = config(tmp_path, max_steps=1)
    args.output_dir = str(tmp_path / "ties")
    with pytest.warns(RuntimeWarning, match="no pairs"):
        result = run_rounds(tiny_model(seed=0), PROMPTS, KeywordCount("§"), args=args, tokenizer=TOKENIZER,
                            config=RoundsConfig(rounds=1, samples_per_prompt=2, max_new_tokens=3))
    assert result.rounds[0]["pairs"] == 0 and "train_loss" not in result.rounds[0]
    saved = AutoModelForCausalLM.from_pretrained(str(tmp_path / "ties" / "round-1" / "checkpoint"))
    for (name, got), (_, want) in zip(saved.named_parameters(), tiny_model(seed=0).named_parameters()):
        torch.testing.assert_close(got, want, rtol=0, atol=0, msg=name)
