"""The query kinds by name, and how often each is drawn by default.

To add a kind, write a maker `(scene, rng) -> Query | None` and list it here;
words it emits must come from templates.py so the vocabulary stays closed.
"""
from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .false_premise import false_premise
from .queries import Query, attribute, function, multi_object, relation, superlative
from .scene import Scene

QueryMaker = Callable[[Scene, np.random.Generator], "Query | None"]

QUERY_KINDS: dict[str, QueryMaker] = {
    "attribute": attribute,
    "function": function,
    "superlative": superlative,
    "relation": relation,
    "multi_object": multi_object,
    "false_premise": false_premise,
}

DEFAULT_WEIGHTS = {name: 1.0 for name in QUERY_KINDS}
