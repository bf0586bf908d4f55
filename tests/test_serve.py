"""`segrl serve` on the session's Ray cluster, over HTTP on 127.0.0.1: the answer of a served model
equals `segrl eval`'s, false premises, every error status, backpressure, timeouts, and a hot swap
from a followed run while requests keep coming.

The Serve application starts once for the module, following a run folder that has no model yet
(503), then gets one: the tiny READ model, fitted for a few seconds on three samples (two with a
target, one false premise) so that it answers them in the trained format.
"""
from __future__ import annotations

import base64
import io
import json
import socket
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from tests_support import encode_images, overrides_for

from config import load_config
from config.builders import build_segmenter, feature_store, head_spec
from data.loader import SegDataset
from data.rle import decode_rle
from data.schema import read_samples, resolve_image
from models.optim import build_optimizer, param_groups
from models.segmenter import save_segmenter
from pipelines.evaluate import answer_batch, evaluate_with_config, predicted_mask
from pipelines.serve.app import absolute_paths, deploy, serve_config
from pipelines.serve.run import follow_loop, start
from pipelines.sft import sft_step

FIT_STEPS = 400
CHECK_EVERY = 25
MIN_FIT_IOU = 0.3


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call(port: int, path: str, data: bytes | None = None, content_type: str = "application/json",
         timeout: float = 120) -> tuple[int, dict, dict | str]:
    """(status, headers with lower-case names, JSON body or text) of one request to the served app."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data,
                                     headers={"Content-Type": content_type} if data is not None else {})
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            status, headers, raw = reply.status, dict(reply.headers), reply.read()
    except urllib.error.HTTPError as exc:
        status, headers, raw = exc.code, dict(exc.headers), exc.read()
    headers = {k.lower(): v for k, v in headers.items()}
    try:
        return status, headers, json.loads(raw)
    except ValueError:
        return status, headers, raw.decode(errors="replace")


def segment_body(image: bytes, query: str, **fields) -> bytes:
    return json.dumps({"image": base64.b64encode(image).decode(), "query": query, **fields}).encode()


def multipart(fields: dict[str, str], image: bytes) -> tuple[bytes, str]:
    boundary = "segrl-test-boundary"
    parts = [f'--{boundary}\r\nContent-Disposition: form-data; name="{k}"\r\n\r\n{v}\r\n'.encode()
             for k, v in fields.items()]
    parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="image"; filename="x.png"\r\n'
                 f"Content-Type: image/png\r\n\r\n".encode() + image + b"\r\n")
    return b"".join(parts) + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


class OneItem:
    """One item of a dataset, as ``evaluate`` reads a dataset."""

    def __init__(self, dataset: SegDataset, index: int):
        self.item = dataset[index]

    def __len__(self) -> int:
        return 1

    def __getitem__(self, index: int):
        return self.item


def fit(config, items, img_size: int):
    """SFT steps on ``items`` until the greedy answers have a reference token exactly for the targets and
    each target's mask overlaps its ground truth by IoU >= MIN_FIT_IOU."""
    torch.manual_seed(0)
    model, tokenizer, _ = build_segmenter(config)
    optimizer = build_optimizer(param_groups(model.param_modules(), 1e-3, {"mask_decoder": 4.0}))
    wanted = [not it.sample.no_target for it in items]
    for step in range(1, FIT_STEPS + 1):
        loss, _ = sft_step(model, tokenizer, items, config)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        if step % CHECK_EVERY == 0:
            model.eval()
            _, _, heads = answer_batch(model, tokenizer, items, config.model.ref_token, config.eval_max_new_tokens)
            model.train()
            if [h is not None for h in heads] == wanted and all(
                    iou(predicted_mask(h, it, img_size, 1, 0.5), it.sample.gt_stack.any(0)) >= MIN_FIT_IOU
                    for h, it in zip(heads, items) if h is not None):
                return model, tokenizer
    raise AssertionError(f"{FIT_STEPS} SFT steps did not teach the tiny model its three answers")


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.logical_and(a, b).sum() / max(np.logical_or(a, b).sum(), 1))


@pytest.fixture(scope="module")
def served(tiny_workspace, ray_cluster, tmp_path_factory):
    from ray import serve

    tmp = tmp_path_factory.mktemp("serve")
    port = free_port()
    config = absolute_paths(load_config("configs/tiny.yaml", overrides_for(tiny_workspace["config"]) + [
        "model.head.kind=read", f"model.sae.path={tmp}/no-sae", f"paths.cache_dir={tmp}/cache",
        "eval.max_new_tokens=64", f"serve.port={port}", "serve.max_image_bytes=65536",
        "serve.max_image_pixels=16384", "serve.max_query_chars=200", "serve.follow_interval_s=0.2",
        "serve.policy.max_ongoing_requests=4", "serve.policy.max_batch_size=4", "serve.policy.max_queued_requests=4"]))
    root = Path(config.resolve_path(config.data.root))
    val, train = root / "val.parquet", root / "train.parquet"
    val_samples = read_samples(val)
    targets = [i for i, s in enumerate(val_samples) if not s.no_target][:2]
    refusal = next(i for i, s in enumerate(read_samples(train)) if s.no_target)
    paths = [resolve_image(val, val_samples[i].image_path) for i in targets]
    paths.append(resolve_image(train, read_samples(train)[refusal].image_path))
    encoders, _ = encode_images(config, paths)
    store = feature_store(config)
    img_size = encoders.sam_size
    val_set, train_set = SegDataset(val, store, img_size), SegDataset(train, store, img_size)
    items = [val_set[i] for i in targets] + [train_set[refusal]]

    run = tmp / "run"
    run.mkdir()
    follower = start(config, None, str(run))
    no_model = [call(port, "/healthz"), call(port, "/v1/segment", segment_body(paths[0].read_bytes(), "a circle"))]

    model, tokenizer = fit(config, items, img_size)
    source = config.resolve_path(config.model.name_or_path)
    checkpoint = save_segmenter(model, head_spec(config), tokenizer, source, tmp / "checkpoint")
    save_segmenter(model, head_spec(config), tokenizer, source, run / "model")
    stop = threading.Event()
    follower_thread = threading.Thread(target=follow_loop, args=(config, follower, stop), daemon=True)
    follower_thread.start()
    deadline = time.monotonic() + 300
    while call(port, "/healthz")[0] != 200:
        assert time.monotonic() < deadline, "the followed run's model was not served within 300 s"
        time.sleep(0.5)
    yield {"config": config, "port": port, "paths": paths, "items": items, "checkpoint": checkpoint,
           "val_set": val_set, "targets": targets, "no_model": no_model, "model": model, "tokenizer": tokenizer,
           "run": run, "follower": follower, "source": source}
    stop.set()
    follower_thread.join(timeout=30)
    serve.delete("segrl")
    serve.shutdown()


def test_no_model_yet_is_503_with_retry_after(served):
    for status, headers, body in served["no_model"]:
        assert status == 503 and headers.get("retry-after") == "1"
        assert "no model" in (body.get("error") or body.get("status"))


def test_health_names_model_head_and_version(served):
    status, _, body = call(served["port"], "/healthz")
    assert status == 200 and body["status"] == "ok" and body["head"] == "read"
    assert body["weights_version"] >= 1 and body["model"] == served["follower"].served  # the run's model/, as taken
    assert Path(body["model"]).is_relative_to((served["run"] / "serving").resolve())


def test_answer_and_mask_equal_the_eval_path(served):
    """The served mask of a val sample scores the IoU `segrl eval` gives that sample with the same model folder."""
    config, item = served["config"], served["items"][0]
    model, tokenizer, img_size = build_segmenter(config, str(served["checkpoint"]))
    expected = evaluate_with_config(config, model, tokenizer, OneItem(served["val_set"], served["targets"][0]),
                                    img_size, progress=False)
    status, _, body = call(served["port"], "/v1/segment", segment_body(served["paths"][0].read_bytes(),
                                                                       item.sample.question))
    assert status == 200, body
    height, width = item.sample.height, item.sample.width
    assert body["has_target"] and body["image_size"] == [height, width] and body["weights_version"] == 1
    masks = [decode_rle(m["rle"]) for m in body["masks"]]
    assert masks and all(m.shape == (height, width) for m in masks)
    assert all(0 <= m["score"] <= 1 and m["area"] == int(mask.sum()) for m, mask in zip(body["masks"], masks))
    served_iou = iou(np.logical_or.reduce(masks), item.sample.gt_stack.any(0))
    assert served_iou >= MIN_FIT_IOU
    assert served_iou == pytest.approx(expected.metrics["giou"], abs=1e-9)
    reasoning = expected.responses[0].split("<think>")[1].split("</think>")[0].strip()
    assert body["reasoning"] == reasoning and "<SEG>" in body["answer"]
    assert set(body["timings_ms"]) >= {"encode", "generate", "segment", "total"}


def test_false_premise_is_200_without_masks(served):
    item = served["items"][2]
    status, _, body = call(served["port"], "/v1/segment", segment_body(served["paths"][2].read_bytes(),
                                                                       item.sample.question, outputs=["overlay"]))
    assert status == 200, body
    # the API's contract: an answer without the reference token is "no target" (the tiny model fitted on three
    # samples need not word its refusal the same alone as in the fitting batch)
    assert body["has_target"] is False and body["masks"] == []
    assert served["config"].model.ref_token not in body["answer"]
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
    assert np.array_equal(overlay, np.asarray(Image.open(served["paths"][2]).convert("RGB")))


def test_multipart_with_overlay_and_png_masks(served):
    item = served["items"][1]
    data, content_type = multipart({"query": item.sample.question, "outputs": "rle,png,overlay"},
                                   served["paths"][1].read_bytes())
    status, _, body = call(served["port"], "/v1/segment", data, content_type)
    assert status == 200, body
    assert body["has_target"] and body["masks"]
    mask = decode_rle(body["masks"][0]["rle"])
    png = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["masks"][0]["png"])))) > 0
    assert np.array_equal(png, mask)
    image = np.asarray(Image.open(served["paths"][1]).convert("RGB"))
    overlay = np.asarray(Image.open(io.BytesIO(base64.b64decode(body["overlay_png"]))))
    assert overlay.shape == image.shape and np.array_equal(overlay[~mask], image[~mask])


def test_page_is_served(served):
    status, headers, body = call(served["port"], "/")
    assert status == 200 and headers["content-type"].startswith("text/html")
    assert "/v1/segment" in body and "No such object" in body


def test_every_error_status_is_json(served):
    port, image = served["port"], served["paths"][0].read_bytes()
    big = np.random.default_rng(0).integers(0, 256, (200, 200, 3), dtype=np.uint8)
    cases = [
        (segment_body(b"\x00garbage, not an image", "a circle"), "application/json", 400),
        (segment_body(b"\x89PNG\r\n\x1a\n" + bytes(30), "a circle"), "application/json", 400),
        (segment_body(_zero_png(), "a circle"), "application/json", 400),
        (segment_body(image, "   "), "application/json", 400),
        (segment_body(png_bytes(big), "a circle"), "application/json", 413),
        (segment_body(image, "x" * 300_000), "application/json", 413),
        (segment_body(image, "x" * 5000), "application/json", 422),
        (b"query=a", "text/plain", 415),
        (json.dumps({"image": base64.b64encode(image).decode()}).encode(), "application/json", 422),
        (segment_body(image, "a circle", max_new_tokens=10_000), "application/json", 422),
        (b"{not json", "application/json", 400),
    ]
    for data, content_type, expected in cases:
        status, _, body = call(port, "/v1/segment", data, content_type)
        assert status == expected, (expected, body)
        assert isinstance(body, dict) and set(body) == {"error"} and "Traceback" not in body["error"]
    status, _, body = call(port, "/v1/nothing-here", b"{}")
    assert status == 404 and set(body) == {"error"}
    assert call(port, "/healthz")[0] == 200  # nothing above hurt the replicas


def _zero_png() -> bytes:
    """A PNG header claiming 0 x 0 pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", 0, 0, 8, 2, 0, 0, 0)) + chunk(b"IEND", b"")


def test_full_queue_is_503_with_retry_after(served):
    """32 clients at once against a policy that runs 4 and queues 4: the rest are refused, nothing fails."""
    port, item = served["port"], served["items"][0]
    data = segment_body(served["paths"][0].read_bytes(), item.sample.question)
    with ThreadPoolExecutor(32) as pool:
        replies = list(pool.map(lambda _: call(port, "/v1/segment", data), range(32)))
    statuses = [r[0] for r in replies]
    assert set(statuses) <= {200, 503} and statuses.count(200) >= 4 and statuses.count(503) >= 1, statuses
    assert all(h.get("retry-after") == "1" for s, h, _ in replies if s == 503)
    assert all(b["has_target"] and b["masks"] for s, _, b in replies if s == 200)


def test_timeout_is_408(served):
    config, port = served["config"], served["port"]
    model, version = served["follower"].served, served["follower"].version
    data = segment_body(served["paths"][0].read_bytes(), "a circle")
    deploy(serve_config(config, model, version, timeout_s=0.001))  # the ingress reconfigures in place
    try:
        status, body = until(lambda: call(port, "/v1/segment", data), lambda r: r[0] != 200)[::2]
        assert status == 408 and "no answer within" in body["error"]
    finally:
        deploy(serve_config(config, model, version))
    assert until(lambda: call(port, "/v1/segment", data), lambda r: r[0] == 200)[0] == 200


def until(fn, done, wait_s: float = 60):
    """``fn()`` again until ``done`` of its value (a reconfigured replica takes a moment), at most ``wait_s``."""
    deadline = time.monotonic() + wait_s
    while not done(value := fn()) and time.monotonic() < deadline:
        time.sleep(0.2)
    return value


def test_hot_swap_from_the_followed_run_keeps_answering(served):
    """A newer model in the run is served without a restart; the requests meanwhile all get 200."""
    port, item, model = served["port"], served["items"][0], served["model"]
    data = segment_body(served["paths"][0].read_bytes(), item.sample.question)
    before = served["follower"].version
    replies, stop = [], threading.Event()

    def client() -> None:
        while not stop.is_set():
            replies.append(call(port, "/v1/segment", data))

    clients = [threading.Thread(target=client) for _ in range(2)]
    for c in clients:
        c.start()
    time.sleep(1.0)
    with torch.no_grad():
        next(model.head.mask_decoder.parameters()).add_(1e-3)  # a newer model: other weights, another manifest
    save_segmenter(model, head_spec(served["config"]), served["tokenizer"], served["source"], served["run"] / "model")
    deadline = time.monotonic() + 180
    try:
        while not any(isinstance(b, dict) and b.get("weights_version") == before + 1 for _, _, b in list(replies)):
            assert time.monotonic() < deadline, "the new model was not served within 180 s"
            time.sleep(0.2)
        time.sleep(0.5)
    finally:
        stop.set()
        for c in clients:
            c.join(timeout=120)
    assert [s for s, _, _ in replies if s != 200] == []
    versions = [b["weights_version"] for _, _, b in replies]
    assert versions[0] == before and versions[-1] == before + 1 and set(versions) == {before, before + 1}
    assert call(port, "/healthz")[2]["weights_version"] == before + 1


CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def test_page_in_headless_chromium(served, tmp_path):
    """Debian's chromium through Playwright: upload an image, ask, see the overlay, the reasoning, a mask of the
    image's size; the screenshot is kept in the test's tmp dir."""
    playwright = pytest.importorskip("playwright.sync_api", reason="playwright is in the test extras")
    if not Path(CHROMIUM).is_file():
        pytest.skip(f"{CHROMIUM} missing (scripts/setup.sh installs Debian's chromium)")
    item, image = served["items"][0], served["paths"][0]
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch_persistent_context(str(tmp_path / "profile"), executable_path=CHROMIUM,
                                                       headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page()
            page.goto(f"http://127.0.0.1:{served['port']}/", timeout=60_000)
            page.set_input_files("#file", str(image))
            page.fill("#query", item.sample.question)
            page.click("#submit")
            page.wait_for_selector("#overlay:not([hidden])", timeout=120_000)
            page.wait_for_function("document.getElementById('overlay').naturalWidth > 0", timeout=30_000)
            reasoning, size, error = (page.inner_text(f"#{name}") for name in ("reasoning", "masksize", "error"))
            overlay_size = page.evaluate("[document.getElementById('overlay').naturalHeight, "
                                         "document.getElementById('overlay').naturalWidth]")
            page.screenshot(path=str(tmp_path / "page.png"))
        finally:
            browser.close()
    height, width = item.sample.height, item.sample.width
    api = call(served["port"], "/v1/segment", segment_body(image.read_bytes(), item.sample.question))[2]
    assert error == "" and reasoning.strip() and reasoning.strip() == api["reasoning"]
    assert size.startswith(f"{height}x{width}") and overlay_size == [height, width]
    assert (tmp_path / "page.png").stat().st_size > 0
