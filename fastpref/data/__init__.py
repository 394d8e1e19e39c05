"""Preference data: loading (TRL formats), tokenization, the bundled synthetic set, and the data side of the
seed papers — reward-augmented relabeling (arXiv 2410.08067), self-critique pairs (rDPO, arXiv 2402.08005),
Curry-DPO's easy → hard pairs from ranked responses (arXiv 2403.07230) and per-token weights aligned to the
tokens the trainer sees (``response_tokens``).
"""

from __future__ import annotations

from fastpref.data.augment import reward_augment, reward_conditioned_prompt
from fastpref.data.critique import parse_score, self_critique_pairs
from fastpref.data.loading import extract_prompt, is_conversational, load_preference_dataset
from fastpref.data.ranked import PAIR_STRATEGIES, pairs_from_ranked
from fastpref.data.prompts import CRITIQUE_TEMPLATE, REVISE_TEMPLATE, REWARD_AUGMENT_TEMPLATE, SR_DPO_REFINEMENT_PROMPT
from fastpref.data.tokenization import TRUNCATION_MODES, response_tokens, tokenize_pair

__all__ = [
    "CRITIQUE_TEMPLATE", "REVISE_TEMPLATE", "REWARD_AUGMENT_TEMPLATE", "SR_DPO_REFINEMENT_PROMPT",
    "PAIR_STRATEGIES", "TRUNCATION_MODES", "extract_prompt", "is_conversational", "load_preference_dataset",
    "pairs_from_ranked", "parse_score", "response_tokens", "reward_augment", "reward_conditioned_prompt",
    "self_critique_pairs", "tokenize_pair",
]
