"""Random shape scenes and their exact rasterisation.

Shapes are placed so that they never overlap or touch, and are painted in flat
palette colours on a grey background. Each instance mask is therefore exactly
the set of pixels painted in that shape's colour: the ground truth cannot
disagree with the image.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

COLOURS = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (235, 205, 30),
    "purple": (150, 60, 200),
}
KINDS = ("circle", "square", "triangle", "ring")
# Radius as a fraction of the image side. The ratio is large enough that every
# large shape has more pixels than any small one, whatever the kinds.
SIZES = {"small": 0.09, "large": 0.16}
SHAPES_PER_SCENE = (2, 5)
MIN_IMAGE_SIZE = 48  # below this, small circles and squares are the same few pixels

_EXTENT = 1.15  # farthest painted point from the centre, in radii (square corners)
_GAP = 2.0  # pixels kept free between two shapes' extents
_PLACEMENT_TRIES = 100


def _paint_rule(kind: str, dx: np.ndarray, dy: np.ndarray, r: float) -> np.ndarray:
    """Which pixel centres (offsets dx, dy from the shape centre) a kind covers."""
    if kind == "circle":
        return dx**2 + dy**2 <= r**2
    if kind == "ring":
        d2 = dx**2 + dy**2
        return (d2 <= r**2) & (d2 >= (0.5 * r) ** 2)
    if kind == "square":
        return (np.abs(dx) <= 0.8 * r) & (np.abs(dy) <= 0.8 * r)
    if kind == "triangle":  # apex up, base below the centre
        return (dy >= -r) & (dy <= 0.6 * r) & (np.abs(dx) <= 0.9 * (dy + r) / 1.6)
    raise ValueError(f"unknown shape kind {kind!r}; known: {KINDS}")


@dataclass(frozen=True, eq=False)
class Shape:
    """One painted object: its attributes, centre, radius and exact pixel mask."""

    kind: str
    colour: str
    size: str
    cx: float
    cy: float
    radius: float
    mask: np.ndarray  # bool [H, W]

    def box(self) -> tuple[int, int, int, int]:
        """Inclusive pixel extent (x0, x1, y0, y1) of the mask."""
        ys, xs = np.nonzero(self.mask)
        return int(xs.min()), int(xs.max()), int(ys.min()), int(ys.max())


@dataclass(frozen=True, eq=False)
class Scene:
    """An RGB image (uint8 [S, S, 3]) and the shapes painted on it."""

    image: np.ndarray
    shapes: tuple[Shape, ...]

    @property
    def size(self) -> int:
        return self.image.shape[0]


def rasterise(kind: str, cx: float, cy: float, radius: float, image_size: int) -> np.ndarray:
    """Bool mask of the pixels whose centres fall inside the shape."""
    ys, xs = np.mgrid[0:image_size, 0:image_size] + 0.5
    return _paint_rule(kind, xs - cx, ys - cy, radius)


def _place(rng: np.random.Generator, radii: list[float], image_size: int) -> list[tuple[float, float]] | None:
    """Rejection-sample centres with disjoint extents; None if the shapes don't fit."""
    centres: list[tuple[float, float]] = []
    for r in radii:
        lo, hi = _EXTENT * r + 1, image_size - _EXTENT * r - 1
        for _ in range(_PLACEMENT_TRIES):
            x, y = rng.uniform(lo, hi, size=2)
            if all(np.hypot(x - px, y - py) >= _EXTENT * (r + pr) + _GAP for (px, py), pr in zip(centres, radii)):
                centres.append((float(x), float(y)))
                break
        else:
            return None
    return centres


def _background(rng: np.random.Generator, image_size: int) -> np.ndarray:
    """Plain or noisy grey: never equal to a (saturated) palette colour."""
    grey = np.full((image_size, image_size, 1), rng.integers(30, 226), dtype=np.float64)
    if rng.random() < 0.5:
        grey = grey + rng.normal(0.0, 10.0, size=grey.shape)
    return np.repeat(np.clip(np.rint(grey), 0, 255).astype(np.uint8), 3, axis=2)


def check_image_size(image_size: int) -> None:
    if image_size < MIN_IMAGE_SIZE:
        raise ValueError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def random_scene(rng: np.random.Generator, image_size: int = 64) -> Scene:
    """A scene of 2-5 random shapes (kind, colour, size, position) on a grey background."""
    check_image_size(image_size)
    colours, sizes = list(COLOURS), list(SIZES)
    while True:
        n = int(rng.integers(SHAPES_PER_SCENE[0], SHAPES_PER_SCENE[1] + 1))
        specs = [(KINDS[rng.integers(len(KINDS))], colours[rng.integers(len(colours))], sizes[rng.integers(len(sizes))])
                 for _ in range(n)]
        radii = [SIZES[size] * image_size for _, _, size in specs]
        centres = _place(rng, radii, image_size)
        if centres is not None:
            break
    image = _background(rng, image_size)
    shapes = []
    for (kind, colour, size), r, (cx, cy) in zip(specs, radii, centres):
        mask = rasterise(kind, cx, cy, r, image_size)
        image[mask] = COLOURS[colour]
        shapes.append(Shape(kind, colour, size, cx, cy, r, mask))
    return Scene(image, tuple(shapes))
