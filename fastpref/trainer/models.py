"""The trainer's models and tokenizer: resolved from objects, local paths or built-in tiny names, checked against
each other, and the stream layout resolved for the model's attention.

Nothing here mutates a model the user passes as the reference: the reference pass runs it under ``no_grad`` in
eval mode and restores its training flag (:meth:`fastpref.PreferenceTrainer._reference_context`).
"""

from __future__ import annotations

import contextlib
import json
import os

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, set_seed

from fastpref.model.head import unwrap_causal_lm
from fastpref.model.prefix_kv import gathered_parameters
from fastpref.model.tree_stream import attention_mask_for, build_tree_batch
from fastpref.trainer.config import PreferenceConfig
from fastpref.trainer.ref_store import fingerprint, model_fingerprint


def is_peft_model(model: torch.nn.Module) -> bool:
    return hasattr(model, "disable_adapter") and hasattr(model, "peft_config")


def disable_dropout(model: torch.nn.Module) -> None:
    for module in model.modules():
        if isinstance(module, torch.nn.Dropout):
            module.p = 0.0


def resolve_tokenizer(model, processing_class, trust_remote_code: bool = False):
    """The tokenizer: the given one, the one saved next to a model path, or fastpref's local tokenizer."""
    if processing_class is not None:
        return processing_class
    if isinstance(model, str) and os.path.isdir(model):
        with contextlib.suppress(OSError, ValueError):
            return AutoTokenizer.from_pretrained(model, trust_remote_code=trust_remote_code)
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


def init_kwargs(args: PreferenceConfig) -> dict:
    """``model_init_kwargs`` (a dict or its JSON), with TRL's ``trust_remote_code`` unless they set it."""
    kwargs = args.model_init_kwargs
    kwargs = dict(json.loads(kwargs) if isinstance(kwargs, str) else kwargs or {})
    kwargs.setdefault("trust_remote_code", args.trust_remote_code)
    return kwargs


def resolve_model(model, tokenizer, args: PreferenceConfig) -> PreTrainedModel:
    """A model object from a model, a built-in name (:data:`fastpref.data.tiny_models.MODEL_NAMES`, its random
    weights drawn after ``set_seed(args.seed)``, so the policy and a reference of the same name agree) or a local
    path."""
    if not isinstance(model, str):
        return model
    from fastpref.data.tiny_models import MODEL_NAMES, build_model

    if model in MODEL_NAMES:
        set_seed(args.seed)
        return align_special_tokens(build_model(model, vocab_size=len(tokenizer)), tokenizer)
    if not os.path.isdir(model):
        raise ValueError(f"model {model!r} is neither a local model directory nor a built-in name "
                         f"({', '.join(MODEL_NAMES)}); this build loads no models from a hub")
    return AutoModelForCausalLM.from_pretrained(model, **init_kwargs(args))


def pad_token_id(tokenizer, args: PreferenceConfig) -> int:
    """The padding id: ``args.pad_token`` (TRL's deprecated field), else the tokenizer's pad token, else its eos
    token (as TRL)."""
    token = args.pad_token or tokenizer.pad_token or tokenizer.eos_token
    if token is None:
        raise ValueError("processing_class has neither a pad nor an eos token: set tokenizer.pad_token")
    token_id = tokenizer.convert_tokens_to_ids(token)
    if token_id is None or (token_id == tokenizer.unk_token_id and token != tokenizer.unk_token):
        what = "pad_token" if args.pad_token else "the tokenizer's pad token"
        raise ValueError(f"{what} {token!r} is not in the tokenizer's vocabulary")
    return token_id


def check_vocabulary(model: torch.nn.Module, tokenizer) -> None:
    """Every token id the tokenizer can emit must index the model's output vocabulary (the log-prob op then needs
    no per-step label check)."""
    head = unwrap_causal_lm(model).get_output_embeddings()
    vocab = getattr(head, "out_features", None) or head.weight.shape[0]  # out_features survives ZeRO-3 sharding
    if len(tokenizer) > vocab:
        raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model's output vocabulary has {vocab} "
                         "rows: call model.resize_token_embeddings(len(tokenizer)) first")


def reference_fingerprint(policy: torch.nn.Module, ref_model: torch.nn.Module | None) -> str:
    """Fingerprint of the effective reference weights: ``ref_model`` (a peft one: its base with its active
    adapter), else the policy (a peft policy: its base without adapters, or with the frozen
    :data:`REFERENCE_ADAPTER` copy when it has one). A peft base is fingerprinted under its own parameter names
    (:func:`base_state_dict`), so full fine-tuning and LoRA runs of the same base share their cache; an adapter
    in the reference adds its weights and its config (rank, alpha, targets). ZeRO-3-partitioned weights are
    gathered for it (a shard would fingerprint one rank's slice)."""
    with gathered_parameters(policy if ref_model is None else ref_model):
        return _reference_fingerprint(policy, ref_model)


def _reference_fingerprint(policy: torch.nn.Module, ref_model: torch.nn.Module | None) -> str:
    if ref_model is not None and is_peft_model(ref_model):
        return peft_reference_fingerprint(ref_model, ref_model.active_adapter)
    if ref_model is not None:
        return model_fingerprint(ref_model)
    if is_peft_model(policy):
        return peft_reference_fingerprint(policy, REFERENCE_ADAPTER if REFERENCE_ADAPTER in policy.peft_config
                                          else None)
    return model_fingerprint(policy)


def peft_reference_fingerprint(peft_model, adapter: str | None) -> str:
    """Fingerprint of ``peft_model``'s base (:func:`base_state_dict`) with ``adapter`` on (None: adapters off)."""
    state = base_state_dict(peft_model)
    if adapter is None:
        return model_fingerprint(peft_model.get_base_model(), state=state)
    marker = f".{adapter}."
    state.update((name, tensor) for name, tensor in peft_model.get_base_model().state_dict().items()
                 if marker in name)
    settings = peft_model.peft_config[adapter].to_dict()
    for key in ("base_model_name_or_path", "revision", "inference_mode"):
        settings.pop(key, None)
    settings = json.dumps(settings, sort_keys=True, default=lambda v: sorted(v) if isinstance(v, set) else str(v))
    return fingerprint(weights=model_fingerprint(peft_model.get_base_model(), state=state), adapter=settings)


def resolve_stream_layout(model: torch.nn.Module, args: PreferenceConfig) -> str:
    """``args.stream_layout`` with "auto" resolved for ``model`` (see :class:`PreferenceConfig`'s module docstring).

    "tree" with an attention implementation that cannot express the tree mask raises the named error
    (:class:`fastpref.model.attention.FlashAttentionTreeError` for flash attention, else
    :class:`fastpref.model.attention.UnsafeAttentionError`).
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


REFERENCE_ADAPTER = "fastpref_ref"


def add_reference_adapter(peft_model) -> str:
    """Freeze a copy of `peft_model`'s active adapter as :data:`REFERENCE_ADAPTER`: the reference of a policy that
    arrives with adapters of its own (possibly trained), which disabling the adapters would not reproduce. TRL 1.16
    keeps the same copy (its "ref" adapter). Returns the active adapter's name, which stays active."""
    active = peft_model.active_adapter
    peft_model.add_adapter(REFERENCE_ADAPTER, peft_model.peft_config[active])
    peft_model.set_adapter(active)
    params = dict(peft_model.named_parameters())
    with torch.no_grad():
        for name, param in params.items():
            if f".{active}." in name:
                params[name.replace(f".{active}.", f".{REFERENCE_ADAPTER}.")].copy_(param)
    peft_model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)
    return active


@contextlib.contextmanager
def reference_adapter(peft_model, active: str):
    """Within the block the frozen copy of the initial adapter is active; the trained one is again after it."""
    peft_model.set_adapter(REFERENCE_ADAPTER, inference_mode=True)
    try:
        yield
    finally:
        peft_model.set_adapter(active)
        peft_model.set_requires_grad(REFERENCE_ADAPTER, requires_grad=False)


BASE_MODEL_DIR = "base_model"


def base_state_dict(peft_model) -> dict[str, torch.Tensor]:
    """The base model's weights under their own names: every adapter's tensors dropped, peft's wrapper prefixes
    (``base_layer`` of a LoRA layer, ``original_module`` of a module to save) removed."""
    adapters = tuple(f".{name}." for name in peft_model.peft_config)
    state = {}
    for name, tensor in peft_model.get_base_model().state_dict().items():
        if any(adapter in name for adapter in adapters):
            continue
        state[name.replace(".base_layer.", ".").replace(".original_module.", ".")] = tensor
    return state


def save_unnamed_base(peft_model, directory: str) -> bool:
    """Save the base of a peft model built from a config (no ``base_model_name_or_path`` to reload it from) to
    ``directory`` and point every adapter config at its absolute path, so the saved adapter reloads offline with
    ``AutoPeftModelForCausalLM.from_pretrained``. LoRA leaves the base weights as they were, so one copy serves
    every checkpoint. Returns whether it saved (False: the base already has a name or path)."""
    configs = peft_model.peft_config.values()
    if all(config.base_model_name_or_path for config in configs):
        return False
    path = os.path.abspath(directory)
    base = peft_model.get_base_model()
    base.save_pretrained(path, state_dict=base_state_dict(peft_model))
    for config in configs:
        if not config.base_model_name_or_path:
            config.base_model_name_or_path = path
    return True
