"""The serving API's Ray-free core: request checks and their statuses, masks as COCO RLE, the answer's shape."""
from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra.numpy import arrays
from PIL import Image
from pycocotools import mask as coco_mask
from refusals import png_header

from data.rle import decode_rle
from pipelines.serve import api, response
from pipelines.serve.api import ApiError, Limits

LIMITS = Limits(max_image_bytes=200_000, max_image_pixels=256 * 256, max_aspect_ratio=8, max_query_chars=100,
                max_new_tokens=32)


def png(height: int, width: int, fmt: str = "PNG", seed: int = 0) -> bytes:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format=fmt)
    return buffer.getvalue()


def body(image: bytes, **fields) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), "query": "the red circle", **fields}).encode()


def status_of(fn, *args) -> int:
    with pytest.raises(ApiError) as info:
        fn(*args)
    assert info.value.message and "Traceback" not in info.value.message
    return info.value.status


def test_json_request_parses_to_pixels_hash_and_defaults():
    data = png(20, 30)
    req = api.parse_json(body(data), LIMITS)
    assert req.image.shape == (20, 30, 3) and req.image.dtype == np.uint8
    assert np.array_equal(req.image, np.asarray(Image.open(io.BytesIO(data)).convert("RGB")))
    assert len(req.image_hash) == 64 and req.query == "the red circle"
    assert (req.max_new_tokens, req.temperature, req.outputs) == (32, 0.0, ("rle",))
    req = api.parse_json(body(data, max_new_tokens=8, temperature=0.5, outputs=["overlay", "rle", "rle"]), LIMITS)
    assert (req.max_new_tokens, req.temperature, req.outputs) == (8, 0.5, ("overlay", "rle"))


def test_jpeg_is_accepted_and_other_formats_are_415():
    assert api.parse_json(body(png(16, 16, "JPEG")), LIMITS).image.shape == (16, 16, 3)
    assert status_of(api.parse_json, body(png(16, 16, "GIF")), LIMITS) == 415
    assert status_of(api.parse_json, body(png(16, 16, "BMP")), LIMITS) == 415


@pytest.mark.parametrize("raw, status", [
    (b"\x00\xffgarbage bytes, not an image", 400),
    (b"", 400),
    (png_header(0, 0), 400),
    (png_header(10, 0), 400),
    (png(40, 2), 400),                       # 20:1, over the aspect cap: SAM's resize would lose a side
    (png(300, 300), 413),                    # 90,000 pixels over the 65,536 cap
    (png_header(100_000, 100_000), 413),  # the header alone is refused: nothing is allocated
    (png(64, 64)[:60], 400),                 # truncated
])
def test_bad_images(raw, status):
    assert status_of(api.decode_image, raw, LIMITS) == status


def test_byte_caps_are_413():
    assert status_of(api.decode_image, b"\x89PNG" + bytes(LIMITS.max_image_bytes), LIMITS) == 413
    assert status_of(api.check_body_size, LIMITS.max_body_bytes + 1, LIMITS) == 413
    api.check_body_size(LIMITS.max_body_bytes, LIMITS)
    huge_query = json.dumps({"image": "", "query": "x" * (LIMITS.max_body_bytes + 1)}).encode()
    assert status_of(api.parse_json, huge_query, LIMITS) == 413


@pytest.mark.parametrize("payload, status", [
    (b"{not json", 400),
    (b"[1, 2]", 422),
    (json.dumps({"query": "a"}).encode(), 422),                                  # no image
    (json.dumps({"image": "aGk=", "query": "a", "colour": 1}).encode(), 422),    # unknown key
    (json.dumps({"image": "aGk=", "query": 3}).encode(), 422),                   # wrong type
    (json.dumps({"image": "!!!not base64", "query": "a"}).encode(), 400),
])
def test_bad_bodies(payload, status):
    assert status_of(api.parse_json, payload, LIMITS) == status


@pytest.mark.parametrize("fields, status", [
    ({"query": "   "}, 400),
    ({"query": "x" * 101}, 422),
    ({"max_new_tokens": 33}, 422),
    ({"max_new_tokens": 0}, 422),
    ({"temperature": -1}, 422),
    ({"outputs": ["mask"]}, 422),
])
def test_bad_fields(fields, status):
    assert status_of(api.parse_json, body(png(8, 8), **fields), LIMITS) == status


def test_multipart_fields_are_parsed_and_checked():
    req = api.parse_form(png(12, 10), {"query": "a ring", "max_new_tokens": "4", "outputs": "rle, overlay"}, LIMITS)
    assert (req.image.shape, req.query, req.max_new_tokens, req.outputs) == (
        (12, 10, 3), "a ring", 4, ("rle", "overlay"))
    assert status_of(api.parse_form, None, {"query": "a"}, LIMITS) == 422
    assert status_of(api.parse_form, png(8, 8), {"query": "a", "temperature": "warm"}, LIMITS) == 422
    assert status_of(api.parse_form, png(8, 8), {"query": "a", "colour": "red"}, LIMITS) == 422


def test_media_type_ignores_parameters():
    assert api.media_type("multipart/form-data; boundary=xyz") == "multipart/form-data"
    assert api.media_type("Application/JSON") == "application/json"
    assert api.media_type(None) == ""


@settings(max_examples=60, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 40), st.integers(1, 40))))
def test_rle_round_trip_at_any_size(mask):
    rle = response.encode_mask(mask)
    assert rle["size"] == list(mask.shape) and isinstance(rle["counts"], str)
    assert np.array_equal(decode_rle(rle), mask)
    assert np.array_equal(coco_mask.decode({"size": rle["size"], "counts": rle["counts"].encode()}).astype(bool), mask)
    bbox = response.mask_bbox(mask)
    assert bbox == [int(v) for v in coco_mask.toBbox({"size": rle["size"], "counts": rle["counts"].encode()})]
    if mask.any():
        x, y, w, h = bbox
        assert mask[y:y + h, x:x + w].sum() == mask.sum()


@settings(max_examples=30, deadline=None)
@given(arrays(np.bool_, st.tuples(st.integers(1, 16), st.integers(1, 16))), st.integers(0, 2**31 - 1))
def test_overlay_tints_only_the_mask(mask, seed):
    image = np.random.default_rng(seed).integers(0, 256, (*mask.shape, 3), dtype=np.uint8)
    out = response.overlay(image, [mask])
    assert np.array_equal(out[~mask], image[~mask])
    assert (out[mask][:, 0].astype(int) >= image[mask][:, 0]).all()
    assert np.array_equal(response.overlay(image, []), image)


@pytest.mark.parametrize("text, reasoning, answer", [
    ("<think>round and red</think> it is <SEG>", "round and red", "it is <SEG>"),
    ("no tags <SEG>", "", "no tags <SEG>"),
    ("</think>backwards<think>", "", "</think>backwards<think>"),
])
def test_split_answer(text, reasoning, answer):
    assert response.split_answer(text, "<SEG>") == (reasoning, answer)


def test_response_shape_with_and_without_target():
    image = np.zeros((5, 7, 3), np.uint8)
    mask = np.zeros((5, 7), bool)
    mask[1:3, 2:6] = True
    body = response.segment_response(image, "<think>r</think> a <SEG>", "<SEG>", [mask], [0.75],
                                     ("rle", "png", "overlay"), 3, {"encode": 1.234})
    assert body["has_target"] and body["image_size"] == [5, 7] and body["weights_version"] == 3
    (entry,) = body["masks"]
    assert entry["bbox"] == [2, 1, 4, 2] and entry["area"] == 8 and entry["score"] == 0.75
    assert np.array_equal(decode_rle(entry["rle"]), mask)
    assert np.array_equal(np.asarray(Image.open(io.BytesIO(base64.b64decode(entry["png"])))) > 0, mask)
    assert np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"])))).shape == (5, 7, 3)
    assert body["timings_ms"] == {"encode": 1.23}
    refusal = response.segment_response(image, "<think>none</think> no such object", "<SEG>", None, [], ("rle",), 1, {})
    assert refusal["has_target"] is False and refusal["masks"] == [] and "overlay_png" not in refusal


def test_serve_section_is_typed_and_checked():
    from config import ConfigError, load_config

    config = load_config("configs/tiny.yaml", ["serve.policy.max_batch_size=4", "serve.segment.num_replicas=2"])
    assert config.serve.host == "127.0.0.1"
    policy = config.serve.policy.serve_options()
    assert (policy["max_ongoing_requests"], policy["max_queued_requests"], policy["num_replicas"]) == (16, 64, 1)
    assert config.serve.segment.serve_options()["num_replicas"] == 2
    autoscaling = "serve.policy.autoscaling_config={max_replicas: 3, target_ongoing_requests: 4}"
    scaled = load_config("configs/tiny.yaml", [autoscaling]).serve.policy.serve_options()
    assert "num_replicas" not in scaled and scaled["autoscaling_config"]["max_replicas"] == 3
    for bad in ["serve.policy.max_batch_size=64", "serve.port=0", "serve.colour=red",
                "serve.segment.num_replicas=2", "serve.max_image_pixels=1000000000000"]:
        extra = ["serve.segment.autoscaling_config={max_replicas: 2}"] if "num_replicas" in bad else []
        with pytest.raises(ConfigError):
            load_config("configs/tiny.yaml", [bad, *extra])


def test_the_policy_generator_is_a_known_one_and_vllm_replicas_get_the_rollout_engine_environment():
    import typing

    from actors.rollout import ENGINE_ENV
    from config import ConfigError, load_config
    from config.serve import PolicyDeploymentOptions
    from models.generators import GENERATORS
    from pipelines.serve.app import serve_config

    allowed = typing.get_args(PolicyDeploymentOptions.model_fields["generator"].annotation)
    assert set(allowed) == set(GENERATORS.names())
    for generator, env in (("vllm", ENGINE_ENV), ("transformers", None)):
        config = load_config("configs/tiny.yaml", [f"serve.policy.generator={generator}"])
        deployments = {d["name"]: d for d in serve_config(config, None, 0)["applications"][0]["deployments"]}
        actor = deployments["policy"]["ray_actor_options"]
        assert actor.get("runtime_env", {}).get("env_vars") == env
        assert "runtime_env" not in deployments["segment"]["ray_actor_options"]
    with pytest.raises(ConfigError):
        load_config("configs/tiny.yaml", ["serve.policy.generator=hf"])
