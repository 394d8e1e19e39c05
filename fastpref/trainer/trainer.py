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
import functools
import os
import warnings

import torch
from transformers import DynamicCache, Trainer, set_seed
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR

from fastpref.logps.inputs import skip_value_checks
from fastpref.losses import listwise_loss, odpo_offset, preference_loss, tau_from_scores
from fastpref.losses.listwise import LISTWISE_LOSS_TYPES
from fastpref.losses.table import LOSS_DEFINITIONS, refinement_delta
from fastpref.model.head import StreamLogps, stream_logps, unwrap_causal_lm
from fastpref.model.pair_attention import pairwise_sdpa
from fastpref.model.prefix_kv import (PrefixKV, StepPrefixKV, compute_prefix_kv, frozen_forward,
                                      gathered_parameters)
from fastpref.model.tree_logps import tree_forward_inputs
from fastpref.trainer.checkpoints import last_complete_checkpoint, save_fastpref_state, saved_num_tokens
from fastpref.trainer.collator import StepCollator, rows_from_batch, tree_from_batch
from fastpref.trainer.columns import BATCH_COLUMNS
from fastpref.trainer.config import PreferenceConfig
from fastpref.trainer.curves import write_training_record
from fastpref.trainer.listwise import (LISTWISE_BATCH_COLUMNS, LISTWISE_REF_COLUMN, ListwiseCollator, is_listwise,
                                       scatter_rows, tokenize_listwise_dataset)
from fastpref.trainer.metrics import MetricAccumulator, listwise_metrics, pair_metrics, token_metrics
from fastpref.trainer.models import (BASE_MODEL_DIR, add_reference_adapter, check_vocabulary, disable_dropout,
                                     is_peft_model, pad_token_id, reference_adapter, reference_fingerprint,
                                     resolve_model, resolve_stream_layout, resolve_tokenizer, save_unnamed_base)
from fastpref.trainer.ref_cache import (attach_columns, cache_fingerprint, collated_rows_fingerprint,
                                        compute_reference_logps, load_or_compute, ref_columns)
from fastpref.trainer.ref_store import RefLogpsStore
from fastpref.trainer.refinement import check_refinement_prefix, refinement_prefix
from fastpref.trainer.tokenize import tokenize_dataset


class PreferenceTrainer(Trainer):
    """Preference optimization (every loss type of :func:`fastpref.preference_loss`) on a causal LM.

    Args (as TRL's ``DPOTrainer``):
        model: a ``transformers`` causal LM, a local model directory, or a built-in tiny name.
        ref_model: an explicit reference (model or path), used as given (never frozen or modified in place).
            Default: the initial policy — its log-probs are precomputed and cached — or, with ``peft_config`` / a
            peft model, the same model with adapters disabled.
        args: :class:`PreferenceConfig`.
        data_collator: default :class:`fastpref.trainer.collator.StepCollator` in ``args.stream_layout``.
        train_dataset / eval_dataset: TRL formats (``prompt``/``chosen``/``rejected``, standard or conversational),
            optional ``score_chosen``, ``score_rejected``, ``tau``, ``offset``, ``weight`` (per-pair loss weight),
            ``ref_chosen_logps``, ``ref_rejected_logps`` columns; or already tokenized (``chosen_input_ids`` …).
            Any other column is refused (:mod:`fastpref.trainer.columns`), never silently dropped.
        processing_class: the tokenizer (default: saved with the model path, else fastpref's local one).
        peft_config: a ``peft`` config; the model is wrapped with ``get_peft_model`` after ``set_seed(args.seed)``.
    """

    # compute_loss returns the micro-batch mean; Trainer divides it by the accumulation steps.
    loss_is_scaled_for_ga = False

    def __init__(self, model, ref_model=None, args: PreferenceConfig | None = None, data_collator=None,
                 train_dataset=None, eval_dataset=None, processing_class=None, peft_config=None, **kwargs):
        args = _checked_args(args)
        tokenizer = resolve_tokenizer(model, processing_class, args.trust_remote_code)
        pad_id = pad_token_id(tokenizer, args)
        set_seed(args.seed)  # as TRL: before the model and its peft adapters are built (their init draws from the RNG)
        model = _policy_model(model, tokenizer, args, peft_config)
        self._policy_adapter = None  # the trained adapter of a policy that came with its own (see models.py)
        if peft_config is None and ref_model is None and is_peft_model(model):
            self._policy_adapter = add_reference_adapter(model)
        self._needs_reference = args.is_listwise or any(
            not LOSS_DEFINITIONS[name].reference_free for name in args.loss_type)
        self.ref_model = self._reference_model(model, ref_model, tokenizer, args)
        self._streams = ("", "aug_") if args.uses_augmented_stream else ("",)
        layout = resolve_stream_layout(model, args)
        if args.is_listwise and layout == "packed":  # auto picked packed: listwise data has no packed collator
            layout = "padded"
        args.stream_layout = self.stream_layout = layout
        args.padding_free = self.stream_layout != "padded"
        if args.pad_to_multiple_of is not None and args.padding_free:
            raise ValueError(f"pad_to_multiple_of={args.pad_to_multiple_of} pads the padded layout; the resolved "
                             f"stream_layout is {self.stream_layout!r} (no padding): set stream_layout='padded'")
        train_dataset = self._tokenize(train_dataset, tokenizer, args, "train")
        eval_dataset = self._tokenize(eval_dataset, tokenizer, args, "eval")
        self._aug_prefix = refinement_prefix(model, tokenizer, args, train_dataset, eval_dataset)
        if data_collator is None and args.is_listwise:
            data_collator = ListwiseCollator(pad_id, layout=self.stream_layout)
        if data_collator is None:
            data_collator = StepCollator(pad_id, with_augmented=args.uses_augmented_stream,
                                         pad_to_multiple_of=args.pad_to_multiple_of,
                                         layout=self.stream_layout, ld_alpha=args.ld_alpha,
                                         aug_prefix=self._aug_prefix)
        self._policy_prefix = StepPrefixKV(self._aug_prefix) if self._aug_prefix else None
        self._live_ref_prefix: PrefixKV | None = None
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, **kwargs)
        self.model_accepts_loss_kwargs = False
        self._metrics = {"train": MetricAccumulator(), "eval": MetricAccumulator()}
        self._eval_prefix = "eval"  # the metric_key_prefix of the evaluate() running now (one per eval dataset)
        self.reference_passes = 0
        self._base_saved = False  # see _save
        self._train_tokens = torch.zeros((), dtype=torch.int64, device=self.args.device)  # this process's, so far
        self._counts_tokens = False  # whether the batches report num_tokens (StepCollator's do)
        if self.ref_model is not None:
            self.ref_model.to(self.args.device)
        if self._needs_reference and args.precompute_ref_log_probs:
            self._reference_fp = reference_fingerprint(self.accelerator.unwrap_model(self.model), self.ref_model)
            self.train_dataset = self._attach_all(self.train_dataset, "train")
            self.eval_dataset = self._attach_all(self.eval_dataset, "eval")

    def _reference_model(self, model, ref_model, tokenizer, args: PreferenceConfig):
        """The live reference: ``ref_model`` as given (never modified: the reference pass runs it under no_grad in
        eval mode), a frozen copy of the initial policy when one is needed, or None."""
        if isinstance(ref_model, str):
            ref_model = resolve_model(ref_model, tokenizer, args)
        if ref_model is not None and ref_model is model:
            raise ValueError("ref_model must be a separate model (or None to use the initial policy)")
        if ref_model is None and self._needs_reference and not args.precompute_ref_log_probs \
                and not is_peft_model(model):
            # Full fine-tuning with a live reference needs a copy of the initial policy (ours, so frozen here).
            ref_model = copy.deepcopy(model).eval().requires_grad_(False)
        return ref_model

    # ---- data ------------------------------------------------------------------------------------------------

    @staticmethod
    def _tokenize(dataset, tokenizer, args: PreferenceConfig, name: str):
        if dataset is None:
            return None
        if isinstance(dataset, dict):
            return {key: PreferenceTrainer._tokenize(d, tokenizer, args, f"{name} {key}") for key, d in dataset.items()}
        if is_listwise(dataset.column_names) != args.is_listwise:
            raise ValueError(f"the {name} dataset is {'' if args.is_listwise else 'not '}pairwise but loss_type is "
                             f"{args.loss_type}: ranked data (prompt, completions, scores) needs a listwise type "
                             f"({', '.join(LISTWISE_LOSS_TYPES)}), preference pairs a pairwise one")
        if args.is_listwise:
            return tokenize_listwise_dataset(dataset, tokenizer, args, name)
        return tokenize_dataset(dataset, tokenizer, args, name)

    def _set_signature_columns_if_needed(self):
        if self._signature_columns is None:
            self._signature_columns = list(LISTWISE_BATCH_COLUMNS if self.args.is_listwise else BATCH_COLUMNS)

    # ---- reference -------------------------------------------------------------------------------------------

    @contextlib.contextmanager
    def _reference_context(self):
        """The reference module, yielded for a no-grad, eval-mode pass (its training flag restored on exit). A peft
        policy without its own reference yields itself: with its adapters disabled when the trainer made them from
        ``peft_config``, with the frozen copy of its initial adapter when it came with adapters of its own."""
        model = self.model if self.ref_model is None else self.ref_model
        unwrapped = self.accelerator.unwrap_model(model)
        was_training = unwrapped.training
        unwrapped.eval()
        adapters = contextlib.nullcontext()
        if self.ref_model is None and self._policy_adapter is not None:
            adapters = reference_adapter(unwrapped, self._policy_adapter)
        elif self.ref_model is None and is_peft_model(unwrapped):
            adapters = unwrapped.disable_adapter()
        try:
            with torch.no_grad(), adapters:
                yield model
        finally:
            unwrapped.train(was_training)

    def _stream_logps(self, model, batch: dict, prefix: str, wpo_weights: bool = False,
                      cached: PrefixKV | None = None, token_stats: bool = False) -> StreamLogps:
        """Log-probs of stream ``prefix`` of a batch; ``cached``: the refinement prefix's keys/values, which the
        augmented stream continues (then the pass runs in eval + inference mode and returns plain tensors)."""
        kwargs = dict(position_ids=batch.get(f"{prefix}position_ids"),
                      token_weights=batch.get(f"{prefix}kept_token_weights"), wpo_weights=wpo_weights,
                      token_stats=token_stats)
        # Token ids come from the tokenizer, checked against the vocabulary at construction: no per-call value
        # checks (each would be a host sync on CUDA).
        with skip_value_checks(), contextlib.nullcontext() if cached is None else frozen_forward(model):
            attention_mask, cache = self._attention_inputs(model, batch, prefix, cached)
            pairs = batch.get(f"{prefix}tree_pair_lengths", ()) if self.stream_layout == "tree" else ()
            offset = batch.get(f"{prefix}tree_position_offset", 0)
            with pairwise_sdpa(unwrap_causal_lm(model), attention_mask, pairs, offset):
                out = stream_logps(model, batch[f"{prefix}input_ids"], rows_from_batch(batch, prefix),
                                   attention_mask=attention_mask, past_key_values=cache, **kwargs)
        if cached is None:
            return out
        return StreamLogps(*(None if t is None else t.clone() for t in out))

    def _attention_inputs(self, model, batch: dict, prefix: str, cached: PrefixKV | None):
        """The attention mask and the KV cache (holding ``cached``, or None) of stream ``prefix`` of a batch."""
        if self.stream_layout == "tree":  # the 4D tree mask, built on the device; named errors if unsafe
            return tree_forward_inputs(unwrap_causal_lm(model), tree_from_batch(batch, prefix), prefix=cached)
        attention_mask = batch.get(f"{prefix}attention_mask")
        if cached is None:
            return attention_mask, None
        rows = batch[f"{prefix}input_ids"].shape[0]
        return attention_mask, DynamicCache(ddp_cache_data=tuple(
            (k.expand(rows, -1, -1, -1), v.expand(rows, -1, -1, -1)) for k, v in cached.key_values))

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

    def _attach_all(self, dataset, name: str):
        """:meth:`attach_reference` on a dataset or on each dataset of a dict."""
        if isinstance(dataset, dict):
            return {key: self.attach_reference(d, f"{name} {key}") for key, d in dataset.items()}
        return self.attach_reference(dataset, name)

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
        if self.state.global_step > 0 and self.ref_model is None and not is_peft_model(
                self.accelerator.unwrap_model(self.model)):
            raise ValueError(f"cannot compute reference log-probs for the {name} dataset after training started: "
                             "the reference (the initial policy) is gone; pass it at initialization or give ref_model")
        store = RefLogpsStore(self.args.ref_cache_dir, on_mismatch=self.args.ref_cache_on_mismatch)
        if self.args.is_listwise:
            return self._attach_listwise_reference(dataset, name, store)
        for stream in streams:
            fp, parts = cache_fingerprint(self._reference_fp, dataset, stream, self._token_weights_key(dataset, stream))
            compute = functools.partial(self._compute_reference, dataset, stream, name)
            cache_name = name.replace(" ", "_") + ("-aug" if stream else "")
            dataset = attach_columns(dataset, load_or_compute(store, fp, parts, cache_name, compute, self.accelerator))
        return dataset

    def _attach_listwise_reference(self, dataset, name: str, store: RefLogpsStore):
        if LISTWISE_REF_COLUMN in dataset.column_names:
            return dataset
        fp, parts = cache_fingerprint(self._reference_fp, dataset, "listwise", None)

        def compute():
            self.reference_passes += 1
            with self._reference_context() as model:
                return compute_reference_logps(
                    dataset, self.data_collator, self._reference_batch_size, self.accelerator,
                    lambda batch, prefix: scatter_rows(self._stream_logps(model, batch, "").logps,
                                                       batch["completions_mask"]),
                    ("",), desc=f"Reference log-probs ({name}, listwise)", columns=(LISTWISE_REF_COLUMN,))
        cache_name = name.replace(" ", "_") + "-listwise"
        return attach_columns(dataset, load_or_compute(store, fp, parts, cache_name, compute, self.accelerator))

    @property
    def _reference_batch_size(self) -> int:
        return self.args.precompute_ref_batch_size or self.args.per_device_train_batch_size

    def _token_weights_key(self, dataset, stream: str):
        """What fixes the per-token weights of ``stream``: fastpref's collator derives them from ``ld_alpha`` and
        the token ids; any other collator's are hashed as it produces them."""
        if type(self.data_collator) is StepCollator:
            return self.data_collator.ld_alpha
        return collated_rows_fingerprint(dataset, self.data_collator, stream, self._reference_batch_size)

    def _compute_reference(self, dataset, stream: str, name: str) -> dict[str, torch.Tensor]:
        self.reference_passes += 1
        # Under ZeRO-3 with zero3_init_flag the weights are partitioned before any engine hooks gather them.
        with self._reference_context() as model, gathered_parameters(self.accelerator.unwrap_model(model)):
            cached = self._prefix_kv(model, reference=True) if stream else None
            return compute_reference_logps(
                dataset, self.data_collator, self._reference_batch_size, self.accelerator,
                lambda batch, prefix: self._stream_logps(model, batch, prefix, cached=cached).logps, (stream,),
                desc=f"Reference log-probs ({name}{', refinement prompt' if stream else ''})")

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
            extras["tau"] = tau_from_scores(inputs["score_chosen"], inputs["score_rejected"], self.args.tau_mode,
                                            temperature=self.args.score_temperature,
                                            score_range=self.args.score_range)
        if "offset" in inputs:
            extras["offset"] = inputs["offset"]
        elif "offset" in needs:
            if not has_scores:
                raise ValueError("loss_type 'odpo' needs an 'offset' column or 'score_chosen'/'score_rejected' "
                                 "columns")
            extras["offset"] = odpo_offset(inputs["score_chosen"], inputs["score_rejected"],
                                           alpha=self.args.odpo_alpha)
        return extras

    def _pair_weights(self, inputs: dict, policy: StreamLogps) -> torch.Tensor | None:
        """The per-pair loss weights: the dataset's ``weight`` column times WPO's weights (``use_weighting``)."""
        weights = inputs.get("weight")
        if self.args.use_weighting:  # WPO: w_i = exp(mean log-weight of y_w) · exp(mean log-weight of y_l)
            pairs = policy.logps.numel() // 2
            wpo = torch.exp(policy.wpo_log_weights[:pairs] + policy.wpo_log_weights[pairs:])
            weights = wpo if weights is None else weights * wpo
        return weights

    def _refinement_inputs(self, model, inputs: dict) -> dict[str, torch.Tensor]:
        """The ``aug_*`` log-probs of Sr-DPO/Sr-IPO's refinement-prompt stream (policy and reference), or {}."""
        if not self.args.uses_augmented_stream:
            return {}
        with torch.no_grad():  # the augmented pass only feeds Δ, which carries no gradient
            aug = self._stream_logps(model, inputs, "aug_", cached=self._prefix_kv(model, reference=False)).logps
        aug_ref = self._reference_logps(inputs, "aug_")
        pairs = aug.numel() // 2
        return {"aug_chosen_logps": aug[:pairs], "aug_rejected_logps": aug[pairs:],
                "aug_ref_chosen_logps": aug_ref[0], "aug_ref_rejected_logps": aug_ref[1]}

    def _loss_settings(self) -> dict:
        args: PreferenceConfig = self.args
        return dict(loss_type=list(args.loss_type), beta=args.beta, loss_weights=args.loss_weights,
                    label_smoothing=args.label_smoothing, refine_lambda=args.refine_lambda,
                    simpo_gamma=args.simpo_gamma, discopop_tau=args.discopop_tau,
                    f_divergence_type=args.f_divergence_type, f_alpha_divergence_coef=args.f_alpha_divergence_coef,
                    refinement=args.refinement)

    def _listwise_loss(self, model, inputs, mode: str):
        """K responses per prompt: policy and reference log-probs [B, K_max] → :func:`fastpref.listwise_loss`."""
        mask = inputs["completions_mask"]
        policy = scatter_rows(self._stream_logps(model, inputs, "").logps, mask)
        reference = inputs.get(LISTWISE_REF_COLUMN)
        if reference is None:
            with self._reference_context() as ref_model:
                reference = scatter_rows(self._stream_logps(ref_model, inputs, "").logps, mask)
        out = listwise_loss(policy, reference, inputs["scores"], self.args.loss_type[0], beta=self.args.beta,
                            mask=mask)
        weight = self.args.loss_weights[0] if self.args.loss_weights else 1.0
        self._metrics[mode].update(listwise_metrics(out.rewards, inputs["scores"], mask))
        return weight * out.loss, out

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args: PreferenceConfig = self.args
        if args.is_listwise:
            loss, out = self._listwise_loss(model, inputs, "train" if model.training else "eval")
            return (loss, out) if return_outputs else loss
        mode = "train" if model.training else "eval"
        policy = self._stream_logps(model, inputs, "", wpo_weights=args.use_weighting, token_stats=True)
        pairs = policy.logps.numel() // 2
        chosen, rejected = policy.logps[:pairs], policy.logps[pairs:]
        reference = self._reference_logps(inputs, "")
        ref_chosen, ref_rejected = reference if reference is not None else (None, None)
        refine = self._refinement_inputs(model, inputs)
        out = preference_loss(chosen, rejected, ref_chosen, ref_rejected, chosen_counts=policy.counts[:pairs],
                              rejected_counts=policy.counts[pairs:], weights=self._pair_weights(inputs, policy),
                              **self._loss_settings(), **refine, **self._pair_extras(inputs))
        delta = None
        if args.uses_refinement:  # refinement="naive": Δ is the plain implicit reward margin (stop-gradient)
            delta = out.margins if not refine else refinement_delta(
                args.beta, refine["aug_chosen_logps"], refine["aug_rejected_logps"], refine["aug_ref_chosen_logps"],
                refine["aug_ref_rejected_logps"])
        self._metrics[mode].update(pair_metrics(out, chosen, rejected, delta, args.refine_lambda))
        self._metrics[mode].update_ratios(token_metrics(policy.token_stat_sums, policy.counts))
        if mode == "train" and "num_tokens" in inputs:  # a data_collator of the user's may not count them
            self._train_tokens = self._train_tokens + inputs["num_tokens"]
            self._counts_tokens = True
        return (out.loss, out) if return_outputs else out.loss

    # ---- training, logging and evaluation --------------------------------------------------------------------

    def train(self, resume_from_checkpoint=None, trial=None, **kwargs):
        """As ``Trainer.train``; ``resume_from_checkpoint=True`` skips (with a warning) torn checkpoints and resumes
        from the last complete one (:mod:`fastpref.trainer.checkpoints`), ``num_tokens`` continuing from the count
        the checkpoint saved. At the end, ``output_dir`` gets ``trainer_state.json`` and ``training_curves.png``
        (:mod:`fastpref.trainer.curves`)."""
        if resume_from_checkpoint is True:
            expects_optimizer = not (self.args.save_only_model or self.is_deepspeed_enabled or self.is_fsdp_enabled)
            resume_from_checkpoint = last_complete_checkpoint(self.args.output_dir,
                                                              expects_optimizer=expects_optimizer)
            if resume_from_checkpoint is None:
                raise ValueError(f"No valid checkpoint found in output directory ({self.args.output_dir})")
        if isinstance(resume_from_checkpoint, (str, os.PathLike)):  # process 0 holds the saved total, log sums
            saved = saved_num_tokens(resume_from_checkpoint) if self.is_world_process_zero() else 0
            self._train_tokens = torch.full_like(self._train_tokens, saved)
        output = super().train(resume_from_checkpoint=resume_from_checkpoint, trial=trial, **kwargs)
        if self.is_world_process_zero():
            write_training_record(self.state, self.args.output_dir)
        return output

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        mode = "train" if self.model.training else "eval"
        metrics = self._metrics[mode].compute(reduce_sum=lambda t: self.accelerator.reduce(t, "sum"))
        if metrics and self._counts_tokens:  # TRL's total of training tokens so far, beside each mode's metrics
            metrics["num_tokens"] = float(self.accelerator.reduce(self._train_tokens, "sum"))
        if mode == "eval":
            metrics = {f"{self._eval_prefix}_{key}": value for key, value in metrics.items()}
        logs.update(metrics)
        super().log(logs, start_time)

    def evaluate(self, eval_dataset=None, ignore_keys=None, metric_key_prefix: str = "eval"):
        """As ``Trainer.evaluate``; a dataset passed here is tokenized, checked against the cached refinement
        prefix and given reference log-probs first."""
        if eval_dataset is not None and not isinstance(eval_dataset, str):
            eval_dataset = self._tokenize(eval_dataset, self.processing_class, self.args, "eval")
            parts = eval_dataset.items() if isinstance(eval_dataset, dict) else [("", eval_dataset)]
            for key, part in parts:
                check_refinement_prefix(part, self._aug_prefix, f"eval {key}".strip())
            if self._needs_reference and self.args.precompute_ref_log_probs:
                eval_dataset = self._attach_all(eval_dataset, "eval")
        outer_prefix, self._eval_prefix = self._eval_prefix, metric_key_prefix
        try:
            return super().evaluate(eval_dataset=eval_dataset, ignore_keys=ignore_keys,
                                    metric_key_prefix=metric_key_prefix)
        finally:
            self._eval_prefix = outer_prefix

    def _save_checkpoint(self, model, trial) -> None:
        """As ``Trainer._save_checkpoint``, with the checkpoint's ``fastpref_state.json`` (the ``num_tokens`` so far)
        written first (every process saves a checkpoint together, so the total is summed over them here)."""
        num_tokens = int(self.accelerator.reduce(self._train_tokens, "sum"))
        if self.args.should_save:
            folder = os.path.join(self._get_output_dir(trial=trial),
                                  f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}")
            save_fastpref_state(folder, num_tokens=num_tokens)
        super()._save_checkpoint(model, trial)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        """As ``Trainer._save``; a peft policy built from a config (a built-in name) first gets its base saved once,
        to ``args.output_dir/base_model``, which every saved adapter then names as its base."""
        policy = self.accelerator.unwrap_model(self.model)
        if self.args.should_save and is_peft_model(policy) and not self._base_saved:
            self._base_saved = save_unnamed_base(policy, os.path.join(self.args.output_dir, BASE_MODEL_DIR))
        super()._save(output_dir, state_dict)

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None


def _checked_args(args: PreferenceConfig | None) -> PreferenceConfig:
    args = PreferenceConfig(output_dir="fastpref_output") if args is None else args
    if not isinstance(args, PreferenceConfig):
        raise TypeError(f"args must be a fastpref.PreferenceConfig, got {type(args).__name__}")
    for name in args.loss_type:
        if name not in LOSS_DEFINITIONS and name not in LISTWISE_LOSS_TYPES:
            raise ValueError(f"unknown loss_type {name!r}; expected one of {', '.join(LOSS_DEFINITIONS)}")
    if args.dataloader_pin_memory and args.device.type == "cpu":
        args.dataloader_pin_memory = False  # nothing to pin for: torch warns on every DataLoader
    return args


def _policy_model(model, tokenizer, args: PreferenceConfig, peft_config):
    """The policy: resolved, checked against the tokenizer, wrapped with peft adapters, dropout disabled."""
    model = resolve_model(model, tokenizer, args)
    check_vocabulary(model, tokenizer)
    if peft_config is not None:
        from peft import get_peft_model

        with warnings.catch_warnings():  # peft reads transformers' deprecated alias; nothing fastpref passes
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = get_peft_model(model, peft_config)
    if args.disable_dropout:
        disable_dropout(model)
    return model
