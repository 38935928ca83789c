"""The ASGI app of ``distillsr serve`` (FastAPI): the HTTP API, its guards and the web page.

Every error is JSON ``{"error": {"code": ..., "message": ...}}`` with its status; see
docs/serving.md for the API. Checks run cheapest first, before a job takes a queue slot: the
query, the body's size (declared, then counted as it streams), the format from the first
bytes, the pixel counts from the header (input and output; nothing is decoded), then whether
the client is still there.
"""
from __future__ import annotations

import asyncio
import io as _bytesio
import logging
import math
import time
import warnings
from importlib import resources
from typing import Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect

from .. import io as imgio
from .metrics import CONTENT_TYPE, Metrics
from .workers import OUTPUT_FORMATS, PILLOW_TO_KEY, Dropped, Job, QueueFull, UpscaleService, available_models

__all__ = ["create_app", "DEFAULT_MAX_PIXELS", "DEFAULT_MAX_OUTPUT_PIXELS", "DEFAULT_MAX_UPLOAD_MB",
           "DEFAULT_MAX_QUEUE", "DEFAULT_TIMEOUT"]

log = logging.getLogger("distillsr.serve")

DEFAULT_MAX_PIXELS = 4_000_000          # input pixels per request
DEFAULT_MAX_OUTPUT_PIXELS = 64_000_000  # output pixels per request (4 MP at x4)
DEFAULT_MAX_UPLOAD_MB = 25.0
DEFAULT_MAX_QUEUE = 8
DEFAULT_TIMEOUT = 120.0                 # seconds from arrival to answer
SCALES = (2, 3, 4)
FORMAT_ALIASES = {"jpg": "jpeg", "tif": "tiff"}
CLIENT_GONE = 499                       # the status recorded for a client that left (nginx's)
STATIC = {"app.js": "text/javascript; charset=utf-8", "style.css": "text/css; charset=utf-8"}


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: Optional[dict] = None):
        super().__init__(message)
        self.status, self.code, self.message, self.headers = status, code, message, headers

    def response(self) -> JSONResponse:
        return error_response(self.status, self.code, self.message, self.headers)


def error_response(status: int, code: str, message: str, headers: Optional[dict] = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)


def _devices(device: Union[str, Sequence[str]]):
    """``auto``, one device, or several (a list, or ``cuda:0,cuda:1``): one worker each."""
    from ..engine.device import select_device
    items = device.split(",") if isinstance(device, str) else list(device)
    devs = [select_device(d.strip() if isinstance(d, str) else d) for d in items if str(d).strip()]
    if not devs:
        raise ValueError("no device given")
    return devs


def _static(name: str) -> bytes:
    return resources.files(__package__).joinpath("static", name).read_bytes()


def create_app(model: Optional[str] = None, *, device: Union[str, Sequence[str]] = "auto",
               max_queue: int = DEFAULT_MAX_QUEUE, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS,
               max_output_pixels: Optional[int] = DEFAULT_MAX_OUTPUT_PIXELS,
               max_upload_mb: float = DEFAULT_MAX_UPLOAD_MB, timeout: float = DEFAULT_TIMEOUT) -> FastAPI:
    """The ``distillsr serve`` app, to run with any ASGI server or mount in another app.

    ``model``: the weights a request gets when it names none (default: the best installed
    weights for the request's scale, as ``distillsr upscale`` chooses them); these defaults
    are loaded when the app starts, other installed weights on first use. ``device``: ``auto``, ``cpu``,
    ``cuda:N`` or several separated by commas: one worker thread per device. ``max_queue``:
    jobs that may wait for a worker (more get 429). ``max_pixels`` / ``max_output_pixels``:
    limits per request on input and output pixels (None or 0: none), checked from the header.
    ``max_upload_mb``: the largest request body. ``timeout``: seconds from a request's arrival
    to its answer (504 after).
    """
    if max_upload_mb <= 0:
        raise ValueError(f"max_upload_mb must be positive, got {max_upload_mb}")
    if timeout <= 0:
        raise ValueError(f"timeout must be positive, got {timeout}")
    devices = _devices(device)
    catalogue = available_models()
    known = {(m["name"], m["scale"]) for m in catalogue}
    if model is not None:
        model = model.lower()
        if not any(name == model for name, _ in known):
            names = sorted({name for name, _ in known})
            raise ValueError(f"--model {model!r} is not installed here; available: {', '.join(names)}")
        preload = [(model, s) for s in SCALES if (model, s) in known]
    else:
        preload = [(m["name"], m["scale"]) for m in catalogue if m["default"]]
    upload_limit = int(max_upload_mb * (1 << 20))
    service = UpscaleService(devices, max_queue, max_pixels or None)
    metrics = Metrics()

    def default_model(scale: int) -> Optional[str]:
        if model is not None:
            return model
        return next((m["name"] for m in catalogue if m["scale"] == scale and m["default"]), None)

    async def lifespan(app):
        await asyncio.to_thread(service.start, preload)
        log.info("distillsr serve: %d worker(s) on %s; models loaded: %s", len(devices),
                 ", ".join(map(str, devices)), ", ".join(f"{n} x{s}" for n, s in preload) or "none")
        try:
            yield
        finally:
            await asyncio.to_thread(service.stop)

    app = FastAPI(title="distillsr", description="Single-image super-resolution as a service.",
                  lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.service, app.state.metrics = service, metrics

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, exc):
        return error_response(400, "bad_request", str(exc.errors()))

    # ------------------------------------------------------------------ the page
    @app.get("/", include_in_schema=False)
    async def page():
        return Response(_static("index.html"), media_type="text/html; charset=utf-8")

    @app.get("/static/{name}", include_in_schema=False)
    async def static(name: str):
        if name not in STATIC:  # a fixed set of files: no request path reaches the file system
            raise ApiError(404, "not_found", f"no static file {name!r}")
        return Response(_static(name), media_type=STATIC[name], headers={"Cache-Control": "no-cache"})

    @app.exception_handler(ApiError)
    async def _api_error(request, exc: ApiError):
        return exc.response()

    # ------------------------------------------------------------------ information
    @app.get("/healthz")
    async def healthz():
        body = {"status": "ok" if service.ready else "starting", "workers": len(devices),
                "devices": [str(d) for d in devices], "queue": service.depth, "max_queue": max_queue}
        return JSONResponse(body, status_code=200 if service.ready else 503)

    @app.get("/v1/models")
    async def models():
        defaults = {str(s): default_model(s) for s in SCALES}
        return {"models": catalogue, "default": defaults, "scales": list(SCALES),
                "formats": list(OUTPUT_FORMATS),
                "limits": {"max_pixels": max_pixels or None, "max_output_pixels": max_output_pixels or None,
                           "max_upload_bytes": upload_limit, "timeout_s": timeout, "max_queue": max_queue}}

    @app.get("/metrics")
    async def metrics_text():
        text = metrics.render({
            "distillsr_queue_depth": ("Jobs waiting for a worker.", service.depth),
            "distillsr_queue_capacity": ("Jobs that may wait (--max-queue).", max_queue),
            "distillsr_jobs_running": ("Jobs being computed.", service.running),
            "distillsr_workers": ("Worker threads (one per device).", len(devices)),
            "distillsr_dropped_total": ("Jobs given up before compute (client gone or timed out).",
                                        service.dropped),
        })
        return Response(text, media_type=CONTENT_TYPE)

    # ------------------------------------------------------------------ the API
    @app.post("/v1/upscale")
    async def upscale(request: Request):
        t0 = time.monotonic()
        try:
            response = await _upscale(request, t0)
        except ApiError as e:
            response = e.response()
        except Exception:  # pragma: no cover - a bug; answered, logged, counted
            log.exception("upscale request failed")
            response = error_response(500, "internal_error", "the server failed on this request")
        metrics.observe(response.status_code, time.monotonic() - t0)
        return response

    def _params(request: Request):
        q = request.query_params
        raw = q.get("scale", "4")
        try:
            scale = int(raw)
        except ValueError:
            scale = None
        if scale not in SCALES:
            raise ApiError(400, "bad_scale", f"scale must be one of 2, 3, 4, not {raw!r}")
        name = (q.get("model") or "").lower() or default_model(scale)
        if name is None or (name, scale) not in known:
            here = sorted(n for n, s in known if s == scale)
            raise ApiError(404, "unknown_model", f"no model {name!r} for x{scale} on this server; "
                           f"available for x{scale}: {', '.join(here)} (GET /v1/models)")
        fmt = q.get("format")
        if fmt is not None:
            fmt = FORMAT_ALIASES.get(fmt.lower(), fmt.lower())
            if fmt not in OUTPUT_FORMATS:
                raise ApiError(400, "bad_format", f"format must be one of {', '.join(OUTPUT_FORMATS)}, not {fmt!r}")
        return scale, name, fmt

    async def _read_body(request: Request, deadline: float) -> bytes:
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > upload_limit:
            raise ApiError(413, "body_too_large", f"the body is {int(declared):,} bytes; the limit is "
                           f"{upload_limit:,} bytes (--max-upload-mb {max_upload_mb:g})")
        chunks, total = [], 0

        async def read():
            nonlocal total
            async for chunk in request.stream():
                total += len(chunk)
                if total > upload_limit:
                    raise ApiError(413, "body_too_large", f"the body is more than the limit of "
                                   f"{upload_limit:,} bytes (--max-upload-mb {max_upload_mb:g})")
                chunks.append(chunk)
        try:
            await asyncio.wait_for(read(), max(0.0, deadline - time.monotonic()))
        except asyncio.TimeoutError:
            raise ApiError(408, "body_timeout", f"the body did not arrive within {timeout:g} s "
                           f"({total:,} bytes came)") from None
        return b"".join(chunks)

    async def _image_bytes(request: Request, body: bytes) -> bytes:
        ctype = request.headers.get("content-type", "")
        if not ctype.lower().startswith("multipart/form-data"):
            return body
        sent = False

        async def replay():  # the body already read (and size-checked), for the form parser
            nonlocal sent
            if sent:
                return {"type": "http.disconnect"}
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        try:
            form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
        except Exception as e:
            raise ApiError(400, "bad_form", f"the multipart form cannot be read ({e})") from None
        try:
            part = form.get("image")
            if part is None or not hasattr(part, "read"):
                raise ApiError(400, "missing_image", "the multipart form has no file field 'image'")
            return await part.read()
        finally:
            await form.close()  # the parser's spooled temporary files go away

    def _probe(data: bytes, scale: int):
        """(format, width, height) from the header; the pixel limits; nothing is decoded."""
        if not data:
            raise ApiError(400, "empty_body", "the request has no image (an empty body)")
        fmt = imgio.sniff_format(data[:16])
        if fmt is None:
            raise ApiError(415, "unsupported_media_type", "the body is not an image this server reads "
                           "(PNG, JPEG, WebP, TIFF, BMP, PPM/PGM), judged from its first bytes "
                           f"{data[:8]!r}")
        from PIL import Image
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore", Image.DecompressionBombWarning)
                with Image.open(_bytesio.BytesIO(data)) as im:  # reads the header only
                    w, h = im.size
        except Image.DecompressionBombError as e:
            raise ApiError(413, "too_many_pixels", f"the image is far over the pixel limit ({e})") from None
        except Exception as e:
            if fmt == "TIFF":  # a 16-bit layout only tifffile reads: checked when read, before decoding
                return fmt, None, None
            raise ApiError(422, "corrupt_image", f"the {fmt} header cannot be read ({type(e).__name__}: {e})") from None
        try:
            imgio.check_pixels(f"the {fmt} upload", w, h, max_pixels or None)
        except imgio.ImageTooLargeError as e:
            raise ApiError(413, "too_many_pixels", str(e)) from None
        if max_output_pixels and w * h * scale * scale > max_output_pixels:
            raise ApiError(413, "output_too_large", f"{w}x{h} at x{scale} would be {w * scale}x{h * scale} = "
                           f"{w * h * scale * scale:,} pixels, more than the limit of {max_output_pixels:,}")
        return fmt, w, h

    async def _upscale(request: Request, t0: float):
        scale, name, fmt_out = _params(request)
        if not service.ready:
            raise ApiError(503, "not_ready", "the server is starting or stopping", {"Retry-After": "1"})
        deadline = t0 + timeout
        try:
            body = await _read_body(request, deadline)
        except ClientDisconnect:
            return error_response(CLIENT_GONE, "client_gone", "the client left while sending")
        data = await _image_bytes(request, body)
        del body
        fmt_in, w, h = _probe(data, scale)
        fmt_out = fmt_out or PILLOW_TO_KEY.get(fmt_in, "png")
        if await request.is_disconnected():
            return error_response(CLIENT_GONE, "client_gone", "the client left before the job was queued")
        loop = asyncio.get_running_loop()
        job = Job(data, scale, name, fmt_out, loop.create_future(), loop, pixels=(w or 0) * (h or 0))
        try:
            service.submit(job)
        except QueueFull:
            wait = max(1, math.ceil(metrics.latency_sum / max(1, metrics.latency_count)))
            raise ApiError(429, "queue_full", f"all {max_queue} queue slots are taken; retry later",
                           {"Retry-After": str(wait)}) from None
        del data
        while not job.future.done():
            left = deadline - time.monotonic()
            if left <= 0:
                job.cancelled.set()
                state = "was being computed" if job.started else "was still queued"
                raise ApiError(504, "timeout", f"no result within {timeout:g} s (the job {state})")
            await asyncio.wait({job.future}, timeout=min(0.2, left))
            if not job.future.done() and await request.is_disconnected():
                job.cancelled.set()  # dropped by the worker if it has not started it
                return error_response(CLIENT_GONE, "client_gone", "the client left while the job waited")
        try:
            out, info = job.future.result()
        except Dropped as e:
            return error_response(CLIENT_GONE, "client_gone", str(e))
        except imgio.ImageTooLargeError as e:
            raise ApiError(413, "too_many_pixels", str(e)) from None
        except imgio.ImageWriteError as e:
            raise ApiError(422, "cannot_encode", str(e).replace("--format", "format=")) from None
        except imgio.ImageReadError as e:
            raise ApiError(422, "corrupt_image", str(e)) from None
        ow, oh = info.width * scale, info.height * scale
        metrics.add_pixels(info.width * info.height, ow * oh)
        headers = {"X-Distillsr-Model": name, "X-Distillsr-Scale": str(scale),
                   "X-Distillsr-Size": f"{ow}x{oh}",
                   "Content-Disposition": f'inline; filename="upscaled_x{scale}{imgio.FORMATS[fmt_out][1]}"'}
        return Response(out, media_type=OUTPUT_FORMATS[fmt_out][1], headers=headers)

    return app
