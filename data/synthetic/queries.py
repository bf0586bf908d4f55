"""Query kinds with an answer: each needs one step of reasoning over the scene.

A query maker takes a scene and a random generator and returns a `Query`, or
None when the scene admits no unambiguous query of its kind (the caller then
draws a new scene). Ambiguity is ruled out by construction: a "the ..." query
names exactly one shape, an "every ..." query at least two.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from . import templates as T
from .phrases import (
    PATTERNS,
    describe,
    found,
    matches,
    name,
    names,
    plural,
    position,
    reading_order,
    unique_descriptions,
)
from .scene import COLOURS, KINDS, Scene

NEAREST_MARGIN = 0.05  # of the image side: how much nearer the answer must be than the runner-up

# Strictly beyond: compares inclusive boxes (x0, x1, y0, y1) of candidate and anchor.
_BEYOND = {
    "left of": lambda c, a: c[1] < a[0],
    "right of": lambda c, a: c[0] > a[1],
    "above": lambda c, a: c[3] < a[2],
    "below": lambda c, a: c[2] > a[3],
}


@dataclass(frozen=True)
class Query:
    """A question, its reasoning trace, and the answer as indices into scene.shapes."""

    question: str
    reasoning: str
    targets: tuple[int, ...] = ()  # empty: false premise

    @property
    def is_sentence(self) -> bool:
        return self.question.endswith(("?", "."))


def pick(rng: np.random.Generator, options: list | tuple):
    return options[int(rng.integers(len(options)))]


def ask(rng: np.random.Generator, questions: tuple[str, ...], what: str, **slots: str) -> str:
    return pick(rng, questions).format(what=what, **slots)


def reasoning(*sentences: str) -> str:
    return " ".join(sentences)


def having(scene: Scene, clause: str) -> list[int]:
    """Shapes a function clause is true of, in reading order."""
    kinds = T.FUNCTIONS[clause][0]
    return reading_order(scene, [i for i, s in enumerate(scene.shapes) if s.kind in kinds])


def groups(scene: Scene) -> list[tuple[str, list[int], tuple[str, ...]]]:
    """(noun, members in reading order, facts to state) for every noun a group query can use."""
    out = [(T.SHAPE, reading_order(scene, list(range(len(scene.shapes)))), ())]
    for kind in KINDS:
        out.append((kind, reading_order(scene, [i for i, s in enumerate(scene.shapes) if s.kind == kind]), ()))
    for colour in COLOURS:
        members = reading_order(scene, [i for i, s in enumerate(scene.shapes) if s.colour == colour])
        out.append((T.COLOURED_SHAPE.format(colour=colour), members, ()))
    for clause, (_, fact) in T.FUNCTIONS.items():
        out.append((T.SHAPE_THAT.format(clause=clause), having(scene, clause), (fact,)))
    return out


def _distance(scene: Scene, i: int, j: int) -> float:
    a, b = scene.shapes[i], scene.shapes[j]
    return float(np.hypot(a.cx - b.cx, a.cy - b.cy))


class Relation(NamedTuple):
    """An anchor shape, how it is named, and what lies in one direction of it."""

    anchor: int
    anchor_phrase: str
    direction: str
    thing: str  # "shape" or a kind
    candidates: list[int]  # nearest first


def relations(scene: Scene) -> list[Relation]:
    """Every (uniquely described anchor, direction, thing) with the shapes strictly beyond it."""
    boxes = [s.box() for s in scene.shapes]
    out = []
    for a, anchor in enumerate(scene.shapes):
        for description in unique_descriptions(anchor, scene.shapes):
            for direction, beyond in _BEYOND.items():
                for thing in (T.SHAPE, *KINDS):
                    cands = [i for i, s in enumerate(scene.shapes)
                             if i != a and thing in (T.SHAPE, s.kind) and beyond(boxes[i], boxes[a])]
                    cands.sort(key=lambda i: _distance(scene, a, i))
                    out.append(Relation(a, " ".join(description), direction, thing, cands))
    return out


def _clear_nearest(scene: Scene, r: Relation) -> bool:
    """The nearest candidate is unmistakably nearer than the runner-up."""
    if len(r.candidates) < 2:
        return len(r.candidates) == 1
    first, second = (_distance(scene, r.anchor, i) for i in r.candidates[:2])
    return second - first >= NEAREST_MARGIN * scene.size


def relation_question(rng: np.random.Generator, what: str, thing: str, direction: str, anchor: str) -> str:
    questions = T.RELATION_Q + (T.RELATION_ANY_Q if thing == T.SHAPE else ())
    return ask(rng, questions, what, thing=thing, direction=direction, anchor=anchor)


def attribute(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'the green triangle': a description only one shape matches."""
    for p in rng.permutation(len(PATTERNS)):
        descs = [describe(s, PATTERNS[p]) for s in scene.shapes]
        unique = [i for i, d in enumerate(descs) if sum(matches(d, s) for s in scene.shapes) == 1]
        if unique:
            i = pick(rng, unique)
            what = T.THE.format(noun=" ".join(descs[i]))
            return Query(ask(rng, T.ATTRIBUTE_Q, what), reasoning(T.ASK.format(what=what), found(scene, [i])), (i,))
    return None


def function(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'Which shape could roll?': a property only one shape's kind has."""
    clauses = [c for c in T.FUNCTIONS if len(having(scene, c)) == 1]
    if not clauses:
        return None
    clause = pick(rng, clauses)
    hits = having(scene, clause)
    what = T.THE.format(noun=T.SHAPE_THAT.format(clause=clause))
    text = reasoning(T.ASK.format(what=what), T.FUNCTIONS[clause][1], found(scene, hits))
    return Query(ask(rng, T.FUNCTION_Q, what, clause=clause), text, tuple(hits))


def superlative(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'the largest red shape': a group of two or more with a single one of the extreme size."""
    options = []
    for noun, members, facts in groups(scene):
        if facts:  # "shape that could roll" has no plain plural to list members under
            continue
        for extreme, size in T.EXTREMES.items():
            winners = [i for i in members if scene.shapes[i].size == size]
            if len(members) >= 2 and len(winners) == 1:
                options.append((noun, members, extreme, winners[0]))
    if not options:
        return None
    noun, members, extreme, winner = pick(rng, options)
    what = T.THE.format(noun=f"{extreme} {noun}")
    text = reasoning(
        T.ASK.format(what=what),
        T.MEMBERS.format(group=plural(noun), names=names(scene, members)),
        T.WINNER.format(extreme=extreme, name=name(scene.shapes[winner], scene.size)),
    )
    return Query(ask(rng, T.SUPERLATIVE_Q, what), text, (winner,))


def relation(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'What is left of the blue square?': the clearly nearest shape strictly beyond an anchor."""
    options = [r for r in relations(scene) if _clear_nearest(scene, r)]
    if not options:
        return None
    r = pick(rng, options)
    what = T.RELATION_WHAT.format(thing=r.thing, direction=r.direction, anchor=r.anchor_phrase)
    answer = r.candidates[0]
    text = reasoning(
        T.ASK.format(what=what),
        T.ANCHOR_AT.format(anchor=r.anchor_phrase, position=position(scene.shapes[r.anchor], scene.size)),
        T.NEAREST.format(thing=r.thing, direction=r.direction, name=name(scene.shapes[answer], scene.size)),
    )
    return Query(relation_question(rng, what, r.thing, r.direction, r.anchor_phrase), text, (answer,))


def multi_object(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'every triangle': a group of two or more shapes, one mask each."""
    options = [g for g in groups(scene) if len(g[1]) >= 2]
    if not options:
        return None
    noun, members, facts = pick(rng, options)
    what = T.EVERY.format(noun=noun)
    text = reasoning(T.ASK.format(what=what), *facts, found(scene, members))
    return Query(ask(rng, T.MULTI_Q, what), text, tuple(members))
