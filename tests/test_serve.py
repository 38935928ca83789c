"""distillsr serve: a real server process on 127.0.0.1, answering like the library, under load
and bad input; the web page in headless Chromium.

Two servers run for the module: ``main``, a process (the default x4 model, --max-queue 2, 1 MP
and 1 MiB limits), and ``short``, uvicorn in a thread of this process (timeout 0.25 s: body and
compute timeouts). Load and correctness use the
small ASID x2 on small images.
"""
import io
import os
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import distillsr
from distillsr import io as imgio

httpx = pytest.importorskip("httpx", reason="httpx is in the [test] extra")
pytest.importorskip("fastapi", reason="fastapi is in the [serve] and [test] extras")

REPO = Path(__file__).resolve().parents[1]
RNG = np.random.default_rng(22)


# ----------------------------------------------------------------------------- the server process

@pytest.fixture(autouse=True)
def _one_thread():
    """The library's reference results are computed here with one thread, as the servers run:
    three processes share the machine's cores."""
    import torch
    torch.set_num_threads(1)
    yield


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Api:
    """What the tests ask of a running server at ``self.url``."""

    def metrics(self) -> dict:
        """The /metrics samples: 'name{labels}' -> value."""
        out = {}
        for line in httpx.get(self.url + "/metrics").text.splitlines():
            if line and not line.startswith("#"):
                key, value = line.rsplit(" ", 1)
                out[key] = float(value)
        return out

    def post(self, data: bytes, timeout=120, **params):
        return httpx.post(self.url + "/v1/upscale", params=params, content=data, timeout=timeout)

    def idle(self, timeout=120):
        """Wait until no job is queued or running."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            m = self.metrics()
            if m["distillsr_queue_depth"] == 0 and m["distillsr_jobs_running"] == 0:
                return
            time.sleep(0.1)
        raise AssertionError("the server stayed busy")


class Server(_Api):
    """``python -m distillsr serve --port P ARGS`` with this checkout's code, an empty weights
    cache and no network; waits for /healthz."""

    def __init__(self, tmp: Path, cache: Path, *args: str):
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        # one thread: the test process and two servers share the machine (OpenMP threads that
        # wait for busy cores make every request many times slower)
        env = dict(os.environ, PYTHONPATH=str(REPO / "src"), DISTILLSR_CACHE=str(cache),
                   DISTILLSR_WEIGHTS_MIRROR="http://127.0.0.1:9", OMP_NUM_THREADS="1")
        self.log = open(tmp / f"server-{self.port}.log", "wb")
        self.proc = subprocess.Popen([sys.executable, "-m", "distillsr", "serve", "--port", str(self.port), *args],
                                     cwd=tmp, env=env, stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 180
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.log_text()}")
            try:
                if httpx.get(self.url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"the server did not come up: {self.log_text()}")
            time.sleep(0.2)

    def log_text(self) -> str:
        self.log.flush()
        return Path(self.log.name).read_text(errors="replace")[-3000:]

    def rss_mb(self) -> float:
        text = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024

    def stop(self):
        self.proc.terminate()
        try:
            self.proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()


@pytest.fixture(scope="module")
def server_cache(tmp_path_factory):
    """A cache without pulled weights that both servers share, holding the CPU kernels this
    process has built (built here first if not yet): they are compiled once, not per process."""
    import shutil
    from distillsr import kernels
    cache = tmp_path_factory.mktemp("serve-cache")
    saved = os.environ.get("DISTILLSR_CACHE")
    os.environ["DISTILLSR_CACHE"] = str(cache)
    try:
        kernels.built()
    finally:
        if saved is None:
            del os.environ["DISTILLSR_CACHE"]
        else:
            os.environ["DISTILLSR_CACHE"] = saved
    lib = getattr(kernels._lib, "_name", None)
    if lib and Path(lib).parent != cache / "kernels":  # built before, elsewhere: the same file
        (cache / "kernels").mkdir(exist_ok=True)
        shutil.copy2(lib, cache / "kernels" / Path(lib).name)
    return cache


@pytest.fixture(scope="module")
def main_server(tmp_path_factory, server_cache):
    srv = Server(tmp_path_factory.mktemp("serve-main"), server_cache, "--max-queue", "2", "--max-pixels", "1000000",
                 "--max-upload-mb", "1", "--timeout", "120", "--device", "cpu")
    yield srv
    srv.stop()
    assert srv.proc.returncode is not None


class InProcessServer(_Api):
    """``create_app(**options)`` served by uvicorn on 127.0.0.1 from a thread of this process
    (a real socket, without starting another Python)."""

    def __init__(self, **options):
        import uvicorn
        from distillsr.serve import create_app
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        config = uvicorn.Config(create_app(**options), host="127.0.0.1", port=self.port, log_level="warning")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 120
        while not self.server.started:
            assert self.thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
            time.sleep(0.05)

    def stop(self):
        self.server.should_exit = True
        self.thread.join(timeout=30)


@pytest.fixture(scope="module")
def short_server(server_cache):
    saved = os.environ.get("DISTILLSR_CACHE")
    os.environ["DISTILLSR_CACHE"] = str(server_cache)  # no pulled weights; the kernels built once
    try:
        srv = InProcessServer(model="e-rfdn-release", device="cpu", timeout=0.25)
    finally:
        if saved is None:
            del os.environ["DISTILLSR_CACHE"]
        else:
            os.environ["DISTILLSR_CACHE"] = saved
    yield srv
    srv.stop()


# ----------------------------------------------------------------------------- images

def encode(arr: np.ndarray, fmt: str = "PNG", **kw) -> bytes:
    """An image file's bytes, written by distillsr.io (so 16-bit colour and alpha are exact)."""
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "img." + {"PNG": "png", "JPEG": "jpg", "WEBP": "webp", "TIFF": "tif"}[fmt])
        imgio.write_image(path, arr, **kw)
        return path.read_bytes()


def decode(data: bytes) -> np.ndarray:
    import tempfile
    with tempfile.TemporaryDirectory() as d:
        path = Path(d, "out")
        path.write_bytes(data)
        arr, _ = imgio.read_image_native(path, max_pixels=None)
        return arr


def rand_image(h, w, c, dtype=np.uint8, seed=0):
    rng = np.random.default_rng(seed)
    peak = np.iinfo(dtype).max
    # smooth-ish content (a random image blurred by upsampling) plus a little noise
    base = rng.random((h // 4 + 2, w // 4 + 2, c))
    big = np.kron(base, np.ones((4, 4, 1)))[:h, :w]
    img = np.clip(big * 0.85 + rng.random((h, w, c)) * 0.15, 0, 1)
    return np.round(img * peak).astype(dtype)


def assert_close(got: np.ndarray, want: np.ndarray, levels=1):
    assert got.shape == want.shape and got.dtype == want.dtype
    diff = np.abs(got.astype(np.int64) - want.astype(np.int64))
    assert diff.max() <= levels, f"max difference {diff.max()} levels"


def png_bomb(width=20000, height=20000) -> bytes:
    """A 1-bit greyscale PNG of width x height, all zeros: ~50 kB that decode to 400 MB (mode L)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    row = b"\x00" * (1 + (width + 7) // 8)
    comp = zlib.compressobj(9)
    body = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", body) + chunk(b"IEND", b""))


# ----------------------------------------------------------------------------- done-when

def test_dandelion_x4_equals_the_library(main_server):
    data = (REPO / "examples" / "dandelion.png").read_bytes()
    r = main_server.post(data, scale=4)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "PNG" and im.size == (768, 512)
    lr, _ = imgio.read_image_native(REPO / "examples" / "dandelion.png")
    want = distillsr.upscale(lr, 4, device="cpu")  # the library's default x4 weights too
    assert_close(decode(r.content), want, levels=1)
    assert r.headers["x-distillsr-model"] == "e-rfdn-release"


# ----------------------------------------------------------------------------- correctness

@pytest.mark.parametrize("kind", ["rgb8", "rgba8", "rgb16", "grey8", "rgba16"])
def test_answer_equals_distillsr_upscale(main_server, kind):
    """Each image kind comes back in its own kind (mode, bit depth) and equals the library."""
    c = {"rgb8": 3, "rgba8": 4, "rgb16": 3, "grey8": 1, "rgba16": 4}[kind]
    dtype = np.uint16 if kind.endswith("16") else np.uint8
    arr = rand_image(20, 28, c, dtype, seed=len(kind) * 10 + c)
    if c == 4:
        arr[:, :10, 3] = 0  # a transparent part, with colour underneath
    r = main_server.post(encode(arr), scale=2, model="asid")
    assert r.status_code == 200, r.text
    got = decode(r.content)
    want = distillsr.upscale(arr if c > 1 else arr[:, :, 0], 2, "asid", device="cpu")
    assert_close(got, want if c > 1 else want[:, :, None])


def test_format_choice_multipart_and_icc(main_server):
    """format= picks the output format; a multipart form works; the ICC profile is kept."""
    from PIL import ImageCms
    srgb = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    arr = rand_image(16, 16, 3, seed=3)
    data = encode(arr, icc_profile=srgb)
    r = httpx.post(main_server.url + "/v1/upscale", params={"scale": 3, "model": "asid", "format": "webp"},
                   files={"image": ("photo.png", data, "image/png")}, timeout=60)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/webp"
    im = Image.open(io.BytesIO(r.content))
    assert im.format == "WEBP" and im.size == (48, 48) and im.info.get("icc_profile") == srgb
    r = main_server.post(encode(arr, format="JPEG"), scale=2, model="asid")
    assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).format == "JPEG"
    # the format comes from the bytes, not the name: a PNG called .jpg comes back PNG
    r = httpx.post(main_server.url + "/v1/upscale", params={"scale": 2, "model": "asid"},
                   files={"image": ("photo.jpg", data, "image/jpeg")}, timeout=60)
    assert r.status_code == 200 and r.headers["content-type"] == "image/png"
    assert Image.open(io.BytesIO(r.content)).format == "PNG"


def test_exif_orientation_applied_and_exif_carried(main_server):
    """As in the CLI: the EXIF orientation is applied (the answer is upright, without the tag)
    and the other EXIF tags are carried."""
    im = Image.fromarray(rand_image(12, 20, 3, seed=15))
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    exif[0x013B] = "A. Photographer"
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=95, exif=exif.tobytes())
    r = main_server.post(buf.getvalue(), scale=2, model="asid")
    assert r.status_code == 200, r.text
    out = Image.open(io.BytesIO(r.content))
    assert out.format == "JPEG" and out.size == (24, 40)
    tags = out.getexif()
    assert tags.get(0x013B) == "A. Photographer" and tags.get(0x0112, 1) == 1


def test_format_is_sniffed_from_the_first_bytes():
    img = Image.fromarray(rand_image(8, 8, 3, seed=14))
    for fmt in ("PNG", "JPEG", "WEBP", "TIFF", "BMP", "PPM"):
        buf = io.BytesIO()
        img.save(buf, fmt)
        assert imgio.sniff_format(buf.getvalue()[:16]) == fmt
    for junk in (b"", b"GIF89a\x01\x00", b"RIFF\x00\x00\x00\x00WAVE", b"P7 332", b"<html>"):
        assert imgio.sniff_format(junk) is None


# ----------------------------------------------------------------------------- under load

def _client(srv, k, image, expect, n, results, served=2, cap=400):
    """Client ``k`` sends its own image at least ``n`` times and until ``served`` answers came
    back (at most ``cap`` tries), backing off 20-60 ms after a 429/503; records
    (k, status, whether a 200 held this client's image upscaled)."""
    rng = np.random.default_rng(k)
    good = 0
    with httpx.Client(base_url=srv.url, timeout=120) as c:
        for i in range(cap):
            if i >= n and good >= served:
                break
            r = c.post("/v1/upscale", params={"scale": 2, "model": "asid"}, content=image)
            ok = None
            if r.status_code == 200:
                got = decode(r.content)
                ok = got.shape == expect.shape and np.abs(got.astype(int) - expect.astype(int)).max() <= 1
                good += 1
            elif r.status_code in (429, 503):
                ok = "retry-after" in r.headers and r.json()["error"]["code"] in ("queue_full", "not_ready")
                time.sleep(rng.uniform(0.02, 0.06))
            results.append((k, r.status_code, ok))


def test_load_16_clients_against_a_small_queue(main_server):
    """A few hundred requests, 16 clients at a time, against --max-queue 2: each answer is the
    client's own image upscaled or a 429/503 with Retry-After, never a 5xx; RSS stays bounded."""
    clients = 16
    images = [rand_image(16, 16, 3, seed=100 + k) for k in range(clients)]
    data = [encode(im) for im in images]
    expect = [distillsr.upscale(im, 2, "asid", device="cpu") for im in images]
    warm = []
    _client(main_server, 0, data[0], expect[0], 5, warm, served=5)
    assert all(s == 200 and ok for _, s, ok in warm)
    rss0 = main_server.rss_mb()
    before = main_server.metrics()
    results = []
    threads = [threading.Thread(target=_client, args=(main_server, k, data[k], expect[k], 20, results))
               for k in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=600)
    assert not any(t.is_alive() for t in threads)
    statuses = [s for _, s, _ in results]
    assert len(results) >= clients * 20
    assert set(statuses) <= {200, 429, 503}, sorted(set(statuses))
    assert all(ok for _, _, ok in results)  # nobody got another client's image; rejections well-formed
    assert statuses.count(429) > 0
    for k in range(clients):  # every client was served (twice at least)
        assert sum(1 for kk, s, _ in results if kk == k and s == 200) >= 2
    after = main_server.metrics()
    served = after['distillsr_requests_total{status="200"}'] - before['distillsr_requests_total{status="200"}']
    assert served == statuses.count(200)  # nothing answered twice or lost
    assert after["distillsr_pixels_processed_total"] - before["distillsr_pixels_processed_total"] == 256 * served
    rss1 = main_server.rss_mb()
    assert rss1 - rss0 < 150, (rss0, rss1)


def test_32_concurrent_requests_against_max_queue_2(main_server):
    main_server.idle()
    data = encode(rand_image(24, 24, 3, seed=9))
    barrier = threading.Barrier(32)

    def one(_):
        barrier.wait()
        return httpx.post(main_server.url + "/v1/upscale", params={"scale": 4}, content=data, timeout=120)
    with ThreadPoolExecutor(32) as ex:
        answers = list(ex.map(one, range(32)))
    codes = [r.status_code for r in answers]
    assert set(codes) <= {200, 429, 503}, codes
    assert 200 in codes and 429 in codes
    for r in answers:
        if r.status_code == 429:
            assert int(r.headers["retry-after"]) >= 1
            assert r.json()["error"]["code"] == "queue_full"


# ----------------------------------------------------------------------------- bad input

def _error(r, status, code):
    assert r.status_code == status, (r.status_code, r.text)
    assert r.headers["content-type"].startswith("application/json")
    err = r.json()["error"]
    assert err["code"] == code and err["message"]
    return err["message"]


def test_bad_input_corpus(main_server):
    good = encode(rand_image(12, 12, 3, seed=1))
    _error(main_server.post(b""), 400, "empty_body")
    _error(main_server.post(b"GIF89a this is not what we read"), 415, "unsupported_media_type")
    _error(main_server.post(b"%PDF-1.7 \x00\x01" * 10), 415, "unsupported_media_type")
    _error(main_server.post(good[: len(good) // 2], scale=2, model="asid"), 422, "corrupt_image")
    _error(main_server.post(good[:40]), 422, "corrupt_image")  # cut inside the header
    jpeg = encode(rand_image(32, 32, 3, seed=2), format="JPEG")
    _error(main_server.post(jpeg[:200], scale=2, model="asid"), 422, "corrupt_image")
    assert "x5" not in _error(main_server.post(good, scale=5), 400, "bad_scale")
    _error(main_server.post(good, scale="four"), 400, "bad_scale")
    _error(main_server.post(good, scale=2, model="nosuchnet"), 404, "unknown_model")
    _error(main_server.post(good, scale=2, model="../../etc/passwd"), 404, "unknown_model")
    _error(main_server.post(good, scale=2, model="e-rfdn-release"), 404, "unknown_model")  # x4 only
    _error(main_server.post(good, scale=2, model="asid", format="gif"), 400, "bad_format")
    rgba = encode(rand_image(12, 12, 4, seed=4))
    assert "alpha" in _error(main_server.post(rgba, scale=2, model="asid", format="jpeg"), 422, "cannot_encode")
    r = httpx.post(main_server.url + "/v1/upscale", files={"picture": ("a.png", good)}, timeout=30)
    _error(r, 400, "missing_image")
    _error(httpx.get(main_server.url + "/v1/nothing"), 404, "not_found")
    _error(httpx.get(main_server.url + "/static/../io.py"), 404, "not_found")
    assert httpx.get(main_server.url + "/healthz").status_code == 200


def test_decompression_bomb_is_refused_from_its_header(main_server):
    """A 20000x20000 PNG (50 kB, 400 MB decoded): 413 before decoding; memory does not move.
    Also a 2000x2000 PNG, over --max-pixels 1000000 but under Pillow's own bomb limit."""
    bomb = png_bomb()
    assert len(bomb) < 1 << 20
    rss0 = main_server.rss_mb()
    msg = _error(main_server.post(bomb), 413, "too_many_pixels")
    assert "400000000" in msg.replace(",", "")
    assert main_server.rss_mb() - rss0 < 50
    msg = _error(main_server.post(png_bomb(2000, 2000)), 413, "too_many_pixels")
    assert "2000x2000" in msg and "1,000,000" in msg


def test_oversized_body(main_server):
    big = b"\x89PNG\r\n\x1a\n" + bytes(2 << 20)
    _error(main_server.post(big), 413, "body_too_large")  # by its Content-Length

    def chunks():  # no Content-Length: counted as it streams
        for _ in range(40):
            yield bytes(64 << 10)
    r = httpx.post(main_server.url + "/v1/upscale", content=chunks(), timeout=30)
    _error(r, 413, "body_too_large")


def _raw_request(port, body: bytes, declared=None, path="/v1/upscale?scale=2&model=asid"):
    s = socket.create_connection(("127.0.0.1", port), timeout=30)
    head = (f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/octet-stream\r\n"
            f"Content-Length: {len(body) if declared is None else declared}\r\nConnection: close\r\n\r\n")
    s.sendall(head.encode())
    return s


def _read_status(s) -> int:
    data = b""
    while b"\r\n" not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
    return int(data.split(b" ", 2)[1])


def test_slow_client_is_served_and_does_not_block_others(main_server):
    main_server.idle()
    arr = rand_image(12, 12, 3, seed=5)
    body = encode(arr)
    s = _raw_request(main_server.port, body)
    for i in range(0, len(body), max(1, len(body) // 8)):  # the body over ~1.5 s
        s.sendall(body[i:i + max(1, len(body) // 8)])
        if i == 0:  # meanwhile another client is served
            fast = main_server.post(encode(rand_image(12, 12, 3, seed=6)), scale=2, model="asid")
            assert fast.status_code == 200
        time.sleep(0.15)
    assert _read_status(s) == 200
    s.close()


def test_client_leaving_mid_body_and_before_compute(main_server):
    """A client that leaves while sending is answered with nothing and counted (499); one that
    sends its whole request and leaves while the worker is busy is dropped before compute: its
    pixels are never processed."""
    main_server.idle()
    m0 = main_server.metrics()
    body = encode(rand_image(37, 29, 3, seed=7))
    s = _raw_request(main_server.port, body[:100], declared=len(body))
    s.sendall(body[:100])
    s.close()
    # keep the worker busy with a big job, then queue a request and leave
    busy_img = encode(rand_image(192, 192, 3, seed=8))  # E-RFDN x4: busy well past the poll
    worker = threading.Thread(target=lambda: main_server.post(busy_img, scale=4))
    worker.start()
    deadline = time.monotonic() + 60
    while main_server.metrics()["distillsr_jobs_running"] < 1 and time.monotonic() < deadline:
        time.sleep(0.02)
    s = _raw_request(main_server.port, body)
    s.sendall(body)
    time.sleep(0.05)
    s.close()
    worker.join(timeout=300)
    main_server.idle()
    m1 = main_server.metrics()
    gone = m1.get('distillsr_requests_total{status="499"}', 0) - m0.get('distillsr_requests_total{status="499"}', 0)
    assert gone == 2
    assert m1["distillsr_pixels_processed_total"] - m0["distillsr_pixels_processed_total"] == 192 * 192
    assert m1["distillsr_dropped_total"] - m0["distillsr_dropped_total"] <= 1
    assert httpx.get(main_server.url + "/healthz").status_code == 200


def test_timeouts(short_server):
    """Timeout 0.25 s: a body that stalls gets 408; a job that cannot finish in time (E-RFDN x4
    of 192x192) gets 504."""
    body = encode(rand_image(12, 12, 3, seed=10))
    s = _raw_request(short_server.port, body)
    s.sendall(body[:50])
    assert _read_status(s) == 408
    s.close()
    r = short_server.post(encode(rand_image(192, 192, 3, seed=11)), scale=4)
    _error(r, 504, "timeout")
    short_server.idle()
    assert short_server.metrics()['distillsr_requests_total{status="504"}'] == 1


# ----------------------------------------------------------------------------- the app object

def test_create_app_limits_output_pixels_and_reports_models():
    """create_app can be mounted elsewhere: here through Starlette's test client, with an output
    limit that a x4 of a 40x40 image exceeds."""
    from fastapi.testclient import TestClient
    from distillsr.serve import create_app
    app = create_app("bicubic", device="cpu", max_output_pixels=20_000, max_queue=1)
    with TestClient(app) as client:
        data = encode(rand_image(40, 40, 3, seed=12))
        r = client.post("/v1/upscale?scale=4", content=data)
        assert "160x160" in _error(r, 413, "output_too_large")
        r = client.post("/v1/upscale?scale=2", content=data)
        assert r.status_code == 200 and Image.open(io.BytesIO(r.content)).size == (80, 80)
        assert r.headers["x-distillsr-model"] == "bicubic"
        j = client.get("/v1/models").json()
        assert j["default"]["4"] == "bicubic" and j["limits"]["max_output_pixels"] == 20_000
        names = {(m["name"], m["scale"]) for m in j["models"]}
        assert ("asid", 2) in names and ("e-rfdn-release", 4) in names
        text = client.get("/metrics").text
        assert 'distillsr_requests_total{status="413"} 1' in text
        assert "distillsr_pixels_processed_total 1600" in text
        assert client.get("/").text.startswith("<!doctype html>")


def test_unknown_default_model_is_refused():
    from distillsr.serve import create_app
    with pytest.raises(ValueError, match="nosuch.*not installed"):
        create_app("nosuch", device="cpu")


def test_cli_names_the_extra_when_fastapi_is_missing(tmp_path):
    """Without the serve extra, `distillsr serve` says what to install (exit 2)."""
    blocker = tmp_path / "fastapi"
    blocker.mkdir()
    (blocker / "__init__.py").write_text("raise ImportError('blocked for this test')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(REPO / "src")]))
    r = subprocess.run([sys.executable, "-m", "distillsr", "serve", "--port", "9"], env=env,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2 and 'pip install "distillsr[serve]"' in r.stderr and "fastapi" in r.stderr


# ----------------------------------------------------------------------------- the page

def test_web_page_upscales_and_compares(main_server, tmp_path):
    from browser_helpers import artefact_dir, browser_page
    src = tmp_path / "flower.png"
    src.write_bytes((REPO / "examples" / "dandelion.png").read_bytes())
    arr, _ = imgio.read_image_native(src)
    with browser_page() as (page, errors):
        page.goto(main_server.url + "/")
        page.wait_for_function("document.querySelectorAll('#model option').length > 0")
        page.select_option("#scale", "2")
        page.select_option("#model", "asid")
        page.set_input_files("#file", str(src))
        page.wait_for_selector("#status.done", timeout=120_000)
        size = page.evaluate("[document.getElementById('after').naturalWidth, document.getElementById('after').naturalHeight]")
        assert size == [384, 256]
        before = page.evaluate("[document.getElementById('before').naturalWidth, document.getElementById('before').naturalHeight]")
        assert before == [192, 128]
        boxes = [page.locator(sel).bounding_box() for sel in ("#before", "#after")]
        assert boxes[0] == boxes[1]  # before and after at the same size, on top of each other
        assert page.locator("#download").get_attribute("download") == "flower_x2.png"
        clip0 = page.evaluate("getComputedStyle(document.getElementById('after')).clipPath")
        box = page.locator("#frame").bounding_box()
        page.mouse.click(box["x"] + box["width"] * 0.2, box["y"] + box["height"] / 2)
        clip1 = page.evaluate("getComputedStyle(document.getElementById('after')).clipPath")
        assert clip0 != clip1 and 15 < float(page.input_value("#split")) < 25
        page.select_option("#zoom", "4")
        w = page.locator("#frame").bounding_box()["width"]
        assert abs(w - 384 * 4) <= 1  # 4 screen pixels per image pixel (device pixel ratio 1)
        page.select_option("#zoom", "fit")
        page.mouse.click(box["x"] + box["width"] * 0.55, box["y"] + box["height"] / 2)
        page.screenshot(path=os.path.join(artefact_dir(), "serve_page.png"), full_page=True)
        # the result the page shows is the API's answer
        blob = page.evaluate("""async () => { const r = await fetch(document.getElementById('after').src);
                                 return Array.from(new Uint8Array(await r.arrayBuffer())); }""")
        assert_close(decode(bytes(blob)), distillsr.upscale(arr, 2, "asid", device="cpu"))
        assert errors == []
