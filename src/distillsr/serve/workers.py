"""The compute side of ``distillsr serve``: a bounded queue of upscaling jobs and a fixed set of
worker threads, one per device, each holding its own models.

Nothing here needs FastAPI: :class:`UpscaleService` takes jobs (the request's bytes, scale,
model name and output format) and hands back the encoded result through an
:class:`asyncio.Future`. A job is run exactly as ``distillsr upscale`` runs a file
(:meth:`distillsr.engine.upscaler.Upscaler.upscale_file`): the bytes are written to a file in a
temporary folder that is always removed, so 16-bit, alpha, ICC and EXIF behave as in the CLI.
Models are loaded once per worker and never shared between threads.
"""
from __future__ import annotations

import asyncio
import queue
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Sequence, Tuple

from .. import io as imgio

__all__ = ["Job", "UpscaleService", "QueueFull", "Dropped", "available_models", "OUTPUT_FORMATS"]

# output format key (``format=``) -> (Pillow name, media type)
OUTPUT_FORMATS = {"png": ("PNG", "image/png"), "jpeg": ("JPEG", "image/jpeg"),
                  "webp": ("WEBP", "image/webp"), "tiff": ("TIFF", "image/tiff")}
PILLOW_TO_KEY = {pil: key for key, (pil, _) in OUTPUT_FORMATS.items()}


class QueueFull(Exception):
    """Every queue slot is taken."""


class Dropped(Exception):
    """The job was given up (client gone, or timed out) before it was computed."""


@dataclass
class Job:
    data: bytes
    scale: int
    model: str
    format: str                      # a key of OUTPUT_FORMATS
    future: asyncio.Future
    loop: asyncio.AbstractEventLoop
    pixels: int = 0                  # input pixels (from the header)
    cancelled: threading.Event = field(default_factory=threading.Event)
    started: Optional[float] = None  # when a worker took it


def available_models() -> List[dict]:
    """What a request may name: installed pretrained weights (never pulled on request) and
    ``bicubic``, each with its scale; the default for each scale comes first."""
    from ..pretrained import choose_default, list_pretrained
    out = []
    for e in list_pretrained():
        if e.installed:
            out.append({"name": e.name, "scale": e.scale, "arch": e.arch, "params": e.params,
                        "set5_psnr": e.set5, "default": False})
    for s in sorted({m["scale"] for m in out}):
        best = choose_default(s).name
        for m in out:
            if m["scale"] == s and m["name"] == best:
                m["default"] = True
    out += [{"name": "bicubic", "scale": s, "arch": "bicubic", "params": 0, "set5_psnr": None, "default": False}
            for s in (2, 3, 4)]
    return out


class _Worker(threading.Thread):
    """Takes jobs from the shared queue and runs them on one device, with its own models."""

    def __init__(self, service: "UpscaleService", device):
        super().__init__(name=f"distillsr-serve-{device}", daemon=True)
        self.service, self.device = service, device
        self.upscalers: Dict[Tuple[str, int], object] = {}

    def upscaler(self, model: str, scale: int):
        key = (model, scale)
        if key not in self.upscalers:
            from ..engine.upscale import Upscaler, load_runner
            from ..engine.memory import estimate_memory
            runner = load_runner(model, scale, device=self.device)
            estimate_memory(runner, self.device)  # the probe runs of tile="auto", done now rather than in a request
            self.upscalers[key] = Upscaler(runner, self.device, tile="auto")
        return self.upscalers[key]

    def run(self) -> None:
        svc = self.service
        while True:
            job = svc.queue.get()
            if job is None:
                return
            if job.cancelled.is_set():  # the client left (or gave up) while it waited: not computed
                svc.count_dropped()
                _deliver(job, Dropped("the request was given up before it was computed"))
                continue
            job.started = time.monotonic()
            with svc.lock:
                svc.running += 1
            try:
                result = self.process(job)
            except Exception as e:  # handed to the request, which maps it to a status
                result = e
            finally:
                with svc.lock:
                    svc.running -= 1
            _deliver(job, result)

    def process(self, job: Job):
        up = self.upscaler(job.model, job.scale)
        with tempfile.TemporaryDirectory(prefix="distillsr-serve-") as tmp:
            src, dst = Path(tmp, "input"), Path(tmp, "output" + imgio.FORMATS[job.format][1])
            src.write_bytes(job.data)
            try:
                info = up.upscale_file(src, dst, format=job.format, max_pixels=self.service.max_pixels)
            except (imgio.ImageReadError, imgio.ImageWriteError) as e:  # name the upload, not the file
                raise type(e)(str(e).replace(str(src), "the upload")) from None
            return dst.read_bytes(), info


def _deliver(job: Job, result) -> None:
    def settle():
        if job.future.done():  # timed out or cancelled on the request side
            return
        if isinstance(result, BaseException):
            job.future.set_exception(result)
        else:
            job.future.set_result(result)
    try:
        job.loop.call_soon_threadsafe(settle)
    except RuntimeError:  # the event loop is closed (shutting down)
        pass


class UpscaleService:
    """A bounded queue (``max_queue`` jobs waiting) in front of one worker thread per device.

    ``preload``: (model, scale) pairs each worker loads before :meth:`start` returns.
    """

    def __init__(self, devices: Sequence, max_queue: int, max_pixels: Optional[int]):
        if max_queue < 1:
            raise ValueError(f"max_queue must be at least 1, got {max_queue}")
        self.queue: "queue.Queue[Optional[Job]]" = queue.Queue(maxsize=max_queue)
        self.max_queue = max_queue
        self.max_pixels = max_pixels
        self.lock = threading.Lock()
        self.running = 0
        self.dropped = 0
        self.workers = [_Worker(self, d) for d in devices]
        self.ready = False

    def start(self, preload: Sequence[Tuple[str, int]] = ()) -> None:
        for w in self.workers:
            for model, scale in preload:
                w.upscaler(model, scale)  # loaded here, before the thread runs: used by it alone after
            w.start()
        self.ready = True

    def stop(self) -> None:
        self.ready = False
        for _ in self.workers:
            self.queue.put(None)
        for w in self.workers:
            w.join(timeout=30)

    def submit(self, job: Job) -> None:
        try:
            self.queue.put_nowait(job)
        except queue.Full:
            raise QueueFull() from None

    def count_dropped(self) -> None:
        with self.lock:
            self.dropped += 1

    @property
    def depth(self) -> int:
        """Jobs waiting (not yet taken by a worker)."""
        return self.queue.qsize()
