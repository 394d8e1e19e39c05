"""Online / iterative preference rounds: sample K responses per prompt from the current policy, score them, pair
them, train one :class:`fastpref.PreferenceTrainer` stage, and make the trained policy the next round's reference.
DICE, iLR-DPO and APO are configurations of it (``docs/rounds.md``).

:func:`run_rounds` and :class:`RoundsConfig` (:mod:`fastpref.rounds.loop`); the scorers
(:mod:`fastpref.rounds.scorers`); pairing and replay (:mod:`fastpref.rounds.pairing`); batched sampling
(:mod:`fastpref.rounds.sampling`); the ``fastpref rounds`` command (:mod:`fastpref.rounds.cli`).
"""

from __future__ import annotations

from fastpref.rounds.loop import RoundsConfig, RoundsResult, extrapolate, finished_rounds, run_rounds
from fastpref.rounds.pairing import PAIRING_RULES, add_length_offsets, build_pairs, mix_replay, replay_count
from fastpref.rounds.sampling import SamplingConfig, sample_responses
from fastpref.rounds.scorers import (DemoTaskReward, ImplicitRewardScorer, JudgeScorer, KeywordCount, LengthPenalty,
                                     RewardModelScorer, RoundModels, Scorer, SumScorer, as_scorer)

__all__ = [
    "PAIRING_RULES", "DemoTaskReward", "ImplicitRewardScorer", "JudgeScorer", "KeywordCount", "LengthPenalty", "RewardModelScorer",
    "RoundModels", "RoundsConfig", "RoundsResult", "SamplingConfig", "Scorer", "SumScorer", "add_length_offsets",
    "as_scorer", "build_pairs", "extrapolate", "finished_rounds", "mix_replay", "replay_count", "run_rounds",
    "sample_responses",
]
