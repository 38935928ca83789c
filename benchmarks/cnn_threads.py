"""FDIWN forward time on CPU with 1 and 2 torch threads (many small convs: threads can hurt).

    python3 benchmarks/cnn_threads.py [--scale 4] [--size 128] [--repeat 2]
"""
import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import distillsr  # noqa: E402


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="fdiwn")
    ap.add_argument("--scale", type=int, default=4)
    ap.add_argument("--size", type=int, default=128, help="LR side in pixels")
    ap.add_argument("--repeat", type=int, default=2)
    args = ap.parse_args()
    model = distillsr.create_model(args.model, args.scale).eval()
    if hasattr(model, "fold_weight_norm"):
        model.fold_weight_norm()
    x = torch.rand(1, 3, args.size, args.size)
    for _ in range(args.repeat):
        for threads in (1, 2):
            torch.set_num_threads(threads)
            with torch.no_grad():
                t = time.perf_counter()
                model(x)
            print(f"{args.model} x{args.scale} {args.size}x{args.size}: {threads} thread(s) "
                  f"{time.perf_counter() - t:.2f} s")


if __name__ == "__main__":
    main()
