"""rDPO's τ from score columns: fastpref.losses.tau_from_scores, PreferenceConfig.tau_mode / score_range, the CLI."""

from __future__ import annotations

import pytest
import torch

from fastpref.cli import _parse
from fastpref.losses import bt_tau, tau_from_scores
from fastpref.trainer import PreferenceConfig

SCORE_W = torch.tensor([3.0, -2.0, 1.0, -5.0, 0.5], dtype=torch.float64)
SCORE_L = torch.tensor([1.0, -4.0, 1.0, -1.0, 0.5], dtype=torch.float64)


def test_modes():
    torch.testing.assert_close(tau_from_scores(SCORE_W, SCORE_L, "bt", temperature=2.0), bt_tau(SCORE_W, SCORE_L, 2.0))
    hard = tau_from_scores(SCORE_W, SCORE_L, "hard")
    assert hard.tolist() == [1.0, 1.0, 0.5, 0.0, 0.5] and hard.dtype == torch.float64
    lo = -5.0  # a judge on [−5, 5]: negative scores are on the scale
    want = torch.tensor([(3 - lo) / ((3 - lo) + (1 - lo)), 3 / (3 + 1), 0.5, 0.0 / (0 + 4), 0.5], dtype=torch.float64)
    got = tau_from_scores(SCORE_W, SCORE_L, "normalized", score_range=(lo, 5.0))
    torch.testing.assert_close(got, want, rtol=1e-12, atol=0)
    both_low = tau_from_scores(torch.tensor([0.0]), torch.tensor([0.0]), "normalized", score_range=(0, 1))
    assert both_low.tolist() == [0.5]


def test_binary_judge_with_bt_is_not_one():
    tau = tau_from_scores(torch.tensor([1.0]), torch.tensor([0.0]), "bt")
    assert abs(tau.item() - 0.7311) < 1e-4


@pytest.mark.parametrize("kwargs,match", [
    ({"mode": "soft"}, "tau_mode"),
    ({"mode": "normalized"}, "score_range"),
    ({"mode": "normalized", "score_range": (1.0, 0.0)}, "score_range"),
    ({"mode": "normalized", "score_range": (0.0, 2.0)}, "score_chosen has values outside score_range"),
    ({"mode": "bt", "temperature": -1.0}, "temperature"),
])
def test_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        tau_from_scores(SCORE_W, SCORE_L, **kwargs)


def test_config_fields(tmp_path):
    with pytest.raises(ValueError, match="tau_mode"):
        PreferenceConfig(output_dir=str(tmp_path), tau_mode="soft")
    with pytest.raises(ValueError, match="score_range"):
        PreferenceConfig(output_dir=str(tmp_path), tau_mode="normalized")
    with pytest.raises(ValueError, match="score_temperature"):
        PreferenceConfig(output_dir=str(tmp_path), score_temperature=0.0)
    config = PreferenceConfig(output_dir=str(tmp_path), tau_mode="normalized", score_range=(-1, 1))
    assert config.score_range == [-1, 1]


def test_cli_parses_tau_mode(tmp_path):
    _, config = _parse(["--model", "tiny", "--dataset", "demo", "--output_dir", str(tmp_path), "--loss_type", "rdpo",
                        "--tau_mode", "normalized", "--score_range", "-5", "5"])
    assert (config.tau_mode, config.score_range) == ("normalized", [-5.0, 5.0])


@pytest.mark.parametrize("mode,fields", [("bt", {"score_temperature": 3.0}), ("hard", {}),
                                         ("normalized", {"score_range": [-5.0, 5.0]})])
def test_trainer_derives_tau_with_the_configured_mode(tmp_path, mode, fields):
    from types import SimpleNamespace

    from fastpref.trainer import PreferenceTrainer

    config = PreferenceConfig(output_dir=str(tmp_path), loss_type="rdpo", tau_mode=mode, **fields)
    inputs = {"score_chosen": SCORE_W.float(), "score_rejected": SCORE_L.float()}
    extras = PreferenceTrainer._pair_extras(SimpleNamespace(args=config), inputs)
    want = tau_from_scores(SCORE_W.float(), SCORE_L.float(), mode, temperature=config.score_temperature,
                           score_range=config.score_range)
    torch.testing.assert_close(extras["tau"], want)
    if mode != "bt":
        assert not torch.allclose(extras["tau"], tau_from_scores(SCORE_W.float(), SCORE_L.float(), "bt"))
