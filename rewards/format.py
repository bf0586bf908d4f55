"""Format score of a response: is it ``<think>…</think> … <REF>`` and how cleanly.

Scores are in {0.0, 0.9, 1.0}. Validity is the same for every preset (supplementary B.3):
exactly one ``<think>`` and one ``</think>``, in that order, non-whitespace content between
them, and exactly one reference token, after ``</think>``. The presets differ only in what
downgrades a valid text to 0.9 (at most one downgrade, never 0.81).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from rewards.presets import DEFAULT_PRESET, get_preset

THINK_OPEN = "<think>"
THINK_CLOSE = "</think>"
MAX_THINK_CHARS = 2048  # longer raw think content (between the tags) is downgraded
MAX_WORDS_BEFORE_TOKEN = 10  # "segcompass-code": more words between </think> and token

SCORE_INVALID, SCORE_DOWNGRADED, SCORE_CLEAN = 0.0, 0.9, 1.0


@dataclass(frozen=True)
class _Parts:
    """A valid text cut at its tags: before<think>think</think>between REF after."""

    before: str
    think: str
    between: str
    after: str


def _split(text: str, ref_token: str) -> _Parts | None:
    """The parts of a valid text, or None if the text breaks a validity rule."""
    if (
        text.count(THINK_OPEN) != 1
        or text.count(THINK_CLOSE) != 1
        or text.count(ref_token) != 1
    ):
        return None
    open_at, close_at, ref_at = (
        text.index(THINK_OPEN),
        text.index(THINK_CLOSE),
        text.index(ref_token),
    )
    think_end = close_at + len(THINK_CLOSE)
    if close_at < open_at or ref_at < think_end:
        return None
    think = text[open_at + len(THINK_OPEN) : close_at]
    if not think.strip():
        return None
    return _Parts(
        before=text[:open_at],
        think=think,
        between=text[think_end:ref_at],
        after=text[ref_at + len(ref_token) :],
    )


def _paper_downgrade(parts: _Parts) -> bool:
    """B.3: long think, text before <think>, or text after the token."""
    return (
        len(parts.think) > MAX_THINK_CHARS
        or bool(parts.before.strip())
        or bool(parts.after.strip())
    )


def _released_code_downgrade(parts: _Parts) -> bool:
    """rseg_cot.py: long think, text before <think>, or > 10 words before the token."""
    return (
        len(parts.think) > MAX_THINK_CHARS
        or bool(parts.before.strip())
        or len(parts.between.split()) > MAX_WORDS_BEFORE_TOKEN
    )


# Keyed by presets.FORMAT_VARIANTS (a test keeps the two in step).
DOWNGRADE_RULES: dict[str, Callable[[_Parts], bool]] = {
    "paper": _paper_downgrade,
    "segcompass-code": _released_code_downgrade,
}


def _check_ref_token(ref_token) -> None:
    """The token must be countable on its own: non-empty and not overlapping a think tag."""
    if not isinstance(ref_token, str) or not ref_token:
        raise ValueError(f"ref_token must be a non-empty str, got {ref_token!r}")
    for tag in (THINK_OPEN, THINK_CLOSE):
        if ref_token in tag or tag in ref_token:
            raise ValueError(f"ref_token {ref_token!r} overlaps the tag {tag!r}")


def format_score(text: str, ref_token: str = "<SEG>", preset: str = DEFAULT_PRESET) -> float:
    """Format score of ``text`` in {0.0, 0.9, 1.0} under reward ``preset``.

    Any string is a valid input (garbage scores 0.0); a non-str ``text``, a bad
    ``ref_token`` or an unknown ``preset`` raise ValueError.
    """
    downgrade = DOWNGRADE_RULES[get_preset(preset).format_variant]
    _check_ref_token(ref_token)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    parts = _split(text, ref_token)
    if parts is None:
        return SCORE_INVALID
    return SCORE_DOWNGRADED if downgrade(parts) else SCORE_CLEAN


def refusal_format_score(text: str, ref_token: str = "<SEG>", preset: str = DEFAULT_PRESET) -> float:
    """Format score of a no-mask answer (READ's false premise): a think block and no reference token.

    Valid: exactly one non-empty ``<think>…</think>`` and no ``ref_token``; downgraded to 0.9
    for a long think or text before ``<think>`` (the refusal itself follows ``</think>``).
    """
    get_preset(preset)
    _check_ref_token(ref_token)
    if not isinstance(text, str):
        raise ValueError(f"text must be a str, got {type(text).__name__}")
    if ref_token in text or text.count(THINK_OPEN) != 1 or text.count(THINK_CLOSE) != 1:
        return SCORE_INVALID
    open_at, close_at = text.index(THINK_OPEN), text.index(THINK_CLOSE)
    think = text[open_at + len(THINK_OPEN) : close_at]
    if close_at < open_at or not think.strip():
        return SCORE_INVALID
    long_or_prefixed = len(think) > MAX_THINK_CHARS or bool(text[:open_at].strip())
    return SCORE_DOWNGRADED if long_or_prefixed else SCORE_CLEAN


def response_format_score(text: str, ref_token: str = "<SEG>", preset: str = DEFAULT_PRESET) -> float:
    """Either kind of answer: a text with the reference token is scored as a mask answer, else as a refusal."""
    if isinstance(text, str) and ref_token and ref_token in text:
        return format_score(text, ref_token, preset)
    return refusal_format_score(text, ref_token, preset)
