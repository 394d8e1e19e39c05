"""``PreferenceConfig``: ``transformers.TrainingArguments`` with TRL 1.16's ``DPOConfig`` names and defaults, plus
the Sr-DPO / rDPO / ODPO / SimPO fields and the reference-cache settings.

Differences from ``DPOConfig`` (documented, deliberate):
- ``stream_layout`` (not in TRL) picks how a micro-batch reaches the model: ``"padded"`` ([2B, T] rows),
  ``"packed"`` (one stream, position_ids restart per sequence, TRL's ``padding_free``) or ``"tree"`` (one stream,
  each pair as [x, y_w, y_l] with the prompt once and a 4D mask, :mod:`fastpref.model.tree_stream`; used by the policy
  pass, the Sr-DPO augmented pass after the cached refinement prefix, and the reference precompute). Default
  ``"auto"``: ``"tree"`` with attn_implementation flex_attention on CUDA (its ``BlockMask`` skips masked blocks),
  ``"packed"`` with flash_attention_2/3 (varlen kernels), ``"padded"`` otherwise. With sdpa/eager, transformers
  builds a dense [L, L] mask for a packed or tree stream, so its attention costs O((Σ lengths)²) instead of
  O(Σ length²): on CPU with sdpa the padded layout is usually the fastest although the tree feeds fewer tokens
  (the prompt once, no padding); ``benchmarks/bench_layouts_cpu.py`` measures it.
  "tree" needs an attention that honours a 4D mask: sdpa (boolean mask), eager (additive float mask) or
  flex_attention (``BlockMask``); flash_attention_2/3 raise ``FlashAttentionTreeError``, unknown ones
  ``UnsafeAttentionError`` (both ``ValueError``), at the trainer's construction.
- ``padding_free`` (TRL's name) defaults to None = follow ``stream_layout``. With ``stream_layout="auto"``,
  True picks a padding-free layout ("tree" where auto picks it, else "packed") and False picks "padded"; a value
  that contradicts an explicit ``stream_layout`` is a ValueError. The trainer sets it to the resolved layout's
  (``stream_layout != "padded"``).
- ``precompute_ref_log_probs`` defaults to True: the reference is frozen here, so its log-probs are computed
  once per dataset and cached on disk (``ref_cache_dir``) for every later epoch and run.
- ``activation_checkpointing`` and ``bf16`` keep transformers' defaults (False), not TRL's, so the CPU demo runs.
  ``gradient_checkpointing`` (TRL's name) is transformers' deprecated alias of ``activation_checkpointing`` and
  warns (``FutureWarning``); fastpref's CLI, tests and benchmarks use the new name.
- ``sync_ref_model`` (TR-DPO) and ``activation_offloading`` are not implemented (not fields).

Legacy TRL names that map cleanly onto current ones are accepted with a ``FutureWarning``:
``rpo_alpha=a`` → ``loss_type += ["sft"]``, ``loss_weights += [a]`` (RPO = DPO + a·NLL of the chosen);
``use_logits_to_keep`` → always on here (only completion rows reach the head); a string ``loss_type`` → a
one-element list.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass, field

from transformers import TrainingArguments

from fastpref.data.prompts import SR_DPO_REFINEMENT_PROMPT
from fastpref.data.tokenization import REFINEMENT_POSITIONS, TRUNCATION_MODES
from fastpref.losses.listwise import LISTWISE_LOSS_TYPES
from fastpref.losses.scores import TAU_MODES, check_score_range
from fastpref.losses.table import REFINED_LOSS_TYPES, REFINEMENTS
from fastpref.trainer.collator import STREAM_LAYOUTS as COLLATED_LAYOUTS
from fastpref.trainer.ref_store import MISMATCH_POLICIES

STREAM_LAYOUTS = ("auto", *COLLATED_LAYOUTS)


@dataclass
class PreferenceConfig(TrainingArguments):
    r"""Configuration of :class:`fastpref.PreferenceTrainer` (``DPOConfig`` names; see the module docstring).

    Model: ``model_init_kwargs`` (for a model given by path), ``trust_remote_code``, ``disable_dropout``.
    Data: ``max_length``, ``max_prompt_length``, ``truncation_mode``, ``stream_layout``, ``padding_free``,
    ``pad_to_multiple_of`` (padded streams only), ``pad_token`` (deprecated), ``dataset_num_proc``.
    Reference: ``precompute_ref_log_probs``, ``precompute_ref_batch_size``, ``ref_cache_dir``,
    ``ref_cache_on_mismatch``.
    Loss: ``loss_type`` (a name or a list; every type of :func:`fastpref.preference_loss`, or alone one listwise
    type of :func:`fastpref.listwise_loss`, ``plackett_luce`` / ``lambda_rank``, on ranked data), ``loss_weights``,
    ``beta``, ``label_smoothing``, ``ld_alpha`` (LD-DPO token weights), ``use_weighting`` (WPO pair weights),
    ``discopop_tau``, ``f_divergence_type``/``f_alpha_divergence_coef``, ``simpo_gamma``,
    ``refine_lambda``/``refinement``/``refinement_prompt``/``refinement_position`` (Sr-DPO/Sr-IPO),
    ``odpo_alpha`` (ODPO offsets from score columns), ``tau_mode``/``score_temperature``/``score_range`` (rDPO τ from score
    columns, :func:`fastpref.losses.tau_from_scores`, per batch at loss time: the reference log-probs and so the
    reference-cache fingerprint do not depend on them).
    """

    # Defaults overridden from TrainingArguments (as in TRL).
    learning_rate: float = field(default=1e-6, metadata={"help": "The initial learning rate for AdamW."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps (int) or ratio."})

    # Model.
    model_init_kwargs: dict | str | None = field(
        default=None, metadata={"help": "Keyword arguments for AutoModelForCausalLM.from_pretrained when the model "
                                        "is given as a path."})
    disable_dropout: bool = field(default=True, metadata={"help": "Disable dropout in the model."})
    trust_remote_code: bool = field(
        default=False, metadata={"help": "Allow custom code shipped with a model or tokenizer given by path "
                                         "(forwarded to their from_pretrained)."})

    # Data.
    dataset_num_proc: int | None = field(default=None, metadata={"help": "Processes for tokenizing the dataset."})
    pad_token: str | None = field(
        default=None, metadata={"help": "Deprecated (as in TRL): the padding token, instead of the tokenizer's pad "
                                        "token (or its eos token when it has none)."})
    pad_to_multiple_of: int | str | None = field(
        default="auto", metadata={"help": "Pad padded streams to a multiple of this length; 'auto': 128 on "
                                          "Neuron, else no extra padding. Padded layout only."})
    max_length: int | None = field(
        default=1024, metadata={"help": "Maximum length of prompt + response; None disables truncation."})
    max_prompt_length: int | None = field(
        default=None, metadata={"help": "Maximum prompt length before max_length applies; None: no limit."})
    truncation_mode: str = field(
        default=TRUNCATION_MODES[0], metadata={"help": "Truncation when a sequence exceeds max_length.",
                                         "choices": list(TRUNCATION_MODES)})
    keep_identical_pairs: bool = field(
        default=False, metadata={"help": "Train on pairs whose chosen and rejected tokens (and token weights, when "
                                         "given) are identical (dropped by default with a warning: they carry no "
                                         "preference signal)."})
    assistant_only: bool = field(
        default=False, metadata={"help": "Conversational data: weight 0 on the tokens of every non-assistant turn "
                                         "inside a response (multi-turn SDPO/DMPO: the agent turns only)."})
    stream_layout: str = field(
        default="auto", metadata={"help": "How a micro-batch reaches the model: 'padded', 'packed' (position_ids), "
                                          "'tree' (each pair as [x, y_w, y_l], prompt once, 4D mask) or 'auto' "
                                          "(tree with flex_attention on CUDA, packed with flash attention, else "
                                          "padded; see the module docstring).", "choices": list(STREAM_LAYOUTS)})
    padding_free: bool | None = field(
        default=None, metadata={"help": "TRL's name: True = a layout without padding (packed, or tree where auto "
                                        "picks it), False = padded; default: follow stream_layout."})

    # Reference log-probs.
    precompute_ref_log_probs: bool = field(
        default=True, metadata={"help": "Compute the reference log-probs once per dataset and cache them on disk."})
    precompute_ref_batch_size: int | None = field(
        default=None, metadata={"help": "Batch size of the reference pass; default: the per-device batch size."})
    ref_cache_dir: str = field(
        default="fastpref_ref_cache", metadata={"help": "Directory of the reference log-prob cache."})
    ref_cache_on_mismatch: str = field(
        default="recompute", metadata={"help": "When the dataset/model/settings changed since the cache was written: "
                                               "'recompute' it or 'raise'.", "choices": list(MISMATCH_POLICIES)})

    # Loss.
    loss_type: list[str] = field(
        default_factory=lambda: ["sigmoid"],
        metadata={"help": "Loss type(s) of fastpref.preference_loss (e.g. sigmoid, ipo, sr_dpo, rdpo, simpo); "
                          "several are combined with loss_weights."})
    loss_weights: list[float] | None = field(
        default=None, metadata={"help": "Weights of the loss types; default 1.0 each."})
    beta: float = field(default=0.1, metadata={"help": "β: deviation from the reference (τ for IPO)."})
    label_smoothing: float = field(
        default=0.0, metadata={"help": "ε of robust / exo_pair / cdpo / aot / simpo."})
    ld_alpha: float | None = field(
        default=None, metadata={"help": "LD-DPO α in [0, 1]: weight of response tokens beyond the shared length."})
    use_weighting: bool = field(default=False, metadata={"help": "WPO pair weights (policy-probability based)."})
    discopop_tau: float = field(default=0.05, metadata={"help": "τ of the DiscoPOP loss."})
    f_divergence_type: str = field(
        default="reverse_kl", metadata={"help": "f-divergence regularizer (f-DPO): reverse_kl, forward_kl, "
                                                "js_divergence or alpha_divergence."})
    f_alpha_divergence_coef: float = field(
        default=0.5, metadata={"help": "α of the alpha_divergence regularizer."})
    simpo_gamma: float = field(default=0.5, metadata={"help": "Target reward margin γ of SimPO."})
    odpo_alpha: float = field(
        default=1.0, metadata={"help": "ODPO: offset = α·log(score_chosen − score_rejected) from score columns."})
    score_temperature: float = field(
        default=1.0, metadata={"help": "rDPO: T of tau_mode 'bt', τ = σ((score_chosen − score_rejected)/T)."})
    tau_mode: str = field(
        default="bt", metadata={"help": "rDPO: τ from score columns (fastpref.losses.tau_from_scores): 'bt', "
                                        "'normalized' (needs score_range) or 'hard'.", "choices": list(TAU_MODES)})
    score_range: list[float] | None = field(
        default=None, metadata={"help": "rDPO tau_mode 'normalized': the judge's scale lo hi."})

    # Self-refinement (Sr-DPO / Sr-IPO).
    refinement: str = field(
        default="prompt", metadata={"help": "Δ of sr_dpo/sr_ipo: 'prompt' (forward pass with the refinement "
                                            "prompt, no grad) or 'naive' (the plain implicit reward, stop-gradient).",
                                    "choices": list(REFINEMENTS)})
    refinement_prompt: str = field(
        default=SR_DPO_REFINEMENT_PROMPT, metadata={"help": "Refinement prompt p placed before the query."})
    refinement_position: str = field(
        default="last_user_turn", metadata={"help": "Where p goes in conversational prompts: 'last_user_turn' (before "
                                                    "the query, inside its turn) or 'before_conversation' (at the "
                                                    "start of the first message, before the whole conversation).",
                                            "choices": list(REFINEMENT_POSITIONS)})
    refine_lambda: float = field(default=0.5, metadata={"help": "λ weighting the refinement term Δ."})
    cache_refinement_prefix: bool = field(
        default=True, metadata={"help": "Compute the keys/values of the refinement prompt (the token prefix every "
                                        "augmented prompt shares) once per optimizer step instead of per pair; "
                                        "off automatically for models whose cache is not plain full attention."})

    # Legacy TRL names (mapped in __post_init__ with a FutureWarning).
    rpo_alpha: float | None = field(
        default=None, metadata={"help": "Deprecated (TRL): use loss_type=[..., 'sft'], loss_weights=[..., alpha]."})
    use_logits_to_keep: bool | None = field(
        default=None, metadata={"help": "Deprecated (TRL): always on here; only completion rows reach the head."})

    def __post_init__(self):
        if isinstance(self.loss_type, str):
            self.loss_type = [self.loss_type]
        self.loss_type = list(self.loss_type)
        self._map_legacy_names()
        if self.loss_weights is not None:
            self.loss_weights = [float(w) for w in self.loss_weights]
            if len(self.loss_weights) != len(self.loss_type):
                raise ValueError(f"loss_weights must have one weight per loss_type: {len(self.loss_weights)} weights "
                                 f"for {len(self.loss_type)} loss types {self.loss_type}")
        if not self.loss_type:
            raise ValueError("loss_type must name at least one loss type")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.ld_alpha is not None and not 0.0 <= self.ld_alpha <= 1.0:
            raise ValueError(f"ld_alpha must be in [0, 1], got {self.ld_alpha}")
        if self.truncation_mode not in TRUNCATION_MODES:
            raise ValueError(f"truncation_mode must be one of {TRUNCATION_MODES}, got {self.truncation_mode!r}")
        if self.stream_layout not in STREAM_LAYOUTS:
            raise ValueError(f"stream_layout must be one of {STREAM_LAYOUTS}, got {self.stream_layout!r}")
        if self.padding_free is not None and self.stream_layout != "auto" \
                and self.padding_free != (self.stream_layout != "padded"):
            raise ValueError(f"padding_free={self.padding_free} contradicts stream_layout={self.stream_layout!r}; "
                             "set one of them (padding_free=True means 'packed' or 'tree', False means 'padded')")
        if self.tau_mode not in TAU_MODES:
            raise ValueError(f"tau_mode must be one of {TAU_MODES}, got {self.tau_mode!r}")
        if self.score_range is not None:
            self.score_range = list(self.score_range)
        if self.tau_mode == "normalized" or self.score_range is not None:
            check_score_range(self.score_range)
        if not (self.score_temperature > 0 and math.isfinite(self.score_temperature)):
            raise ValueError(f"score_temperature must be finite and > 0, got {self.score_temperature}")
        if self.refinement not in REFINEMENTS:
            raise ValueError(f"refinement must be one of {REFINEMENTS}, got {self.refinement!r}")
        if self.refinement_position not in REFINEMENT_POSITIONS:
            raise ValueError(f"refinement_position must be one of {REFINEMENT_POSITIONS}, "
                             f"got {self.refinement_position!r}")
        if self.ref_cache_on_mismatch not in MISMATCH_POLICIES:
            raise ValueError(f"ref_cache_on_mismatch must be one of {MISMATCH_POLICIES}, "
                             f"got {self.ref_cache_on_mismatch!r}")
        self._resolve_pad_to_multiple_of()
        if self.max_length is not None and self.max_length < 2:
            raise ValueError(f"max_length must be >= 2 or None, got {self.max_length}")
        self._check_listwise()
        super().__post_init__()
        if self.pad_to_multiple_of == "auto":  # after TrainingArguments resolved the device
            self.pad_to_multiple_of = 128 if self.device.type == "neuron" else None

    def _resolve_pad_to_multiple_of(self) -> None:
        value = self.pad_to_multiple_of
        if isinstance(value, str) and value != "auto":
            value = None if value.lower() in ("none", "null") else int(value) if value.isdigit() else value
        if value != "auto" and value is not None and (not isinstance(value, int) or isinstance(value, bool)
                                                      or value < 1):
            raise ValueError(f"pad_to_multiple_of must be a positive int, 'auto' or None, got {value!r}")
        self.pad_to_multiple_of = value

    def _check_listwise(self) -> None:
        """A listwise type (K ranked responses, :func:`fastpref.listwise_loss`) is the only type of its run."""
        if not self.is_listwise:
            return
        if len(self.loss_type) != 1:
            raise ValueError(f"loss_type {self.loss_type}: a listwise type ({', '.join(LISTWISE_LOSS_TYPES)}) "
                             "cannot be combined with other loss types")
        if self.stream_layout == "packed":
            raise ValueError("listwise loss types use the padded or the tree layout; got stream_layout='packed'")
        for name, value, unset in (("ld_alpha", self.ld_alpha, None), ("use_weighting", self.use_weighting, False)):
            if value != unset:
                raise ValueError(f"{name}={value!r} is not supported with listwise loss type {self.loss_type[0]!r}")

    @property
    def is_listwise(self) -> bool:
        """True when ``loss_type`` is a listwise type (the dataset then holds prompt, completions, scores)."""
        return any(name in LISTWISE_LOSS_TYPES for name in self.loss_type)

    def _map_legacy_names(self) -> None:
        if self.rpo_alpha is not None:
            warnings.warn("rpo_alpha is deprecated (as in TRL): it is mapped to loss_type=[..., 'sft'] with "
                          f"loss_weights=[..., {self.rpo_alpha}]", FutureWarning, stacklevel=4)
            weights = self.loss_weights if self.loss_weights is not None else [1.0] * len(self.loss_type)
            self.loss_type = [*self.loss_type, "sft"]
            self.loss_weights = [*weights, float(self.rpo_alpha)]
            self.rpo_alpha = None
        if self.pad_token is not None:
            warnings.warn("pad_token is deprecated (as in TRL): set tokenizer.pad_token and pass the tokenizer as "
                          "processing_class", FutureWarning, stacklevel=4)
        if self.use_logits_to_keep is not None:
            warnings.warn("use_logits_to_keep is deprecated: fastpref always runs the head on completion rows only",
                          FutureWarning, stacklevel=4)
            self.use_logits_to_keep = None

    @property
    def uses_refinement(self) -> bool:
        """True when a loss type needs Δ (sr_dpo / sr_ipo)."""
        return any(name in REFINED_LOSS_TYPES for name in self.loss_type)

    @property
    def uses_augmented_stream(self) -> bool:
        """True when the augmented stream (p ⊕ x, y) is run: Sr-DPO/Sr-IPO with refinement='prompt'."""
        return self.uses_refinement and self.refinement == "prompt"
