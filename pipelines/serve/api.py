"""The HTTP API's requests and errors, free of Ray and of any web framework.

A ``POST /v1/segment`` body is JSON ``{"image": base64, "query": str, "max_new_tokens"?,
"temperature"?, "outputs"?}`` or multipart (an ``image`` file and a ``query`` field, the other
keys as fields too). Every way a body can be wrong ends in ``ApiError`` with the status a client
can act on, checked cheapest first and before anything large is allocated:

- 413: the body or the image file over ``max_image_bytes``, the image over ``max_image_pixels``
  (read from its header, before its pixels are decoded);
- 415: a body that is neither JSON nor multipart, an image that is not PNG or JPEG;
- 400: an image that does not decode (garbage, truncated, 0 x 0, a side the encoders would
  resize to nothing), an empty query;
- 422: a body that breaks the schema (a missing or unknown key, a wrong type, a value out of
  range, a query over ``max_query_chars``).

The message names the field; it never carries a traceback.
"""
from __future__ import annotations

import base64
import binascii
import hashlib
import io
import json
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, ValidationError

IMAGE_FORMATS = ("PNG", "JPEG")
OUTPUTS = ("rle", "png", "overlay")
JSON_TYPES = ("application/json",)
MULTIPART_TYPES = ("multipart/form-data",)
BASE64_SLACK = 1024
"""Bytes a JSON body may hold beyond the base64 of a largest image (the query and the other keys
are checked on their own)."""


class ApiError(Exception):
    """A request the API answers with ``status`` and ``{"error": message}``."""

    def __init__(self, status: int, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.headers = status, message, headers or {}

    def body(self) -> dict:
        return {"error": self.message}


@dataclass(frozen=True)
class Limits:
    """What a request may hold (the ``serve`` section's caps, the eval's generation cap)."""

    max_image_bytes: int
    max_image_pixels: int
    max_aspect_ratio: float
    max_query_chars: int
    max_new_tokens: int

    @property
    def max_body_bytes(self) -> int:
        """A JSON body carries the image in base64 (4 characters per 3 bytes) plus the query."""
        return 4 * (self.max_image_bytes + 2) // 3 + 4 * self.max_query_chars + BASE64_SLACK


@dataclass(frozen=True)
class SegmentRequest:
    image: np.ndarray  # [H, W, 3] uint8 RGB
    image_hash: str  # SHA-256 of the image file's bytes (the feature cache's key, as precompute's)
    query: str
    max_new_tokens: int
    temperature: float
    outputs: tuple[str, ...] = field(default=("rle",))


class _Fields(BaseModel):
    """The schema of a request's fields (the image comes separately for multipart)."""

    model_config = ConfigDict(extra="forbid", strict=True)
    query: str
    max_new_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(0.0, ge=0, le=2)
    outputs: list[Literal["rle", "png", "overlay"]] = Field(default_factory=lambda: ["rle"], max_length=3)


class _JsonBody(_Fields):
    image: str


def media_type(content_type: str | None) -> str:
    """``multipart/form-data; boundary=...`` -> ``multipart/form-data``."""
    return (content_type or "").split(";", 1)[0].strip().lower()


def check_body_size(content_length: int | None, limits: Limits) -> None:
    """413 before a byte is read when the declared length is over the cap."""
    if content_length is not None and content_length > limits.max_body_bytes:
        raise ApiError(413, f"request body of {content_length} bytes exceeds the cap of {limits.max_body_bytes}")


def parse_json(body: bytes, limits: Limits) -> SegmentRequest:
    check_body_size(len(body), limits)
    try:
        raw = json.loads(body)
    except (ValueError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"body is not valid JSON ({type(exc).__name__})") from None
    fields = _validate(_JsonBody, raw)
    try:
        image = base64.b64decode(fields.image, validate=True)
    except (binascii.Error, ValueError):
        raise ApiError(400, "image: not valid base64") from None
    return _request(image, fields, limits)


def parse_form(image: bytes | None, form: dict[str, str], limits: Limits) -> SegmentRequest:
    """Multipart: the ``image`` file's bytes and the other fields as text (numbers and lists parsed here)."""
    if image is None:
        raise ApiError(422, "image: a multipart request needs an 'image' file")
    raw: dict = dict(form)
    try:
        if "max_new_tokens" in raw:
            raw["max_new_tokens"] = int(raw["max_new_tokens"])
        if "temperature" in raw:
            raw["temperature"] = float(raw["temperature"])
    except ValueError as exc:
        raise ApiError(422, f"multipart field is not a number: {exc}") from None
    if "outputs" in raw:
        raw["outputs"] = [s.strip() for s in str(raw["outputs"]).split(",") if s.strip()]
    return _request(image, _validate(_Fields, raw), limits)


def _validate(model: type[_Fields], raw) -> _Fields:
    if not isinstance(raw, dict):
        raise ApiError(422, f"body must be a JSON object, got {type(raw).__name__}")
    try:
        return model.model_validate(raw)
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(p) for p in first["loc"]) or "body"
        raise ApiError(422, f"{where}: {first['msg']}") from None


def _request(image: bytes, fields: _Fields, limits: Limits) -> SegmentRequest:
    query = fields.query.strip()
    if not query:
        raise ApiError(400, "query: empty")
    if len(query) > limits.max_query_chars:
        raise ApiError(422, f"query: {len(query)} characters, more than the cap of {limits.max_query_chars}")
    max_new = fields.max_new_tokens or limits.max_new_tokens
    if max_new > limits.max_new_tokens:
        raise ApiError(422, f"max_new_tokens: {max_new} exceeds the cap of {limits.max_new_tokens}")
    return SegmentRequest(decode_image(image, limits), hashlib.sha256(image).hexdigest(), query, max_new,
                          fields.temperature, tuple(dict.fromkeys(fields.outputs)))


def decode_image(data: bytes, limits: Limits) -> np.ndarray:
    """RGB uint8 [H, W, 3] of a PNG or JPEG file, its size checked from the header first."""
    from PIL import Image, UnidentifiedImageError

    if len(data) > limits.max_image_bytes:
        raise ApiError(413, f"image of {len(data)} bytes exceeds the cap of {limits.max_image_bytes}")
    if not data:
        raise ApiError(400, "image: empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            if img.format not in IMAGE_FORMATS:
                raise ApiError(415, f"image: {img.format} is not supported (send {' or '.join(IMAGE_FORMATS)})")
            width, height = img.size
            if width * height > limits.max_image_pixels:
                raise ApiError(413, f"image of {height}x{width} pixels exceeds the cap of {limits.max_image_pixels}")
            if min(width, height) < 1:
                raise ApiError(400, f"image: {height}x{width} has no pixels")
            if max(width, height) > limits.max_aspect_ratio * min(width, height):
                raise ApiError(400, f"image: {height}x{width} is more elongated than the cap of "
                                    f"{limits.max_aspect_ratio:g}:1")
            rgb = np.asarray(img.convert("RGB"))
    except Image.DecompressionBombError:
        raise ApiError(413, f"image: more pixels than the cap of {limits.max_image_pixels}") from None
    except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
        raise ApiError(400, f"image: does not decode as PNG or JPEG ({type(exc).__name__})") from None
    return np.ascontiguousarray(rgb)
