"""Alignment data for the tiny LM: an instruction about a scene and its grounded answer.

Real LLaVA and Qwen-VL arrive pretrained on image-text pairs: asked what is in
an image, they name it. The tiny LM gets the same start from these pairs on
fresh scenes before any segmentation fine-tuning: "Describe the image." lists
every shape by its full name in reading order; "List every red shape." lists a
group (a kind or a colour), or says there is none. The answers are the
sentences the reasoning traces use, so SFT builds on them.
"""
from __future__ import annotations

import numpy as np

from . import templates as T
from .phrases import found, inventory, reading_order
from .queries import pick
from .scene import COLOURS, KINDS, Scene


def describe(scene: Scene) -> tuple[str, str]:
    return T.DESCRIBE_Q, inventory(scene)


def list_group(scene: Scene, noun: str, members: list[int]) -> tuple[str, str]:
    what = T.EVERY.format(noun=noun)
    answer = found(scene, reading_order(scene, members)) if members else T.ABSENT.format(what=noun)
    return T.LIST_Q.format(what=what), answer


def group_members(scene: Scene) -> dict[str, list[int]]:
    """Every kind and colour group's noun -> its shapes (possibly none)."""
    out = {kind: [i for i, s in enumerate(scene.shapes) if s.kind == kind] for kind in KINDS}
    for colour in COLOURS:
        out[T.COLOURED_SHAPE.format(colour=colour)] = [i for i, s in enumerate(scene.shapes) if s.colour == colour]
    return out


def alignment_pair(scene: Scene, rng: np.random.Generator, describe_share: float = 0.5) -> tuple[str, str]:
    """One (instruction, answer) about `scene`: a description, else a group listing (half of them present)."""
    if rng.random() < describe_share:
        return describe(scene)
    groups = group_members(scene)
    present = [n for n, m in groups.items() if m]
    absent = [n for n, m in groups.items() if not m]
    noun = pick(rng, present if not absent or rng.random() < 0.5 else absent)
    return list_group(scene, noun, groups[noun])

