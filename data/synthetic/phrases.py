"""Naming shapes in text: descriptions, positions and answer lists.

A description is a tuple of attribute words (size?, colour?, kind); it matches a
shape when every word is one of the shape's attributes. Attribute values never
collide across attributes, so no word can be read two ways.
"""
from __future__ import annotations

from itertools import product

from . import templates as T
from .scene import COLOURS, KINDS, SIZES, Scene, Shape

Description = tuple[str, ...]
# Which attributes a description names, in the order they are spoken.
PATTERNS = (("kind",), ("colour", "kind"), ("size", "kind"), ("size", "colour", "kind"))


def plural(noun: str) -> str:
    """Every noun the generator uses pluralises with a plain -s."""
    return noun + "s"


def join(items: list[str], conjunction: str = T.AND) -> str:
    """'a', 'a and b', 'a, b and c'."""
    return items[0] if len(items) == 1 else T.LIST_SEP.join(items[:-1]) + f" {conjunction} " + items[-1]


def matches(description: Description, shape: Shape) -> bool:
    return all(word in (shape.size, shape.colour, shape.kind) for word in description)


def describe(shape: Shape, pattern: tuple[str, ...]) -> Description:
    return tuple(getattr(shape, attribute) for attribute in pattern)


def descriptions(pattern: tuple[str, ...], kinds: tuple[str, ...] = KINDS) -> list[Description]:
    """Every description following `pattern`, e.g. all size+colour+kind triples."""
    values = {"size": tuple(SIZES), "colour": tuple(COLOURS), "kind": kinds}
    return list(product(*(values[attribute] for attribute in pattern)))


def unique_descriptions(shape: Shape, shapes: tuple[Shape, ...]) -> list[Description]:
    """Descriptions of `shape` that no other shape in the scene matches."""
    own = [describe(shape, pattern) for pattern in PATTERNS]
    return [d for d in own if sum(matches(d, s) for s in shapes) == 1]


def grid_cell(shape: Shape, image_size: int) -> tuple[int, int]:
    """(row, column) of the shape's centre on a 3x3 grid over the image."""
    return min(int(3 * shape.cy / image_size), 2), min(int(3 * shape.cx / image_size), 2)


def position(shape: Shape, image_size: int) -> str:
    row, col = grid_cell(shape, image_size)
    return T.POSITIONS[row][col]


def name(shape: Shape, image_size: int) -> str:
    """Full name used in reasoning: 'the large red circle at the top left'."""
    return T.NAME.format(size=shape.size, colour=shape.colour, kind=shape.kind, position=position(shape, image_size))


def reading_order(scene: Scene, indices: list[int]) -> list[int]:
    """Grid row by grid row, left to right: the order answers are named and masks listed."""
    return sorted(indices, key=lambda i: (grid_cell(scene.shapes[i], scene.size)[0], scene.shapes[i].cx))


def names(scene: Scene, indices: list[int]) -> str:
    return join([name(scene.shapes[i], scene.size) for i in indices])


def inventory(scene: Scene) -> str:
    """Every shape of the scene by its full name, in reading order: 'There are three: X, Y and Z.'"""
    return found(scene, reading_order(scene, list(range(len(scene.shapes)))))


def found(scene: Scene, indices: list[int]) -> str:
    """'There is one: X.' or 'There are three: X, Y and Z.'"""
    if len(indices) == 1:
        return T.FOUND_ONE.format(names=names(scene, indices))
    return T.FOUND_MANY.format(count=T.NUMBERS[len(indices)], names=names(scene, indices))
