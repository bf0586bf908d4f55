"""The HTTP ingress: FastAPI on Ray Serve, composing the segmentation and policy deployments.

``POST /v1/segment``: parse and check the request (``api``), encode the image (segmentation
deployment, cached by hash), ask the policy (batched), decode the masks with the head of the
version that answered, build the answer (``response``). ``GET /healthz`` and ``GET /`` (the
page in ``static/``). Every error is JSON ``{"error": ...}``: ``ApiError``'s status, 503 with
Retry-After when a deployment's queue is full or no model is loaded yet, 408 past
``serve.request_timeout_s``, 500 naming only the exception's type for anything else (the
traceback goes to the replica's log, never to the client).
"""
from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse
from ray import serve
from ray.serve.exceptions import BackPressureError
from starlette.exceptions import HTTPException

from config import Config
from pipelines.serve import api
from pipelines.serve.api import ApiError, Limits, SegmentRequest
from pipelines.serve.cores import Question
from pipelines.serve.policy_deployment import NoModelError
from pipelines.serve.response import segment_response

PAGE = Path(__file__).parent / "static" / "index.html"
LOG = logging.getLogger("ray.serve")
app = FastAPI(title="segrl", docs_url=None, redoc_url=None, openapi_url=None)


@app.exception_handler(HTTPException)
async def _http_error(_request: Request, exc: HTTPException) -> JSONResponse:
    """Starlette's own errors (404, 405) in the API's shape."""
    return JSONResponse({"error": str(exc.detail)}, status_code=exc.status_code)


def _cause(exc: BaseException) -> BaseException:
    """The user exception inside a Ray task error."""
    return getattr(exc, "cause", None) or exc


@serve.deployment(name="ingress")
@serve.ingress(app)
class Ingress:
    def __init__(self, policy, segment, config: dict):
        self.config = Config.model_validate(config)
        s = self.config.serve
        self.policy, self.segment = policy, segment
        self.limits = Limits(s.max_image_bytes, s.max_image_pixels, s.max_aspect_ratio, s.max_query_chars,
                             s.max_new_tokens or self.config.eval_max_new_tokens)
        self.fields: tuple[str, ...] | None = None  # the head's policy_inputs, asked once
        self.timeout_s = s.request_timeout_s

    def reconfigure(self, user_config: dict) -> None:
        """``{"request_timeout_s"}``: past it a request is answered 408."""
        self.timeout_s = float(user_config["request_timeout_s"])

    @app.get("/", response_class=HTMLResponse)
    def page(self) -> HTMLResponse:
        return HTMLResponse(PAGE.read_text())

    @app.get("/healthz")
    async def healthz(self) -> JSONResponse:
        status = await self.policy.status.remote()
        body = {"status": "ok" if status["model"] else "no model loaded", **status,
                "head": self.config.model.head.kind}
        return JSONResponse(body, status_code=200 if status["model"] else 503, headers=self._retry(status["model"]))

    def _retry(self, loaded) -> dict:
        return {} if loaded else {"Retry-After": str(self.config.serve.retry_after_s)}

    @app.post("/v1/segment")
    async def segment_route(self, request: Request) -> JSONResponse:
        start = time.perf_counter()
        try:
            parsed = await self._parse(request)
            body = await asyncio.wait_for(self._answer(parsed, start), self.timeout_s)
            return JSONResponse(body)
        except ApiError as exc:
            return JSONResponse(exc.body(), status_code=exc.status, headers=exc.headers)
        except TimeoutError:
            return JSONResponse({"error": f"no answer within {self.timeout_s:g} s"},
                                status_code=408)
        except Exception as exc:  # the API's last line: nothing a client sends may leak a traceback
            cause = _cause(exc)
            if isinstance(cause, (BackPressureError, NoModelError)):
                why = "no model is loaded yet" if isinstance(cause, NoModelError) else "the server is at capacity"
                return JSONResponse({"error": f"{why}; retry later"}, status_code=503, headers=self._retry(False))
            LOG.exception("segment request failed")
            return JSONResponse({"error": f"internal error ({type(cause).__name__})"}, status_code=500)

    async def _parse(self, request: Request) -> SegmentRequest:
        kind = api.media_type(request.headers.get("content-type"))
        length = request.headers.get("content-length")
        api.check_body_size(int(length) if length and length.isdigit() else None, self.limits)
        if kind in api.JSON_TYPES:
            body = bytearray()
            async for chunk in request.stream():
                body += chunk
                api.check_body_size(len(body), self.limits)
            return await asyncio.to_thread(api.parse_json, bytes(body), self.limits)  # decodes the image
        if kind in api.MULTIPART_TYPES:
            try:
                form = await request.form(max_files=1, max_fields=8)
            except Exception as exc:  # noqa: BLE001 - starlette's multipart errors have no common type
                raise ApiError(400, f"multipart body does not parse ({type(exc).__name__})") from None
            image = form.get("image")
            data = await image.read(self.limits.max_image_bytes + 1) if hasattr(image, "read") else None
            fields = {k: v for k, v in form.items() if k != "image" and isinstance(v, str)}
            return await asyncio.to_thread(api.parse_form, data, fields, self.limits)
        raise ApiError(415, f"content type {kind or 'none'} is not supported: send application/json or "
                            "multipart/form-data")

    async def _answer(self, req: SegmentRequest, start: float) -> dict:
        timings = {"parse": time.perf_counter() - start}
        mark = time.perf_counter()
        features, cached = await self.segment.encode.remote(req.image, req.image_hash)
        timings["encode"] = time.perf_counter() - mark
        if self.fields is None:
            self.fields = tuple(await self.segment.policy_inputs.remote())
        mark = time.perf_counter()
        answer = await self.policy.answer.remote(Question(features["vision"], req.query, req.max_new_tokens,
                                                          req.temperature, self.fields))
        if answer.error:
            raise ApiError(422, answer.error)
        timings["generate"] = time.perf_counter() - mark
        mark = time.perf_counter()
        seg = await self.segment.segment.remote(answer, features)
        timings["segment"] = time.perf_counter() - mark
        masks, scores = (seg.masks, seg.scores) if seg is not None else (None, [])
        body = await asyncio.to_thread(segment_response, req.image, answer.text, self.config.model.ref_token, masks,
                                       scores, req.outputs, answer.weights_version,
                                       {k: 1000 * v for k, v in timings.items()})
        body["timings_ms"]["total"] = round(1000 * (time.perf_counter() - start), 2)
        body["feature_cache_hit"] = cached
        return body
