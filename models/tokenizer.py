"""Byte-level BPE tokenizer for the tiny policy, trained on the synthetic corpus.

Saved as a Hugging Face tokenizer (tokenizer.json + config + chat template) so
transformers and vLLM load it exactly as they load a real model's tokenizer.
Reasoning markers and the reference token are *added but not special*: vLLM
skips special tokens when detokenising, and the rewards must see them.
"""
from __future__ import annotations

from collections.abc import Iterable

from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

PAD = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"
IMAGE = "<image>"
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def special_tokens(ref_token: str) -> tuple[list[str], list[str]]:
    """(control tokens hidden on decode, marker tokens kept in decoded text)."""
    return [PAD, IM_START, IM_END, IMAGE], [THINK_OPEN, THINK_CLOSE, ref_token]


def train_tokenizer(corpus: Iterable[str], vocab_size: int, ref_token: str = "<SEG>") -> PreTrainedTokenizerFast:
    """Train byte-level BPE on `corpus`; every byte stays encodable (no unknown token)."""
    control, markers = special_tokens(ref_token)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=control,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(corpus), trainer=trainer)
    tok.add_tokens([AddedToken(t, special=False, normalized=False) for t in markers])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token=PAD,
        eos_token=IM_END,
        bos_token=None,
        unk_token=None,
        additional_special_tokens=[IM_START, IMAGE],
    )
    fast.chat_template = CHAT_TEMPLATE
    fast.model_max_length = 4096
    return fast
