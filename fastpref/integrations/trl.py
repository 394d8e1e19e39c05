"""A drop-in for TRL's ``DPOTrainer``: TRL's ``DPOConfig`` and datasets in, fastpref's step out.

``fastpref.integrations.trl.DPOTrainer`` takes exactly what ``trl.DPOTrainer`` takes (model, ref_model, a
``trl.DPOConfig``, datasets in TRL's formats, processing_class, peft_config, callbacks, optimizers, …) and trains
with :class:`fastpref.PreferenceTrainer`: the fused head (no [tokens × vocabulary] logits), the fused loss op,
padded / packed / tree streams and the on-disk reference cache. Every ``DPOConfig`` field is carried over with the
user's value (``DPOConfig`` and :class:`fastpref.PreferenceConfig` share names and semantics); fields fastpref
does not implement are refused when set to anything but their default, never ignored (``pad_to_multiple_of`` pads
fastpref's padded layout and is refused with a padding-free one). fastpref's own fields
(``loss_type="sr_dpo"``, ``refine_lambda``, ``stream_layout``, ``ref_cache_dir``, …) come as keyword arguments.

``patch_trl()`` makes ``trl.DPOTrainer`` (and ``trl.trainer.dpo_trainer.DPOTrainer``) this class, so an unchanged
TRL script runs on fastpref; it returns a function that undoes the patch.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

from transformers import TrainingArguments

from fastpref.trainer.config import PreferenceConfig
from fastpref.trainer.trainer import PreferenceTrainer

# DPOConfig fields fastpref does not implement (yet), with the value that means "off": anything else is refused.
# A field that PreferenceConfig gains is carried over instead.
UNSUPPORTED_DPO_FIELDS = {
    "sync_ref_model": False,  # TR-DPO
    "ref_model_mixup_alpha": 0.6,
    "ref_model_sync_steps": 512,
    "activation_offloading": False,
    "router_aux_loss_coef": None,
}

def _field_names(cls) -> set[str]:
    return {f.name for f in dataclasses.fields(cls) if f.init}


def preference_config_from(args, **fastpref_fields) -> PreferenceConfig:
    """The :class:`PreferenceConfig` that means what the ``trl.DPOConfig`` `args` means, plus `fastpref_fields`.

    Raises ``ValueError`` naming every ``DPOConfig`` field set to a value fastpref cannot honour, and ``TypeError``
    for a keyword that is not a ``PreferenceConfig`` field."""
    ours = _field_names(PreferenceConfig)
    unknown = sorted(set(fastpref_fields) - ours)
    if unknown:
        raise TypeError(f"not PreferenceConfig fields: {', '.join(unknown)}")
    theirs = _field_names(type(args))
    refused = [f"{name}={getattr(args, name)!r}" for name, off in UNSUPPORTED_DPO_FIELDS.items()
               if name in theirs and name not in ours and getattr(args, name) != off]
    if refused:
        raise ValueError(f"fastpref does not implement these DPOConfig settings: {', '.join(refused)}; "
                         "leave them at their defaults or use trl.DPOTrainer")
    carried = {name: getattr(args, name) for name in theirs & ours}
    return PreferenceConfig(**{**carried, **fastpref_fields})


class DPOTrainer(PreferenceTrainer):
    """``trl.DPOTrainer``'s signature on :class:`fastpref.PreferenceTrainer` (see the module docstring).

    ``args`` may be a ``trl.DPOConfig`` (converted by :func:`preference_config_from`), a
    :class:`fastpref.PreferenceConfig`, or None. ``quantization_config`` joins ``model_init_kwargs`` for a model given
    by path, as in TRL. ``compute_metrics`` is refused: the fused head builds no logits to hand it."""

    def __init__(self, model, ref_model=None, args=None, data_collator=None, train_dataset=None, eval_dataset=None,
                 processing_class=None, compute_metrics=None, callbacks=None, optimizers=(None, None),
                 quantization_config=None, peft_config=None, **fastpref_fields):
        if compute_metrics is not None:
            raise ValueError("compute_metrics needs logits, which fastpref's fused head never builds; log metrics "
                             "from the trainer's `rewards/*` and `logps/*` keys instead")
        args = self._config(args, model, quantization_config, fastpref_fields)
        super().__init__(model, ref_model=ref_model, args=args, data_collator=data_collator,
                         train_dataset=train_dataset, eval_dataset=eval_dataset, processing_class=processing_class,
                         peft_config=peft_config, callbacks=callbacks, optimizers=optimizers)

    @staticmethod
    def _config(args, model, quantization_config, fastpref_fields) -> PreferenceConfig:
        if args is None:
            name = model if isinstance(model, str) else getattr(getattr(model, "config", None), "_name_or_path", "")
            args = PreferenceConfig(output_dir=f"{str(name).rstrip('/').split('/')[-1] or 'model'}-DPO",
                                    **fastpref_fields)
        elif isinstance(args, PreferenceConfig):
            args = dataclasses.replace(args, **fastpref_fields) if fastpref_fields else args
        elif isinstance(args, TrainingArguments):
            args = preference_config_from(args, **fastpref_fields)
        else:
            raise TypeError(f"args must be a trl.DPOConfig or a fastpref.PreferenceConfig, got {type(args).__name__}")
        if quantization_config is not None:
            kwargs = dict(args.model_init_kwargs or {})
            kwargs["quantization_config"] = quantization_config
            args.model_init_kwargs = kwargs
        return args


def patch_trl() -> Callable[[], None]:
    """Make ``trl.DPOTrainer`` fastpref's :class:`DPOTrainer`; returns the function that restores TRL's."""
    import trl
    import trl.trainer.dpo_trainer as dpo_module

    originals = (trl.DPOTrainer, dpo_module.DPOTrainer)
    trl.DPOTrainer = dpo_module.DPOTrainer = DPOTrainer

    def undo() -> None:
        trl.DPOTrainer, dpo_module.DPOTrainer = originals

    return undo
