"""Speed of the MATLAB-compatible bicubic imresize.

    python3 benchmarks/bench_imresize.py [--threads 1] [--device cpu]

* numpy, uint8 (bit-exact): all 119 benchmark HR images x2/x3/x4 (../shared/data/benchmark)
  or, without it, 119 random 480x320 images;
* torch, uint8-exact path, same images;
* torch, float path (training): a batch of 16 x 3 x 192 x 192 HR patches shrunk x2/x3/x4.
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
from distillsr.data.benchmark import modcrop, read_image  # noqa: E402
from distillsr.data.imresize import imresize, imresize_torch  # noqa: E402


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--data", default=str(Path(__file__).resolve().parents[2] / "shared" / "data" / "benchmark"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    paths = sorted(Path(args.data).glob("*/HR/*.png"))
    if paths:
        imgs = [read_image(p) for p in paths]
    else:
        rng = np.random.default_rng(0)
        imgs = [rng.integers(0, 256, (320, 480, 3), dtype=np.uint8) for _ in range(119)]
    print(f"{len(imgs)} images, {args.threads} thread(s), device {args.device}")

    t = time.perf_counter()
    for s in (2, 3, 4):
        for im in imgs:
            imresize(modcrop(im, s), 1 / s)
    print(f"numpy uint8, {3 * len(imgs)} downscales: {time.perf_counter() - t:.2f} s")

    t = time.perf_counter()
    for s in (2, 3, 4):
        for im in imgs:
            x = torch.from_numpy(np.ascontiguousarray(modcrop(im, s).transpose(2, 0, 1))).to(args.device)
            imresize_torch(x, 1 / s)
    if args.device.startswith("cuda"):
        torch.cuda.synchronize()
    print(f"torch uint8-exact, {3 * len(imgs)} downscales: {time.perf_counter() - t:.2f} s")

    batch = torch.rand(16, 3, 192, 192, device=args.device)
    for s in (2, 3, 4):
        imresize_torch(batch, 1 / s)  # warm-up (weights cached)
        n = 50
        t = time.perf_counter()
        for _ in range(n):
            imresize_torch(batch, 1 / s)
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        print(f"torch float32, 16x3x192x192 -> x1/{s}: {(time.perf_counter() - t) / n * 1000:.2f} ms per batch")


if __name__ == "__main__":
    main()
