"""Synthetic reasoning-segmentation dataset: shapes, one-step-reasoning queries, false premises.

Modules: scene (random scenes, rasterisation), templates (all text), phrases
(naming shapes), queries / false_premise (query kinds), registry (kind names and
weights), vocab (closed word list), targets (SFT targets, tokenizer corpus),
generate (splits on disk).
"""
from .generate import DATASET, SPLITS, make_synthetic, query_kind
from .registry import DEFAULT_WEIGHTS, QUERY_KINDS
from .scene import COLOURS, KINDS, SIZES, Scene, Shape, random_scene
from .targets import DEFAULT_REF_TOKEN, THINK_CLOSE, THINK_OPEN, corpus, sft_target
from .templates import NO_TARGET_ANSWER
from .vocab import WORDS, words

__all__ = [
    "COLOURS", "DATASET", "DEFAULT_REF_TOKEN", "DEFAULT_WEIGHTS", "KINDS", "NO_TARGET_ANSWER", "QUERY_KINDS",
    "SIZES", "SPLITS", "Scene", "Shape", "THINK_CLOSE", "THINK_OPEN", "WORDS", "corpus", "make_synthetic",
    "query_kind", "random_scene", "sft_target", "words",
]
