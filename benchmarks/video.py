"""Frames per second of ``distillsr upscale`` on a clip.

Makes a short clip with PyAV (smooth random content, 854 x 480 by default, libx264, with an
AAC track), then times, in one run: the network alone on its decoded frames (the image path,
``Upscaler.upscale_array`` frame by frame) and the whole video path (decode, upscale, encode,
copy the audio) for each ``--batch``. Prints a table; the last column is the time relative to
the network alone (within this run, so it holds on a busy machine).

    python3 benchmarks/video.py                                 # e-rfdn-release x4, 480p, CPU
    python3 benchmarks/video.py --model asid --frames 4 --batch 1 4 --device cuda
    python3 benchmarks/video.py --memory 20 200 --model bicubic --size 160x120

``--memory N1 N2 ...``: instead, the peak memory (resident set) of a fresh process that
upscales a clip of each length, to show that it does not grow with the clip's length.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from fractions import Fraction
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import av  # noqa: E402

from distillsr.engine.upscale import Upscaler, load_runner, select_device  # noqa: E402
from distillsr.engine.video import check_video_options, upscale_video  # noqa: E402


def make_clip(path: Path, width: int, height: int, frames: int) -> None:
    rng = np.random.default_rng(0)
    base = rng.integers(0, 256, (height // 8 + 2, width // 8 + 2, 3)).astype(np.float32)
    with av.open(str(path), "w") as c:
        vs = c.add_stream("libx264", rate=Fraction(30000, 1001))
        vs.width, vs.height, vs.pix_fmt = width, height, "yuv420p"
        a = c.add_stream("aac", rate=48000)
        a.layout = "stereo"
        for i in range(frames):
            img = np.kron(np.roll(base, i, axis=1), np.ones((8, 8, 1)))[:height, :width]
            img = np.clip(img + rng.normal(0, 6, img.shape), 0, 255).astype(np.uint8)
            for p in vs.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
                c.mux(p)
        for p in vs.encode():
            c.mux(p)
        for k in range(frames * 1602 // 1024 + 1):
            af = av.AudioFrame.from_ndarray(np.zeros((2, 1024), np.float32), format="fltp", layout="stereo")
            af.sample_rate, af.pts = 48000, k * 1024
            for p in a.encode(af):
                c.mux(p)
        for p in a.encode():
            c.mux(p)


def _peak_rss(args, frames: int, queue) -> None:
    """In a fresh process: upscale a clip of ``frames`` frames, report the peak RSS in MiB."""
    import resource
    width, height = map(int, args.size.lower().split("x"))
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        make_clip(clip, width, height, frames)
        device = select_device(args.device)
        up = Upscaler(load_runner(args.model, args.scale, device=device), device,
                      tile="auto" if args.tile == "auto" else int(args.tile))
        before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        res = upscale_video(clip, Path(tmp) / "out.mp4", up, check_video_options(codec=args.codec), progress=False)
        queue.put((res.frames, before, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024))


def memory(args) -> int:
    import multiprocessing as mp
    ctx = mp.get_context("spawn")
    print(f"{args.model} x{args.scale}, {args.size}, {args.codec}, device {args.device}: peak resident memory")
    print("| frames | before the clip (MiB) | peak (MiB) |")
    print("|--------|-----------------------|------------|")
    for n in args.memory:
        q = ctx.Queue()
        proc = ctx.Process(target=_peak_rss, args=(args, n, q))
        proc.start()
        frames, before, peak = q.get()
        proc.join()
        print(f"| {frames:>6} | {before:>21.0f} | {peak:>10.0f} |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="e-rfdn-release", help="weights name, or bicubic")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--size", default="854x480", help="clip size WxH")
    p.add_argument("--frames", type=int, default=6)
    p.add_argument("--batch", type=int, nargs="+", default=[1])
    p.add_argument("--codec", default="libx264")
    p.add_argument("--device", default="cpu")
    p.add_argument("--tile", default="auto")
    p.add_argument("--memory", type=int, nargs="+", default=None, metavar="FRAMES")
    args = p.parse_args(argv)
    if args.memory:
        return memory(args)
    width, height = map(int, args.size.lower().split("x"))
    device = select_device(args.device)
    runner = load_runner(args.model, args.scale, device=device)
    tile = "auto" if args.tile == "auto" else int(args.tile)
    up = Upscaler(runner, device, tile=tile)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        clip = Path(tmp) / "clip.mp4"
        make_clip(clip, width, height, args.frames)
        with av.open(str(clip)) as c:
            frames = [f.to_ndarray(format="rgb24") for f in c.decode(video=0)]
        up.upscale_array(frames[0], np.uint8)  # warm up (and the auto tile's memory estimate)
        if device.type == "cuda":
            torch.cuda.synchronize()
        t = time.perf_counter()
        for f in frames:
            up.upscale_array(f, np.uint8)
        if device.type == "cuda":
            torch.cuda.synchronize()
        base = time.perf_counter() - t
        rows.append(("network alone (image path)", "-", len(frames), base))
        for batch in args.batch:
            t = time.perf_counter()
            res = upscale_video(clip, Path(tmp) / f"out{batch}.mp4", up,
                                check_video_options(codec=args.codec, batch=batch), progress=False)
            rows.append((f"video: decode+upscale+{args.codec}+audio copy", batch, res.frames,
                         time.perf_counter() - t))
    threads = torch.get_num_threads()
    print(f"{args.model} x{args.scale}, {width}x{height} -> {width * args.scale}x{height * args.scale}, "
          f"{len(frames)} frames, device {device}" + (f" ({threads} threads)" if device.type == "cpu" else "")
          + f", tile {up.last_tile or 'whole frame'}")
    print(f"| {'path':<44} | batch | frames | seconds |    fps | vs network |")
    print(f"|{'-' * 46}|-------|--------|---------|--------|------------|")
    for name, batch, n, sec in rows:
        print(f"| {name:<44} | {batch!s:>5} | {n:>6} | {sec:>7.2f} | {n / sec:>6.3f} | {sec / base:>9.2f}x |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
