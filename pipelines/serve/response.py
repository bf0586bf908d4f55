"""The answer of ``POST /v1/segment``: masks as COCO RLE at the request image's size, the text split
into reasoning and answer, an optional overlay, the weights version and timings.

Masks are encoded with pycocotools (so any COCO tool decodes them); ``bbox`` is COCO's
``[x, y, w, h]`` of the mask's pixels and ``area`` their count. A false premise (no reference
token in the answer) is ``has_target: false`` with no masks.
"""
from __future__ import annotations

import base64
import io

import numpy as np

from rewards.format import THINK_CLOSE, THINK_OPEN

OVERLAY_RGB = (255, 0, 0)
OVERLAY_ALPHA = 0.5


def split_answer(text: str, ref_token: str) -> tuple[str, str]:
    """(reasoning inside <think> </think>, the rest) of a response; without both tags all of it is the answer."""
    if (text.count(THINK_OPEN) == 1 and text.count(THINK_CLOSE) == 1
            and text.index(THINK_OPEN) < text.index(THINK_CLOSE)):
        head, rest = text.split(THINK_OPEN, 1)
        reasoning, tail = rest.split(THINK_CLOSE, 1)
        return reasoning.strip(), (head + tail).strip()
    return "", text.strip()


def encode_mask(mask: np.ndarray) -> dict:
    """COCO compressed RLE ``{"size": [H, W], "counts": str}`` of a bool [H, W] mask."""
    from pycocotools import mask as coco_mask

    rle = coco_mask.encode(np.asfortranarray(mask.astype(np.uint8)))
    return {"size": [int(v) for v in rle["size"]], "counts": rle["counts"].decode("ascii")}


def mask_bbox(mask: np.ndarray) -> list[int]:
    """COCO ``[x, y, w, h]`` of the set pixels; ``[0, 0, 0, 0]`` for an empty mask."""
    rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
    if rows.size == 0:
        return [0, 0, 0, 0]
    return [int(cols[0]), int(rows[0]), int(cols[-1] - cols[0] + 1), int(rows[-1] - rows[0] + 1)]


def png_base64(pixels: np.ndarray) -> str:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def overlay(image: np.ndarray, masks: list[np.ndarray]) -> np.ndarray:
    """The image with the union of ``masks`` tinted red (half opacity)."""
    out = image.astype(np.float32)
    if masks:
        union = np.logical_or.reduce(masks)
        out[union] = (1 - OVERLAY_ALPHA) * out[union] + OVERLAY_ALPHA * np.asarray(OVERLAY_RGB, np.float32)
    return out.round().astype(np.uint8)


def segment_response(image: np.ndarray, text: str, ref_token: str, masks: list[np.ndarray] | None,
                     scores: list[float], outputs: tuple[str, ...], weights_version: int,
                     timings_ms: dict[str, float]) -> dict:
    """The JSON answer; ``masks`` None means the answer named no object (a false premise)."""
    reasoning, answer = split_answer(text, ref_token)
    entries = []
    for mask, score in zip(masks or [], scores):
        entry = {"score": float(score), "bbox": mask_bbox(mask), "area": int(mask.sum())}
        if "rle" in outputs:
            entry["rle"] = encode_mask(mask)
        if "png" in outputs:
            entry["png"] = png_base64(mask.astype(np.uint8) * 255)
        entries.append(entry)
    body = {"reasoning": reasoning, "answer": answer, "has_target": masks is not None, "masks": entries,
            "image_size": [int(image.shape[0]), int(image.shape[1])], "weights_version": int(weights_version),
            "timings_ms": {k: round(float(v), 2) for k, v in timings_ms.items()}}
    if "overlay" in outputs:
        body["overlay_png"] = png_base64(overlay(image, masks or []))
    return body
