"""Reading an answer back: which shapes a reasoning trace settles on, in the generator's own words.

Every synthetic trace ends in a conclusion sentence (templates.py): it either
names the answer ("There is one: the small red circle at the top left.", "The
largest is ...", "The nearest ... is ...", "There are two: ... and ...") or says
nothing fits ("There is no star in the image.", "There is no circle left of
it."). Earlier sentences may name other shapes (a superlative lists the whole
group), so only the conclusion counts. A name is parsed with the vocabulary
that `phrases.name` fills in, so no word can be read two ways.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from . import templates as T
from .phrases import position
from .scene import COLOURS, KINDS, SIZES, Shape
from .targets import THINK_CLOSE, THINK_OPEN

ShapeName = tuple[str, str, str, str]
"""(size, colour, kind, position): what a full name says about one shape."""


def _alternatives(words) -> str:
    """A regex group matching any of `words`, longest first ("top left" before "top")."""
    return "(" + "|".join(re.escape(w) for w in sorted(words, key=len, reverse=True)) + ")"


def _template_regex(template: str, **slots: str) -> str:
    """A template as a regex: its fixed text literal, each `{slot}` the given pattern."""
    parts = re.split(r"(\{\w+\})", template)
    return "".join(slots[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts)


_NAME = re.compile(_template_regex(
    T.NAME, size=_alternatives(SIZES), colour=_alternatives(COLOURS), kind=_alternatives(KINDS),
    position=_alternatives(p for row in T.POSITIONS for p in row)) + r"(?![A-Za-z])")
_NOTHING = re.compile("|".join(_template_regex(t, what=".+", thing=".+", direction=".+")
                               for t in (T.ABSENT, T.NONE_BEYOND)))
_SENTENCE_END = re.compile(r"(?<=[.?!])\s+")


@dataclass(frozen=True)
class Conclusion:
    names: tuple[ShapeName, ...]  # shapes the conclusion names, in the order spoken
    nothing: bool  # the conclusion says no shape fits


def shape_name(shape: Shape, image_size: int) -> ShapeName:
    """What `phrases.name` says about a shape, as a tuple."""
    return shape.size, shape.colour, shape.kind, position(shape, image_size)


def conclusion(reasoning: str) -> Conclusion:
    """The last sentence of a reasoning trace, read."""
    sentences = _SENTENCE_END.split(reasoning.strip())
    last = sentences[-1] if sentences else ""
    names = tuple(m.groups() for m in _NAME.finditer(last))
    return Conclusion(names, not names and _NOTHING.fullmatch(last) is not None)


def split_response(response: str, ref_token: str) -> tuple[str | None, bool]:
    """(the `<think>` content or None without one, whether the answer after `</think>` has `ref_token`)."""
    start, end = response.find(THINK_OPEN), response.find(THINK_CLOSE)
    if start < 0 or end < start:
        return None, False
    return response[start + len(THINK_OPEN):end], ref_token in response[end + len(THINK_CLOSE):]


def reasoning_correct(response: str, reference_reasoning: str, ref_token: str) -> bool:
    """Does a response settle on exactly the shapes the reference reasoning settles on?

    With targets: its conclusion names the same shapes (as a multiset; order aside)
    and it answers with `ref_token`. A false premise (the reference concludes that
    nothing fits): its conclusion says so and it answers without `ref_token`.
    """
    reference = conclusion(reference_reasoning)
    thought, commits = split_response(response, ref_token)
    if thought is None:
        return False
    said = conclusion(thought)
    if reference.nothing:
        return said.nothing and not commits
    return commits and Counter(said.names) == Counter(reference.names)
