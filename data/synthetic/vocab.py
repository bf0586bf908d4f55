"""The closed vocabulary of the synthetic language.

Derived from templates.py and the scene attributes rather than listed by hand,
so a tokenizer trained on `WORDS` covers every text the generator can emit.
"""
from __future__ import annotations

import re

from . import templates as T
from .phrases import plural
from .scene import COLOURS, KINDS, SIZES

_TOKEN = re.compile(r"[A-Za-z]+|[^\sA-Za-z]")
_SLOT = re.compile(r"\{\w*\}")


def words(text: str) -> list[str]:
    """Split text into words and single punctuation marks, keeping case."""
    return _TOKEN.findall(text)


def _strings(value) -> list[str]:
    if isinstance(value, str):
        return [value]
    if isinstance(value, dict):
        return [s for k, v in value.items() for s in _strings(k) + _strings(v)]
    if isinstance(value, (tuple, list)):
        return [s for v in value for s in _strings(v)]
    return []


def _vocabulary() -> tuple[str, ...]:
    texts = [s for key, value in vars(T).items() if not key.startswith("_") for s in _strings(value)]
    texts += [*COLOURS, *SIZES, *KINDS] + [plural(n) for n in (*KINDS, T.SHAPE)]
    return tuple(sorted({w for text in texts for w in words(_SLOT.sub(" ", text))}))


WORDS = _vocabulary()  # case-sensitive words and punctuation; excludes <think> tags and the ref token
