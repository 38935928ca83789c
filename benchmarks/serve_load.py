"""Load test of ``distillsr serve``: N clients at a time send small images to a real server
process and every answer is checked; prints a table of throughput, latency and rejections.

    PYTHONPATH=src python benchmarks/serve_load.py --clients 16 --requests 400 --max-queue 4

Each client sends its own image (so a mix-up between clients would show) and backs off 20-60 ms
after a 429/503. Latency is measured by the client, from sending to the last byte.
"""
from __future__ import annotations

import argparse
import io
import os
import re
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    text = Path(f"/proc/{pid}/status").read_text()
    return int(re.search(r"VmRSS:\s+(\d+) kB", text).group(1)) / 1024


def png(arr: np.ndarray) -> bytes:
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def in_process_rate(image: bytes, args, n: int) -> float:
    """Images per second of the same job without HTTP: ``Upscaler.upscale_file`` in this
    process, as many torch threads as the server."""
    import torch
    from distillsr.engine.upscale import Upscaler, load_runner
    torch.set_num_threads(args.threads)
    up = Upscaler(load_runner(args.model, args.scale, device="cpu"), "cpu")
    with tempfile.TemporaryDirectory() as d:
        src, dst = Path(d, "in.png"), Path(d, "out.png")
        src.write_bytes(image)
        up.upscale_file(src, dst)  # warm-up (and the tile choice's probe)
        t0 = time.perf_counter()
        for _ in range(n):
            up.upscale_file(src, dst)
        return n / (time.perf_counter() - t0)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--clients", type=int, default=16)
    ap.add_argument("--requests", type=int, default=400, help="requests in all")
    ap.add_argument("--max-queue", type=int, default=4)
    ap.add_argument("--size", type=int, default=32, help="side of the square test images (LR pixels)")
    ap.add_argument("--scale", type=int, default=2)
    ap.add_argument("--model", default="asid")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the server (OMP_NUM_THREADS)")
    args = ap.parse_args()

    import httpx
    from PIL import Image

    port = free_port()
    url = f"http://127.0.0.1:{port}"
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"), OMP_NUM_THREADS=str(args.threads))
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen([sys.executable, "-m", "distillsr", "serve", "--port", str(port), "--device", "cpu",
                             "--max-queue", str(args.max_queue), "--model", args.model],
                            env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        t_start = time.monotonic()
        while True:
            if proc.poll() is not None:
                log.seek(0)
                print(log.read().decode(errors="replace"), file=sys.stderr)
                return 1
            try:
                if httpx.get(url + "/healthz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        startup = time.monotonic() - t_start
        rng = np.random.default_rng(0)
        images = [png(rng.integers(0, 256, (args.size, args.size, 3), dtype=np.uint8)) for _ in range(args.clients)]
        out_size = (args.size * args.scale, args.size * args.scale)
        with httpx.Client(base_url=url, timeout=300) as c:  # warm-up, and each client's right answer
            expect = [c.post("/v1/upscale", params={"scale": args.scale}, content=im).content for im in images]
        rss0 = rss_mb(proc.pid)
        lock = threading.Lock()
        records = []  # (status, seconds, correct)
        remaining = [args.requests]

        def client(k: int) -> None:
            backoff = np.random.default_rng(k)
            with httpx.Client(base_url=url, timeout=300) as c:
                while True:
                    with lock:
                        if remaining[0] <= 0:
                            return
                        remaining[0] -= 1
                    t0 = time.perf_counter()
                    r = c.post("/v1/upscale", params={"scale": args.scale}, content=images[k])
                    dt = time.perf_counter() - t0
                    ok = None
                    if r.status_code == 200:
                        ok = r.content == expect[k] and Image.open(io.BytesIO(r.content)).size == out_size
                    with lock:
                        records.append((r.status_code, dt, ok))
                    if r.status_code in (429, 503):
                        time.sleep(backoff.uniform(0.02, 0.06))

        t0 = time.perf_counter()
        threads = [threading.Thread(target=client, args=(k,)) for k in range(args.clients)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        wall = time.perf_counter() - t0
        rss1 = rss_mb(proc.pid)
    finally:
        proc.terminate()
        proc.wait(timeout=30)

    base = in_process_rate(images[0], args, n=10)
    codes = [s for s, _, _ in records]
    served = [dt for s, dt, _ in records if s == 200]
    rejected = [dt for s, dt, _ in records if s in (429, 503)]
    wrong = sum(1 for s, _, ok in records if s == 200 and not ok)
    other = len(records) - len(served) - len(rejected)

    def pct(v, q):
        return f"{np.percentile(v, q) * 1000:.0f} ms" if v else "-"
    rows = [
        ("server", f"{args.model} x{args.scale}, {args.size}x{args.size} PNG in, --max-queue {args.max_queue}, "
                   f"{args.threads} torch thread(s); started in {startup:.1f} s"),
        ("clients / requests", f"{args.clients} / {len(records)} in {wall:.1f} s"),
        ("answers per second", f"{len(records) / wall:.1f}"),
        ("images per second (200)", f"{len(served) / wall:.1f}"),
        ("200 / 429+503 / other", f"{len(served)} / {len(rejected)} / {other}"),
        ("wrong images", str(wrong)),
        ("latency of 200s p50 / p99", f"{pct(served, 50)} / {pct(served, 99)}"),
        ("latency of 429s p50 / p99", f"{pct(rejected, 50)} / {pct(rejected, 99)}"),
        ("server RSS before / after", f"{rss0:.0f} MB / {rss1:.0f} MB"),
        ("same job in-process, images/s", f"{base:.1f} (Upscaler.upscale_file, no HTTP, after the load)"),
    ]
    width = max(len(k) for k, _ in rows)
    for k, v in rows:
        print(f"{k:<{width}}  {v}")
    print("status counts:", {s: codes.count(s) for s in sorted(set(codes))})
    return 0 if wrong == 0 and other == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
