"""format_score: the five canonical cases of supplementary B.3 per preset, edges, contract."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from rewards import format_score, refusal_format_score, response_format_score
from rewards.format import DOWNGRADE_RULES, MAX_THINK_CHARS
from rewards.presets import FORMAT_VARIANTS

LONG_THINK = "x" * (MAX_THINK_CHARS + 1)
ELEVEN_WORDS = " ".join(["w"] * 11)

# (case, text, paper score, segcompass-code score)
CANONICAL = [
    ("invalid", "no tags at all <SEG>", 0.0, 0.0),
    ("valid and clean", "<think>the red cup</think> <SEG>", 1.0, 1.0),
    ("long think", f"<think>{LONG_THINK}</think><SEG>", 0.9, 0.9),
    ("text before <think>", "Sure! <think>cup</think><SEG>", 0.9, 0.9),
    ("text after the token", "<think>cup</think><SEG> done.", 0.9, 1.0),
]


@pytest.mark.parametrize("preset_index, preset", [(2, "paper"), (3, "segcompass-code")])
@pytest.mark.parametrize("case", CANONICAL, ids=[c[0] for c in CANONICAL])
def test_canonical_cases(case, preset_index, preset):
    assert format_score(case[1], preset=preset) == case[preset_index]


@pytest.mark.parametrize(
    "text, paper, code",
    [
        # Words between </think> and the token: only the released code counts them.
        (f"<think>a</think> {ELEVEN_WORDS} <SEG>", 1.0, 0.9),
        (f"<think>a</think> {' '.join(['w'] * 10)} <SEG>", 1.0, 1.0),
        # Several downgrade reasons still give 0.9, never 0.81.
        (f"pre <think>{LONG_THINK}</think><SEG> post", 0.9, 0.9),
        # Think length is the raw content between the tags: 2048 is fine, 2049 is not.
        (f"<think>{'x' * MAX_THINK_CHARS}</think><SEG>", 1.0, 1.0),
        (f"<think> {'x' * (MAX_THINK_CHARS - 1)} </think><SEG>", 0.9, 0.9),
        # Whitespace (Unicode too) around the parts is not text.
        ("\n\t\u3000<think>\na\n</think>\n<SEG>\n \u00a0", 1.0, 1.0),
    ],
)
def test_preset_differences_and_edges(text, paper, code):
    assert format_score(text, preset="paper") == paper
    assert format_score(text, preset="segcompass-code") == code


@pytest.mark.parametrize(
    "text",
    [
        "",
        "<SEG>",
        "<think>a</think>",  # no token
        "<think>a</think><SEG><SEG>",  # two tokens
        "<think>a<SEG></think>",  # token inside think
        "<SEG><think>a</think>",  # token before think
        "</think>a<think><SEG>",  # tags reversed
        "<think></think><SEG>",  # empty think
        "<think> \n\t </think><SEG>",  # whitespace-only think
        "<think>a</think><think>b</think><SEG>",  # two think blocks
        "<think><think>a</think><SEG>",  # stray extra <think>
        "<think>a</think></think><SEG>",  # stray extra </think>
        "<think>a<SEG>",  # unclosed think
        "<THINK>a</THINK><SEG>",  # tags are case-sensitive
    ],
)
@pytest.mark.parametrize("preset", ["paper", "segcompass-code"])
def test_invalid_texts_score_zero(text, preset):
    assert format_score(text, preset=preset) == 0.0


def test_custom_reference_token():
    assert format_score("<think>a</think><REF_POS>", ref_token="<REF_POS>") == 1.0
    assert format_score("<think>a</think><REF_POS>") == 0.0  # default token is <SEG>


def test_default_preset_is_paper():
    text = "<think>a</think><SEG> trailing"
    assert format_score(text) == format_score(text, preset="paper") == 0.9


def test_every_format_variant_has_a_rule():
    assert set(DOWNGRADE_RULES) == set(FORMAT_VARIANTS)


@pytest.mark.parametrize("text", [None, b"<think>a</think><SEG>", 3])
def test_non_string_text_raises(text):
    with pytest.raises(ValueError, match="text must be a str"):
        format_score(text)


@pytest.mark.parametrize("token", ["", "<think>", "</think>", "think", "<SEG></think>", None])
def test_bad_reference_token_raises(token):
    with pytest.raises(ValueError, match="ref_token"):
        format_score("<think>a</think><SEG>", ref_token=token)


def test_unknown_preset_raises_listing_known():
    with pytest.raises(ValueError, match="known presets: paper, segcompass-code"):
        format_score("<think>a</think><SEG>", preset="nope")


PIECES = st.sampled_from(["<think>", "</think>", "<SEG>", " ", "\n", "a", "word ", "x" * 700])


@settings(max_examples=100, deadline=None)
@given(st.one_of(st.text(max_size=50), st.lists(PIECES, max_size=12).map("".join)))
def test_any_string_scores_in_the_allowed_set_and_validity_is_shared(text):
    paper = format_score(text, preset="paper")
    code = format_score(text, preset="segcompass-code")
    assert paper in (0.0, 0.9, 1.0) and code in (0.0, 0.9, 1.0)
    assert (paper == 0.0) == (code == 0.0)  # presets differ only in the downgrade


@pytest.mark.parametrize(
    "text, score",
    [
        ("<think>There is no purple star.</think> No such object.", 1.0),
        ("<think>no star</think>", 1.0),
        ("Sure. <think>no star</think> No such object.", 0.9),
        ("<think>" + "x" * 2049 + "</think> none", 0.9),
        ("<think>   </think> none", 0.0),
        ("<think>no star</think> <SEG>", 0.0),
        ("</think>no star<think>", 0.0),
        ("no think at all", 0.0),
    ],
)
def test_refusal_format_cases(text, score):
    assert refusal_format_score(text) == score


def test_response_format_dispatches_on_the_reference_token():
    assert response_format_score("<think>roll</think> <SEG>") == format_score("<think>roll</think> <SEG>")
    assert response_format_score("<think>none</think> No such object.") == 1.0
    assert response_format_score("<SEG><SEG>") == 0.0
