"""False-premise queries: worded like the answerable kinds, but nothing in the
image fits, so the right answer is "no such object" and no mask.

Sharing the answerable kinds' templates means the question alone never tells
whether there is a target (except for never-drawn kinds such as "star"): the
model has to look at the image.
"""
from __future__ import annotations

import numpy as np

from . import templates as T
from .phrases import PATTERNS, descriptions, join, matches, position
from .queries import Query, ask, groups, having, pick, reasoning, relation_question, relations
from .scene import KINDS, Scene


def _absent_descriptions(scene: Scene, rng: np.random.Generator) -> list[tuple[str, ...]]:
    """Descriptions of a random pattern that no shape matches (never empty: stars are never drawn)."""
    pattern = pick(rng, PATTERNS)
    return [d for d in descriptions(pattern, KINDS + T.ABSENT_KINDS) if not any(matches(d, s) for s in scene.shapes)]


def absent_object(scene: Scene, rng: np.random.Generator) -> Query:
    """'the purple star', 'the small red circle' when there is none."""
    noun = " ".join(pick(rng, _absent_descriptions(scene, rng)))
    what = T.THE.format(noun=noun)
    return Query(ask(rng, T.ATTRIBUTE_Q, what), reasoning(T.ASK.format(what=what), T.ABSENT.format(what=noun)))


def absent_function(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'Which shape could roll?' when there is no circle or ring."""
    clauses = [c for c in T.FUNCTIONS if not having(scene, c)]
    if not clauses:
        return None
    clause = pick(rng, clauses)
    kinds, fact = T.FUNCTIONS[clause]
    what = T.THE.format(noun=T.SHAPE_THAT.format(clause=clause))
    text = reasoning(T.ASK.format(what=what), fact, T.ABSENT.format(what=join(list(kinds), T.OR)))
    return Query(ask(rng, T.FUNCTION_Q, what, clause=clause), text)


def absent_relation(scene: Scene, rng: np.random.Generator) -> Query | None:
    """'the circle right of the red square' when no circle is right of it."""
    options = [r for r in relations(scene) if not r.candidates]
    if not options:
        return None
    r = pick(rng, options)
    what = T.RELATION_WHAT.format(thing=r.thing, direction=r.direction, anchor=r.anchor_phrase)
    text = reasoning(
        T.ASK.format(what=what),
        T.ANCHOR_AT.format(anchor=r.anchor_phrase, position=position(scene.shapes[r.anchor], scene.size)),
        T.NONE_BEYOND.format(thing=r.thing, direction=r.direction),
    )
    return Query(relation_question(rng, what, r.thing, r.direction, r.anchor_phrase), text)


def absent_anchor(scene: Scene, rng: np.random.Generator) -> Query:
    """'What is left of the purple star?': the shape the relation hangs on is missing."""
    anchor = " ".join(pick(rng, _absent_descriptions(scene, rng)))
    thing, direction = pick(rng, (T.SHAPE, *KINDS)), pick(rng, T.DIRECTIONS)
    what = T.RELATION_WHAT.format(thing=thing, direction=direction, anchor=anchor)
    text = reasoning(T.ASK.format(what=what), T.ABSENT.format(what=anchor))
    return Query(relation_question(rng, what, thing, direction, anchor), text)


def absent_group(scene: Scene, rng: np.random.Generator) -> Query:
    """'every triangle' when there is no triangle."""
    options = [g for g in groups(scene) if not g[1]]
    options += [(kind, [], ()) for kind in T.ABSENT_KINDS]
    noun, _, facts = pick(rng, options)
    what = T.EVERY.format(noun=noun)
    return Query(ask(rng, T.MULTI_Q, what), reasoning(T.ASK.format(what=what), *facts, T.ABSENT.format(what=noun)))


_VARIANTS = (absent_object, absent_function, absent_relation, absent_anchor, absent_group)


def false_premise(scene: Scene, rng: np.random.Generator) -> Query | None:
    """One of the variants above, chosen at random among those the scene allows."""
    for v in rng.permutation(len(_VARIANTS)):
        query = _VARIANTS[v](scene, rng)
        if query is not None:
            return query
    return None
