"""A small byte-level BPE tokenizer built locally (no hub), for the tiny demo and test models.

Byte-level, so any text encodes (no unknown token); digits are split one per token so sums stay learnable;
the merges are trained in well under a second on a fixed corpus (the synthetic preference task, the Sr-DPO
refinement prompt, the data tools' templates), so the result is the same on every machine.

Saved next to a model, it reloads as itself with ``AutoTokenizer.from_pretrained``: beside a Qwen2 config
transformers 5 always builds ``Qwen2Tokenizer``, which keeps the saved vocabulary, merges and post-processor but
sets its own normalizer (NFC) and pre-tokenizer (:data:`PRETOKENIZE_PATTERN`, which splits digits one
per token) and adds its ``unk_token`` (default ``<|endoftext|>``) as a new token. So this tokenizer uses that
normalizer and pre-tokenizer, and its ``unk_token`` is ``<|end|>`` (byte-level BPE never emits an unknown token).

Special tokens: ``<|bos|>`` (added in front of every encoded text), ``<|end|>`` (eos and end of a chat turn),
``<|pad|>``, and the chat roles ``<|system|>``, ``<|user|>``, ``<|assistant|>``. Chat template::

    <|bos|><|user|>Hi<|end|><|assistant|>Hello<|end|>
"""

from __future__ import annotations

from transformers import PreTrainedTokenizerFast

BOS, EOS, PAD = "<|bos|>", "<|end|>", "<|pad|>"
ROLE_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>")
SPECIAL_TOKENS = (BOS, EOS, PAD, *ROLE_TOKENS)
DEFAULT_VOCAB_SIZE = 512
#: The pre-tokenizer's split pattern (contractions, letter runs, single digits, punctuation runs, whitespace); the
#: one ``Qwen2Tokenizer`` sets, so a saved tokenizer reloads identically beside a Qwen2 config.
PRETOKENIZE_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                       r"|\s*[\r\n]+|\s+(?!\S)|\s+")

CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{{ '<|' + message['role'] + '|>' + message['content'] + '<|end|>' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|assistant|>' }}{% endif %}"
)


def _training_corpus() -> list[str]:
    from fastpref.data import prompts, synthetic

    rows = synthetic.generate(512, seed=12345)
    texts = [row[key] for row in rows for key in ("prompt", "chosen", "rejected")]
    texts += [prompts.SR_DPO_REFINEMENT_PROMPT, prompts.REWARD_AUGMENT_TEMPLATE, prompts.CRITIQUE_TEMPLATE,
              prompts.REVISE_TEMPLATE, "system user assistant"]
    return texts


def build_tokenizer(vocab_size: int = DEFAULT_VOCAB_SIZE) -> PreTrainedTokenizerFast:
    """Build the byte-level BPE tokenizer (``vocab_size`` counts the 256 bytes, the merges and the specials)."""
    from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    if vocab_size < 256 + len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size must be at least {256 + len(SPECIAL_TOKENS)}, got {vocab_size}")
    tok = Tokenizer(models.BPE())
    tok.normalizer = normalizers.NFC()
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE_PATTERN), behavior="isolated", invert=False),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_training_corpus(), trainer=trainer)
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, tok.token_to_id(BOS))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=EOS,
        additional_special_tokens=list(ROLE_TOKENS),
        chat_template=CHAT_TEMPLATE,
    )
