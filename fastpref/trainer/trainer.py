"""``PreferenceTrainer``: a thin ``transformers.Trainer`` for the DPO family on fastpref's fused ops.

One step: the policy's per-sequence log-probs of the batch's chosen and rejected sequences (padded, packed, or
tree-packed with each prompt once: ``PreferenceConfig.stream_layout``, :mod:`fastpref.trainer.collator`; the fused
head inside the model's forward, :func:`fastpref.model.head.stream_logps`);
for Sr-DPO/Sr-IPO with ``refinement="prompt"`` the same for the refinement-prompt stream under
``torch.no_grad()`` (no activations kept), continuing the refinement prompt's keys/values computed once per
optimizer step (:mod:`fastpref.model.prefix_kv`); the reference's log-probs from the disk cache (computed once per
dataset, :mod:`fastpref.trainer.ref_cache`) or live (a given ``ref_model``, or the peft model with its adapters
disabled); then :func:`fastpref.preference_loss`.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import warnings

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, DynamicCache, PreTrainedModel, Trainer, set_seed

from fastpref.logps.inputs import skip_value_checks
from fastpref.losses import bt_tau, odpo_offset, preference_loss
from fastpref.losses.table import LOSS_DEFINITIONS, refinement_delta
from fastpref.model.head import StreamLogps, stream_logps, unwrap_causal_lm
from fastpref.model.prefix_kv import PrefixKV, StepPrefixKV, compute_prefix_kv, frozen_forward
from fastpref.trainer.ref_store import RefLogpsStore, fingerprint, model_fingerprint
from fastpref.model.tree_logps import tree_forward_inputs
from fastpref.model.tree_stream import UnsafeAttentionError, attention_mask_for, build_tree_batch
from fastpref.trainer.collator import StepCollator, rows_from_batch, tree_from_batch
from fastpref.trainer.config import PreferenceConfig
from fastpref.trainer.metrics import MetricAccumulator, pair_metrics
from fastpref.trainer.ref_cache import attach_columns, cache_fingerprint, compute_reference_logps, load_or_compute, ref_columns
from fastpref.trainer.tokenize import tokenize_dataset

# Batch columns the trainer reads besides the token streams (kept by Trainer's column filter).
_PAIR_COLUMNS = ("score_chosen", "score_rejected", "tau", "offset", "ref_chosen_logps", "ref_rejected_logps",
                 "aug_ref_chosen_logps", "aug_ref_rejected_logps", "example_index")
_TOKEN_COLUMNS = ("prompt_input_ids", "chosen_input_ids", "rejected_input_ids", "aug_prompt_input_ids")


def _is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def _disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def resolve_tokenizer(model, processing_class):
    """The tokenizer: the given one, the one saved next to a model path, or fastpref's local tokenizer."""
    if processing_class is not None:
        return processing_class
    if isinstance(model, str) and os.path.isdir(model):
        with contextlib.suppress(OSError, ValueError):
            return AutoTokenizer.from_pretrained(model)
    from fastpref.data.tokenizer import build_tokenizer

    return build_tokenizer()


def align_special_tokens(model: PreTrainedModel, tokenizer) -> PreTrainedModel:
    """Give a model built from a config the tokenizer's bos/eos/pad ids (in its config and generation config)."""
    for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
        value = getattr(tokenizer, name)
        setattr(model.config, name, value)
        if getattr(model, "generation_config", None) is not None:
            setattr(model.generation_config, name, value)
    return model


def resolve_model(model, tokenizer, init_kwargs: dict | None, seed: int) -> PreTrainedModel:
    """A model object from a model, a built-in name (:data:`fastpref.data.tiny_models.MODEL_NAMES`) or a local path."""
    if not isinstance(model, str):
        return model
    from fastpref.data.tiny_models import MODEL_NAMES, build_model

    if model in MODEL_NAMES:
        set_seed(seed)
        return align_special_tokens(build_model(model, vocab_size=len(tokenizer)), tokenizer)
    if not os.path.isdir(model):
        raise ValueError(f"model {model!r} is neither a local model directory nor a built-in name "
                         f"({', '.join(MODEL_NAMES)}); this build loads no models from a hub")
    return AutoModelForCausalLM.from_pretrained(model, **(init_kwargs or {}))


class PreferenceTrainer(Trainer):
    """Preference optimization (every loss type of :func:`fastpref.preference_loss`) on a causal LM.

    Args (as TRL's ``DPOTrainer``):
        model: a ``transformers`` causal LM, a local model directory, or a built-in tiny name.
        ref_model: an explicit frozen reference (model or path). Default: the initial policy — its log-probs are
            precomputed and cached — or, with ``peft_config`` / a peft model, the same model with adapters disabled.
        args: :class:`PreferenceConfig`.
        data_collator: default :class:`fastpref.trainer.collator.StepCollator` in ``args.stream_layout``.
        train_dataset / eval_dataset: TRL formats (``prompt``/``chosen``/``rejected``, standard or conversational),
            optional ``score_chosen``, ``score_rejected``, ``tau``, ``offset``, ``ref_chosen_logps``,
            ``ref_rejected_logps`` columns; or already tokenized (``chosen_input_ids`` …).
        processing_class: the tokenizer (default: saved with the model path, else fastpref's local one).
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model``.
    """

    # compute_loss returns the micro-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        args = PreferenceConfig(output_dir="fastpref_output") if args is None else args
        if not isinstance(args, PreferenceConfig):
            raise TypeError(f"args must be a fastpref.PreferenceConfig, got {type(args).__name__}")
        for name in args.loss_type:
            if name not in LOSS_DEFINITIONS:
                raise ValueError(f"unknown loss_type {name!r}; expected one of {', '.join(LOSS_DEFINITIONS)}")
        tokenizer = resolve_tokenizer(model, processing_class)
        if tokenizer.pad_token_id is None:
            raise ValueError("processing_class has no pad token: set tokenizer.pad_token")
        model = resolve_model(model, tokenizer, _init_kwargs(args), args.seed)
        _check_vocabulary(model, tokenizer)
        if peft_config is not None:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        if isinstance(ref_model, str):
            ref_model = resolve_model(ref_model, tokenizer, _init_kwargs(args), args.seed)
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model must be a separate model (or None to use the initial policy)")
        if args.disable_dropout:
            _disable_dropout(model)
            if ref_model is not None:
                _disable_dropout(ref_model)

        self._needs_reference = any(not LOSS_DEFINITIONS[name].reference_free for name in args.loss_type)
        self._streams = ("", "aug_") if args.uses_augmented_stream else ("",)
        if ref_model is None and self._needs_reference and not args.precompute_ref_log_probs \
                and not _is_peft_model(model):
            # Full fine-tuning with a live reference needs a frozen copy of the initial policy.
            ref_model = copy.deepcopy(model)
        if ref_model is not None:
            ref_model.eval().requires_grad_(False)
        self.ref_model = ref_model

        args.stream_layout = self.stream_layout = resolve_stream_layout(model, args)
        args.padding_free = self.stream_layout != "padded"
        train_dataset = self._tokenize(train_dataset, tokenizer, args)
        eval_dataset = self._tokenize(eval_dataset, tokenizer, args)
        self._aug_prefix = self._refinement_prefix(model, args, train_dataset, eval_dataset)
        if data_collator is None:
            data_collator = StepCollator(tokenizer.pad_token_id, with_augmented=args.uses_augmented_stream,
                                         layout=self.stream_layout, ld_alpha=args.ld_alpha,
                                         aug_prefix=self._aug_prefix)
        self._policy_prefix = StepPrefixKV(self._aug_prefix) if self._aug_prefix else None
        self._live_ref_prefix: PrefixKV | None = None
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": MetricAccumulator(), "eval": MetricAccumulator()}
        self.reference_passes = 0
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if self._needs_reference and args.precompute_ref_log_probs:
            self._reference_fp = self._reference_fingerprint()
            self.train_dataset = self.attach_reference(self.train_dataset, "train")
            if isinstance(self.eval_dataset, dict):
                self.eval_dataset = {k: self.attach_reference(v, f"eval {k}") for k, v in self.eval_dataset.items()}
            else:
                self.eval_dataset = self.attach_reference(self.eval_dataset, "eval")

    # ---- data ------------------------------------------------------------------------------------------------

    @staticmethod
    def _tokenize(dataset, tokenizer, args: PreferenceConfig):
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {name: tokenize_dataset(d, tokenizer, args) for name, d in dataset.items()}
        return tokenize_dataset(dataset, tokenizer, args)

    @staticmethod
    def _refinement_prefix(model, args: PreferenceConfig, *datasets) -> tuple[int, ...] | None:
        """The token prefix every augmented prompt shares (the refinement prompt p), if its keys/values can be
        cached for this model; else None (the augmented stream then runs whole)."""
        if not (args.uses_augmented_stream and args.cache_refinement_prefix):
            return None
        prompts = [ids for d in datasets if d is not None for part in (d.values() if isinstance(d, dict) else [d])
                   for ids in part["aug_prompt_input_ids"]]
        if not prompts:
            return None
        length = min(_common_prefix_length(prompts), min(len(p) for p in prompts) - 1)
        if length < 1:
            return None
        prefix = tuple(prompts[0][:length])
        try:
            compute_prefix_kv(unwrap_causal_lm(model), prefix[:1])
        except (ValueError, UnsafeAttentionError) as error:
            warnings.warn(f"refinement prefix not cached ({error}); the augmented stream runs whole", stacklevel=3)
            return None
        return prefix

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = [*_TOKEN_COLUMNS, *_PAIR_COLUMNS]

    # ---- reference -------------------------------------------------------------------------------------------

    def _reference_fingerprint(self) -> str:
        if self.ref_model is not None:
            return model_fingerprint(self.ref_model)
        model = self.accelerator.unwrap_model(self.model)
        if _is_peft_model(model):
            # The reference is the base model: hash the weights without the adapters.
            return _base_weights_fingerprint(model)
        return model_fingerprint(model)

    @contextlib.contextmanager
    def _reference_context(self):
        """Inside the block, ``self._reference_module()`` computes reference log-probs (no grad, eval mode)."""
        model = self.model if self.ref_model is None else self.ref_model
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        adapters = unwrapped.disable_adapter() if self.ref_model is None and _is_peft_model(unwrapped) \
            else contextlib.nullcontext()
        try:
            with torch.no_grad(), adapters:
                yield model
        finally:
            unwrapped.train(was_training)

    def _stream_logps(self, model, batch: dict, prefix: str, wpo_weights: bool = False,
                      cached: PrefixKV | None = None) -> StreamLogps:
        """Log-probs of stream ``prefix`` of a batch; ``cached``: the refinement prefix's keys/values, which the
        augmented stream continues (then the pass runs in eval + inference mode and returns plain tensors)."""
        input_ids = batch[f"{prefix}input_ids"]
        kwargs = dict(position_ids=batch.get(f"{prefix}position_ids"),
                      attention_mask=batch.get(f"{prefix}attention_mask"),
                      token_weights=batch.get(f"{prefix}kept_token_weights"), wpo_weights=wpo_weights)
        # Token ids come from the tokenizer, checked against the vocabulary at construction: no per-call value
        # checks (each would be a host sync on CUDA).
        with skip_value_checks(), contextlib.nullcontext() if cached is None else frozen_forward(model):
            if self.stream_layout == "tree":  # the 4D tree mask, built on the device; named errors if unsafe
                kwargs["attention_mask"], cache = tree_forward_inputs(
                    unwrap_causal_lm(model), tree_from_batch(batch, prefix), prefix=cached)
            elif cached is not None:
                cache = DynamicCache(ddp_cache_data=tuple((k.expand(input_ids.shape[0], -1, -1, -1),
                                                           v.expand(input_ids.shape[0], -1, -1, -1))
                                                          for k, v in cached.key_values))
            else:
                cache = None
            out = stream_logps(model, input_ids, rows_from_batch(batch, prefix), past_key_values=cache, **kwargs)
        if cached is None:
            return out
        return StreamLogps(*(None if t is None else t.clone() for t in out))

    def _prefix_kv(self, model, reference: bool) -> PrefixKV | None:
        """Keys/values of the refinement prefix: the policy's once per optimizer step, the reference's once."""
        if self._aug_prefix is None:
            return None
        unwrapped = self.accelerator.unwrap_model(model)
        if not reference:
            return self._policy_prefix.get(unwrapped, self.state.global_step)
        if self._live_ref_prefix is None:
            self._live_ref_prefix = compute_prefix_kv(unwrapped, self._aug_prefix)
        return self._live_ref_prefix

    def attach_reference(self, dataset, name: str):
        """``dataset`` with reference log-prob columns for every stream the loss needs, from the cache or from
        one reference pass (counted in ``self.reference_passes``). Columns the dataset already has are kept."""
        if dataset is None:
            return None
        if not hasattr(dataset, "__len__"):
            raise ValueError(f"precompute_ref_log_probs needs a map-style {name} dataset (an IterableDataset has no "
                             "fixed rows to cache); set precompute_ref_log_probs=False or materialize it")
        streams = tuple(p for p in self._streams
                        if not set(ref_columns((p,))) <= set(dataset.column_names))
        if not streams:
            return dataset
        if self.state.global_step > 0 and self.ref_model is None and not _is_peft_model(
                self.accelerator.unwrap_model(self.model)):
            raise ValueError(f"cannot compute reference log-probs for the {name} dataset after training started: "
                             "the reference (the initial policy) is gone; pass it at initialization or give ref_model")
        store = RefLogpsStore(self.args.ref_cache_dir, on_mismatch=self.args.ref_cache_on_mismatch)
        batch_size = self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size
        for stream in streams:
            fp, parts = cache_fingerprint(self._reference_fp, dataset, stream, self.args.ld_alpha)

            def compute(stream=stream, dataset=dataset) -> dict[str, torch.Tensor]:
                self.reference_passes += 1
                with self._reference_context() as model:
                    cached = self._prefix_kv(model, reference=True) if stream else None
                    return compute_reference_logps(
                        dataset, self.data_collator, batch_size, self.accelerator,
                        lambda batch, prefix: self._stream_logps(model, batch, prefix, cached=cached).logps,
                        (stream,),
                        desc=f"Reference log-probs ({name}{', refinement prompt' if stream else ''})")

            cache_name = name.replace(" ", "_") + ("-aug" if stream else "")
            dataset = attach_columns(dataset, load_or_compute(store, fp, parts, cache_name, compute, self.accelerator))
        return dataset

    def _reference_logps(self, inputs: dict, prefix: str) -> tuple[torch.Tensor, torch.Tensor] | None:
        if not self._needs_reference:
            return None
        chosen_key, rejected_key = ref_columns((prefix,))
        if chosen_key in inputs:
            return inputs[chosen_key], inputs[rejected_key]
        with self._reference_context() as model:
            cached = self._prefix_kv(model, reference=True) if prefix else None
            logps = self._stream_logps(model, inputs, prefix, cached=cached).logps
        pairs = logps.numel() // 2
        return logps[:pairs], logps[pairs:]

    # ---- loss ------------------------------------------------------------------------------------------------

    def _pair_extras(self, inputs: dict) -> dict[str, torch.Tensor]:
        """``tau`` and ``offset`` for the loss: dataset columns, else derived from the score columns."""
        extras = {}
        needs = {req for name in self.args.loss_type for req in LOSS_DEFINITIONS[name].requires}
        has_scores = "score_chosen" in inputs and "score_rejected" in inputs
        if "tau" in inputs:
            extras["tau"] = inputs["tau"]
        elif "tau" in needs:
            if not has_scores:
                raise ValueError("loss_type 'rdpo' needs a 'tau' column or 'score_chosen'/'score_rejected' columns")
            extras["tau"] = bt_tau(inputs["score_chosen"], inputs["score_rejected"],
                                   temperature=self.args.score_temperature)
        if "offset" in inputs:
            extras["offset"] = inputs["offset"]
        elif "offset" in needs:
            if not has_scores:
                raise ValueError("loss_type 'odpo' needs an 'offset' column or 'score_chosen'/'score_rejected' "
                                 "columns")
            extras["offset"] = odpo_offset(inputs["score_chosen"], inputs["score_rejected"],
                                           alpha=self.args.odpo_alpha)
        return extras

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: PreferenceConfig = self.args
        mode = "train" if model.training else "eval"
        policy = self._stream_logps(model, inputs, "", wpo_weights=args.use_weighting)
        pairs = policy.logps.numel() // 2
        chosen, rejected = policy.logps[:pairs], policy.logps[pairs:]
        chosen_counts, rejected_counts = policy.counts[:pairs], policy.counts[pairs:]
        reference = self._reference_logps(inputs, "")
        ref_chosen, ref_rejected = reference if reference is not None else (None, None)

        refine = {}
        if args.uses_augmented_stream:
            with torch.no_grad():  # the augmented pass only feeds Δ, which carries no gradient
                aug = self._stream_logps(model, inputs, "aug_", cached=self._prefix_kv(model, reference=False)).logps
            aug_ref = self._reference_logps(inputs, "aug_")
            refine = {"aug_chosen_logps": aug[:pairs], "aug_rejected_logps": aug[pairs:],
                      "aug_ref_chosen_logps": aug_ref[0], "aug_ref_rejected_logps": aug_ref[1]}

        weights = None
        if args.use_weighting:  # WPO: w_i = exp(mean log-weight of y_w) · exp(mean log-weight of y_l)
            weights = torch.exp(policy.wpo_log_weights[:pairs] + policy.wpo_log_weights[pairs:])
        out = preference_loss(
            chosen, rejected, ref_chosen, ref_rejected, loss_type=list(args.loss_type), beta=args.beta,
            loss_weights=args.loss_weights, label_smoothing=args.label_smoothing, chosen_counts=chosen_counts,
            rejected_counts=rejected_counts, refine_lambda=args.refine_lambda, weights=weights,
            simpo_gamma=args.simpo_gamma, discopop_tau=args.discopop_tau, f_divergence_type=args.f_divergence_type,
            f_alpha_divergence_coef=args.f_alpha_divergence_coef, refinement=args.refinement, **refine,
            **self._pair_extras(inputs))
        delta = None
        if args.uses_refinement:  # refinement="naive": Δ is the plain implicit reward margin (stop-gradient)
            delta = out.margins if not refine else refinement_delta(
                args.beta, refine["aug_chosen_logps"], refine["aug_rejected_logps"], refine["aug_ref_chosen_logps"],
                refine["aug_ref_rejected_logps"])
        self._metrics[mode].update(pair_metrics(out, chosen, rejected, delta, args.refine_lambda))
        return (out.loss, out) if return_outputs else out.loss

    # ---- logging and evaluation ------------------------------------------------------------------------------

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode].compute(reduce_sum=lambda t: self.accelerator.reduce(t, "sum"))
        if mode == "eval":
            metrics = {f"eval_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As ``Trainer.evaluate``; a dataset passed here is tokenized and given reference log-probs first."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._tokenize(eval_dataset, self.processing_class, self.args)
            if self._needs_reference and self.args.precompute_ref_log_probs:
                if isinstance(eval_dataset, dict):
                    eval_dataset = {k: self.attach_reference(v, f"eval {k}") for k, v in eval_dataset.items()}
                else:
                    eval_dataset = self.attach_reference(eval_dataset, "eval")
        return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                metric_key_prefix=metric_key_prefix)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def resolve_stream_layout(model: torch.nn.Module, args: PreferenceConfig) -> str:
    """``args.stream_layout`` with "auto" resolved for ``model`` (see :class:`PreferenceConfig`'s module docstring).

    "tree" with an attention implementation that cannot express the tree mask raises the tree stream's named
    error (:class:`fastpref.model.tree_stream.FlashAttentionTreeError` for flash attention, else
    :class:`fastpref.model.tree_stream.UnsafeAttentionError`).
    """
    causal_lm = unwrap_causal_lm(model)
    attention = getattr(causal_lm.config, "_attn_implementation", None) or ""
    layout = args.stream_layout
    if layout == "auto":
        if args.padding_free is False:
            layout = "padded"
        elif attention == "flex_attention" and args.device.type == "cuda":
            layout = "tree"
        elif args.padding_free or attention.startswith("flash_attention"):
            layout = "packed"
        else:
            layout = "padded"
    if layout == "tree":  # the mask of a one-pair tree: raises now if this attention cannot express a tree
        attention_mask_for(causal_lm, build_tree_batch([[0]], [[0]], [[0]]))
    return layout


def _check_vocabulary(model: torch.nn.Module, tokenizer) -> None:
    """Every token id the tokenizer can emit must index the model's output vocabulary (the log-prob op then needs
    no per-step label check)."""
    head = unwrap_causal_lm(model).get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # out_features survives ZeRO-3 sharding
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's output vocabulary has {vocab} "
                         "rows: call model.resize_token_embeddings(len(tokenizer)) first")


def _common_prefix_length(sequences: list[list[int]]) -> int:
    first, length = sequences[0], min(len(s) for s in sequences)
    for position in range(length):
        if any(s[position] != first[position] for s in sequences):
            return position
    return length


def _base_weights_fingerprint(peft_model) -> str:
    """Fingerprint of a peft model's base weights and config, without the adapters' parameters."""
    adapter_markers = tuple(f".{name}." for name in peft_model.peft_config)
    base = peft_model.get_base_model()
    config = json.loads(base.config.to_json_string(use_diff=False))
    for volatile in ("_name_or_path", "transformers_version"):
        config.pop(volatile, None)
    weights = {key: value for key, value in base.state_dict().items()
               if not any(marker in key for marker in adapter_markers)}
    return fingerprint(config=json.dumps(config, sort_keys=True), weights=weights)


def _init_kwargs(args: PreferenceConfig) -> dict | None:
    if isinstance(args.model_init_kwargs, str):
        return json.loads(args.model_init_kwargs)
    return args.model_init_kwargs
