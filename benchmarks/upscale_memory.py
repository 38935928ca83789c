"""Peak memory of `distillsr upscale` on a 4000x3000 photo-sized input, tiled vs whole image.

    python3 benchmarks/upscale_memory.py            # prints both runs

Each run is a fresh process that upscales a 4000x3000 RGB PNG x2 into an 8000x6000 JPEG
with `Upscaler.upscale_file` on CPU and reports how much its peak RSS grew during the
call. The peak is the process's VmHWM (Linux /proc/self/status), not getrusage's ru_maxrss:
ru_maxrss survives exec, so a child started by a big parent (pytest with torch loaded, the
4000x3000 test image just made) starts with the parent's peak and would hide growth. The network is nearly free (nearest upscale times a learned gain), so what
is measured is the pipeline's own buffers: the float input, the uint8 output, the bands of
tiles, the encoder. tests/test_upscale.py runs the worker mode of this script.

    python3 benchmarks/upscale_memory.py --worker IN.png OUT.jpg TILE BUDGET
        TILE: auto | N | 0 (whole image); BUDGET: bytes the network may use with auto
        prints "<tile used or None> <peak RSS growth in bytes>"
"""
from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def make_input(path: Path, width: int = 4000, height: int = 3000) -> None:
    import numpy as np
    from PIL import Image
    yy, xx = np.mgrid[0:height, 0:width]
    img = np.stack([xx % 256, yy % 256, (xx + yy) % 256], axis=-1).astype(np.uint8)
    Image.fromarray(img).save(path, compress_level=1)


def peak_rss() -> int:
    """Peak resident set size of this process's address space, in bytes (Linux)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no VmHWM in /proc/self/status (Linux only)")


def worker(src: str, dst: str, tile: str, budget: str) -> None:
    import torch
    import torch.nn.functional as F
    torch.set_num_threads(2)
    from distillsr.engine.upscale import Upscaler
    from distillsr.models.base import SRNet

    class Cheap(SRNet):
        def __init__(self):
            super().__init__()
            self.scale = 2
            self.gain = torch.nn.Parameter(torch.ones(1))

        def forward_native(self, x):
            return F.interpolate(x, scale_factor=2, mode="nearest") * self.gain

    up = Upscaler(Cheap().eval(), "cpu", tile=tile if tile == "auto" else int(tile), memory_budget=int(budget))
    before = peak_rss()
    up.upscale_file(src, dst)
    print(up.last_tile, peak_rss() - before)


def run_worker(src, dst, tile, budget) -> tuple:
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    res = subprocess.run([sys.executable, __file__, "--worker", str(src), str(dst), str(tile), str(budget)],
                         capture_output=True, text=True, env=env, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(res.stderr)
    tile_used, growth = res.stdout.split()
    return tile_used, int(growth)


def main() -> int:
    if sys.argv[1:2] == ["--worker"]:
        worker(*sys.argv[2:6])
        return 0
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "big.png"
        make_input(src)
        for tile in ("auto", "0"):
            used, growth = run_worker(src, Path(d) / "big_x2.jpg", tile, 64 << 20)
            print(f"tile={tile:<4} (64 MiB budget): tile used {used}, peak RSS growth {growth / 2**20:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
