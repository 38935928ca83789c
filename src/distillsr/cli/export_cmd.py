"""``distillsr export``: a network to ONNX (dynamic batch/height/width), checked with onnxruntime."""
from __future__ import annotations

import os
import sys
from pathlib import Path

PARITY_TOLERANCE = 1e-4  # max abs difference to the PyTorch output on [0, 1] images


def register(sub) -> None:
    p = sub.add_parser(
        "export", help="export a network to ONNX",
        description="Export a network to ONNX: NCHW float32 RGB in [0, 1] in and out, any batch, height "
                    "and width. Give --model/--scale (the shipped weights of that name and scale; "
                    "--random-init: an untrained network, for deployment tests) or --weights "
                    "(any checkpoint load_model accepts). The file is checked against PyTorch with "
                    "onnxruntime on an odd-sized batch before it is written.")
    p.add_argument("--model", help="registered name (optional with --weights)")
    p.add_argument("--scale", type=int, help="upscaling factor (optional with --weights)")
    p.add_argument("--weights", help="checkpoint file (safetensors, .pth, released formats)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--opset", type=int, default=None, help="ONNX opset (default 18)")
    p.add_argument("--random-init", action="store_true",
                   help="with --model/--scale: export an untrained network instead of the shipped weights")
    p.add_argument("--no-check", action="store_true", help="skip the onnxruntime parity check")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..checkpoint import CheckpointError, load_model
    from ..engine.export import DEFAULT_OPSET, ExportError, export_onnx
    from ..registry import create_model

    out = Path(args.output)
    tmp = out.with_name(f".{out.name}.partial")
    try:
        if args.weights:
            model = load_model(args.weights)
            if args.model and model.arch_name != args.model.lower():
                raise ValueError(f"{args.weights}: holds {model.arch_name}, not {args.model}")
            if args.scale and model.scale != args.scale:
                raise ValueError(f"{args.weights}: the model upscales x{model.scale}, not x{args.scale}")
        else:
            if not args.model or not args.scale:
                raise ValueError("give --model and --scale, or --weights")
            if args.random_init:
                model = create_model(args.model, args.scale).eval()
            else:
                from ..pretrained import PretrainedError, load_pretrained
                try:
                    model = load_pretrained(args.model, args.scale)
                except PretrainedError as e:
                    raise ValueError(f"{e} (--random-init exports an untrained {args.model})") from None
        if out.suffix.lower() != ".onnx":
            raise ValueError(f"{out}: the output file should end in .onnx")
        export_onnx(model, tmp, opset=args.opset or DEFAULT_OPSET)
        if not args.no_check:
            diff = _parity(model, tmp)
            print(f"onnxruntime vs PyTorch on a 2x3x21x29 batch: max abs difference {diff:.2e}")
            if not diff <= PARITY_TOLERANCE:
                raise ExportError(f"the exported graph differs from PyTorch by {diff:.2e} "
                                  f"(> {PARITY_TOLERANCE:g}); not written")
        os.replace(tmp, out)
    except (ValueError, KeyError, CheckpointError, ExportError, RuntimeError, OSError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 1 if isinstance(e, (ExportError, RuntimeError, OSError)) else 2
    finally:
        if tmp.exists():
            tmp.unlink()
    print(f"wrote {out} ({model.arch_name} x{model.scale}, opset {args.opset or DEFAULT_OPSET}, "
          f"{out.stat().st_size / 2**20:.1f} MiB)")
    return 0


def _parity(model, path) -> float:
    import torch
    from ..engine.onnx_backend import OnnxModel
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 21, 29, generator=g)
    with torch.inference_mode():
        ref = model(x)
    return float((OnnxModel(path, threads=torch.get_num_threads())(x) - ref).abs().max())
