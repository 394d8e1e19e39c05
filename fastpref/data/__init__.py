"""Preference data: loading (TRL formats), tokenization, the bundled synthetic set, and the data side of the
seed papers — reward-augmented relabeling (arXiv 2410.08067) and self-critique pairs (rDPO, arXiv 2402.08005).
"""

from __future__ import annotations

from fastpref.data.augment import reward_augment, reward_conditioned_prompt
from fastpref.data.critique import parse_score, self_critique_pairs
from fastpref.data.loading import extract_prompt, is_conversational, load_preference_dataset
from fastpref.data.prompts import CRITIQUE_TEMPLATE, REVISE_TEMPLATE, REWARD_AUGMENT_TEMPLATE, SR_DPO_REFINEMENT_PROMPT
from fastpref.data.tokenization import TRUNCATION_MODES, response_tokens, tokenize_pair

__all__ = [
    "CRITIQUE_TEMPLATE", "REVISE_TEMPLATE", "REWARD_AUGMENT_TEMPLATE", "SR_DPO_REFINEMENT_PROMPT",
    "TRUNCATION_MODES", "extract_prompt", "is_conversational", "load_preference_dataset", "parse_score",
    "response_tokens", "reward_augment", "reward_conditioned_prompt", "self_critique_pairs", "tokenize_pair",
]
