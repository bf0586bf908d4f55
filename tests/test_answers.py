"""Reading answers back: every generated reference trace parses to exactly its targets, and
reasoning_correct tells a right answer from a near miss."""
from __future__ import annotations

from collections import Counter

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from data.synthetic import COLOURS, NO_TARGET_ANSWER, QUERY_KINDS, random_scene
from data.synthetic.answers import conclusion, reasoning_correct, shape_name, split_response
from data.synthetic.phrases import name

REF = "<SEG>"
SIZE = 64


def _query(seed: int, kind: str):
    """A generated (scene, query) of `kind`, or None when the scene admits none."""
    rng = np.random.default_rng(seed)
    scene = random_scene(rng, SIZE)
    return scene, QUERY_KINDS[kind](scene, rng)


def _response(reasoning: str, commits: bool) -> str:
    return f"<think>{reasoning}</think> {REF if commits else NO_TARGET_ANSWER}"


@settings(max_examples=300, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(sorted(QUERY_KINDS)))
def test_every_reference_trace_concludes_with_exactly_its_targets(seed, kind):
    scene, query = _query(seed, kind)
    if query is None:
        return
    said = conclusion(query.reasoning)
    assert Counter(said.names) == Counter(shape_name(scene.shapes[t], SIZE) for t in query.targets)
    assert said.nothing == (not query.targets)
    assert reasoning_correct(_response(query.reasoning, bool(query.targets)), query.reasoning, REF)


@settings(max_examples=200, deadline=None)
@given(seed=st.integers(0, 2**32 - 1), kind=st.sampled_from(sorted(set(QUERY_KINDS) - {"false_premise"})),
       data=st.data())
def test_a_wrong_extra_or_missing_shape_is_not_correct(seed, kind, data):
    scene, query = _query(seed, kind)
    if query is None:
        return
    target = scene.shapes[query.targets[0]]
    right = name(target, SIZE)
    colour = data.draw(st.sampled_from(sorted(set(COLOURS) - {target.colour})))
    recoloured = right.replace(f" {target.colour} ", f" {colour} ")
    wrong = query.reasoning[:query.reasoning.rindex(right)] + recoloured + query.reasoning[
        query.reasoning.rindex(right) + len(right):]
    assert not reasoning_correct(_response(wrong, True), query.reasoning, REF)
    extra = query.reasoning[:-1] + f" and {recoloured}."
    assert not reasoning_correct(_response(extra, True), query.reasoning, REF)
    assert not reasoning_correct(_response("The question asks for it. There is one: " + recoloured + ".", True),
                                 query.reasoning, REF)
    assert not reasoning_correct(_response(query.reasoning, False), query.reasoning, REF)  # right words, refuses


@settings(max_examples=100, deadline=None)
@given(seed=st.integers(0, 2**32 - 1))
def test_a_false_premise_is_answered_by_a_refusal_only(seed):
    scene, query = _query(seed, "false_premise")
    if query is None:
        return
    assert not reasoning_correct(_response(query.reasoning, True), query.reasoning, REF)
    named = f"The question asks for it. There is one: {name(scene.shapes[0], SIZE)}."
    assert not reasoning_correct(_response(named, False), query.reasoning, REF)


def test_only_the_conclusion_counts_and_order_does_not():
    reference = ("The question asks for the largest red shape. The red shapes are the small red circle at the top "
                 "and the large red ring at the bottom right. The largest is the large red ring at the bottom right.")
    assert conclusion(reference).names == (("large", "red", "ring", "bottom right"),)
    multi = "There are two: the small red circle at the top left and the large blue square at the center."
    swapped = "There are two: the large blue square at the center and the small red circle at the top left."
    assert reasoning_correct(_response(swapped, True), multi, REF)
    assert not reasoning_correct(_response("There is one: the small red circle at the top.", True),
                                 "There is one: the small red circle at the top left.", REF)


@pytest.mark.parametrize("response, expected", [
    ("<think>abc</think> <SEG>", ("abc", True)),
    ("<think>abc</think> No such object.", ("abc", False)),
    ("<think>abc <SEG>", (None, False)),  # cut off before </think>
    ("abc</think> <SEG>", (None, False)),
])
def test_split_response(response, expected):
    assert split_response(response, REF) == expected
