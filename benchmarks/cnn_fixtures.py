"""Max |difference| between our RFDN / FDIWN and the authors' code on the shared fixtures.

    python3 benchmarks/cnn_fixtures.py [--shared ../shared]

Prints, per released checkpoint, the largest absolute difference on the 0..255 scale
(the fixtures' tolerance advice is 2e-3) for ``forward_native`` and for the public
[0, 1] ``forward``.
"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
import distillsr  # noqa: E402

CASES = [("rfdn_aim_x4.pth", "rfdn/rfdn_aim_x4"), ("fdiwn_x2.pt", "fdiwn/fdiwn_x2"),
         ("fdiwn_x3.pt", "fdiwn/fdiwn_x3"), ("fdiwn_x4.pt", "fdiwn/fdiwn_x4")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shared", type=Path, default=Path(__file__).resolve().parents[2] / "shared")
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    for weights, fixture in CASES:
        model = distillsr.load_model(args.shared / "weights" / "official" / weights)
        x = torch.from_numpy(np.load(args.shared / "fixtures" / f"{fixture}_input.npy"))
        ref = torch.from_numpy(np.load(args.shared / "fixtures" / f"{fixture}_output.npy"))
        with torch.no_grad():
            native = (model.forward_native(x) - ref).abs().max().item()
            public = (model(x / 255) * 255 - ref).abs().max().item()
        print(f"{weights:18s} {model.arch_name} x{model.scale}: max|diff| native {native:.2e}, [0,1] API {public:.2e}")


if __name__ == "__main__":
    main()
