"""The thin trainer: :class:`PreferenceConfig` (TRL's ``DPOConfig`` names) and :class:`PreferenceTrainer`
(a ``transformers.Trainer`` running fastpref's fused head and preference loss)."""

from fastpref.trainer.config import PreferenceConfig
from fastpref.trainer.trainer import PreferenceTrainer

__all__ = ["PreferenceConfig", "PreferenceTrainer"]
