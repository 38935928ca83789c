"""``distillsr models``: the shipped pretrained weights and every registered architecture."""
from __future__ import annotations

import json


def register(sub) -> None:
    p = sub.add_parser("models", help="list pretrained weights and architectures",
                       description="List the pretrained weights that ship with this installation "
                       "(name, scale, measured PSNR, training data) and every architecture of the "
                       "model registry with its scales and parameter counts.")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=run)


def architectures():
    """[(name, {scale: params}, paper, description)] for every registered architecture."""
    from ..registry import create_model, list_models, model_info
    rows = []
    for name in list_models():
        info = model_info(name)
        params = {s: sum(p.numel() for p in create_model(name, s).parameters()) for s in info.scales}
        rows.append((name, params, info.paper, info.description))
    return rows


def run(args) -> int:
    from ..pretrained import describe, list_pretrained
    entries = list_pretrained()
    archs = architectures()
    if args.json:
        print(json.dumps({
            "pretrained": [{"name": e.name, "scale": e.scale, "arch": e.arch, "params": e.params,
                            "psnr": e.psnr, "published": e.published, "psnr_protocol": e.psnr_protocol,
                            "training_data": e.training_data, "file": str(e.file),
                            "installed": e.installed, "sha256": e.sha256} for e in entries],
            "architectures": [{"name": n, "params": {str(s): p for s, p in ps.items()}, "paper": paper,
                               "description": d} for n, ps, paper, d in archs]}, indent=2))
        return 0
    from .weights_cmd import release_lines, release_rows
    print("Weights on this machine (distillsr upscale --model NAME --scale S; * = the default for the "
          "scale, by Set5 PSNR); PSNR on Y, measured here / published:")
    if entries:
        for line in describe(entries):
            print("  " + line)
    else:
        print("  none installed")
    print("\nReleased weights (distillsr weights pull NAME --scale S, or --model NAME pulls on first use):")
    for line in release_lines(release_rows()):
        print("  " + line)
    print("\nArchitectures (checkpoints of these load with --weights PATH):")
    if not archs:
        print("  none registered")
    for name, params, paper, desc in archs:
        scales = ", ".join(f"x{s} {n:,}" for s, n in params.items())
        extra = " - ".join(x for x in (paper, desc) if x)
        print(f"  {name:<16} params {scales}" + (f"  ({extra})" if extra else ""))
    return 0
