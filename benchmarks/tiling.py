"""How far tiled upscaling is from whole-image upscaling.

Runs the upscale pipeline (distillsr.engine.upscale.Upscaler: bands of overlapping tiles,
blended) with several tile sizes and compares each result with the whole-image result:
max and mean absolute difference (in 8-bit levels, of the [0, 1] output x 255) and the
PSNR of the tiled output against the whole-image one.

    python3 benchmarks/tiling.py                       # ASID x4 on examples/dandelion.png
    python3 benchmarks/tiling.py --tiles 64 128 --overlap 8 16 32 --blend mean feather

The model: shipped pretrained weights when `--model NAME` has them for the scale, a
checkpoint with `--weights PATH`, else the architecture with random weights (seed 0); the
output says which.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from distillsr import create_model, io as imgio  # noqa: E402
from distillsr.engine.upscale import DEFAULT_BLEND, DEFAULT_OVERLAP, Upscaler, load_runner  # noqa: E402
from distillsr.pretrained import PretrainedError  # noqa: E402


class Counter:
    """Stands in for a progress bar: counts the model calls (tiles)."""
    n = 0

    def reset(self, total=None):
        self.n = 0

    def update(self, k=1):
        self.n += k


def build(args):
    if args.weights:
        return load_runner(scale=args.scale, weights=args.weights), f"checkpoint {args.weights}"
    try:
        return load_runner(args.model, args.scale), f"pretrained weights '{args.model}' x{args.scale}"
    except PretrainedError:
        torch.manual_seed(args.seed)
        return create_model(args.model, args.scale).eval(), f"{args.model} x{args.scale}, random init (seed {args.seed})"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--image", default=str(REPO / "examples" / "dandelion.png"))
    p.add_argument("--model", default="asid")
    p.add_argument("--weights", default=None)
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--tiles", type=int, nargs="+", default=[64, 96, 128])
    p.add_argument("--overlap", type=int, nargs="+", default=[DEFAULT_OVERLAP])
    p.add_argument("--blend", nargs="+", default=[DEFAULT_BLEND], choices=("mean", "feather"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    model, what = build(args)
    image, info = imgio.read_image(args.image)
    image = image[:, :, :3] if info.channels >= 3 else np.repeat(image[:, :, :1], 3, axis=2)
    h, w = image.shape[:2]
    print(f"model: {what}; image: {args.image} ({w}x{h}); device cpu, {args.threads} threads")
    t = time.perf_counter()
    whole = Upscaler(model, "cpu", tile=None).upscale_array(image, np.float32)
    print(f"whole image: {time.perf_counter() - t:.1f} s")
    print(f"{'tile':>5} {'overlap':>7} {'blend':>8} {'tiles':>5} {'max |diff|':>10} {'mean |diff|':>11} "
          f"{'PSNR vs whole':>13} {'time':>6}")
    for tile in args.tiles:
        for overlap in args.overlap:
            for blend in args.blend:
                if tile <= 2 * overlap:
                    continue
                up = Upscaler(model, "cpu", tile=tile, tile_overlap=overlap, blend=blend)
                calls = Counter()
                t = time.perf_counter()
                out = up.upscale_array(image, np.float32, bar=calls)
                dt = time.perf_counter() - t
                diff = np.abs(out.astype(np.float64) - whole) * 255
                mse = (diff ** 2).mean()
                psnr = 10 * np.log10(255 ** 2 / mse) if mse > 0 else float("inf")
                print(f"{tile:>5} {overlap:>7} {blend:>8} {calls.n:>5} "
                      f"{diff.max():>10.2f} {diff.mean():>11.4f} {psnr:>10.2f} dB {dt:>5.1f}s")
    print("differences in 8-bit levels (output in [0, 1] x 255)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
