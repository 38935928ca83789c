"""``distillsr quantize``: a network to an int8 ONNX file (onnxruntime QDQ), with a sensitivity report."""
from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path

CALIB_HELP = ("folder of photos to calibrate on (default: $DISTILLSR_DATA/../train_photos when it "
              "exists; static quantisation refuses to run without photos)")


def register(sub) -> None:
    from ..engine.quantize import GRANULARITIES, METHODS
    p = sub.add_parser(
        "quantize", help="quantise a network to int8 ONNX (onnxruntime)",
        description="Quantise a network to an int8 ONNX file that `distillsr eval --weights FILE.onnx` and "
                    "`distillsr upscale --weights FILE.onnx` run with onnxruntime. static (default): QDQ, "
                    "per-channel int8 weights, uint8 activations calibrated on LR patches of photos; "
                    "LayerNorm and Softmax stay float, and so do the layers that save the most PSNR per "
                    "share of run time until the "
                    "PSNR cost on held-out patches is within --max-drop. The per-layer sensitivity "
                    "table is printed and written to FILE.sensitivity.json. dynamic: int8 weights, "
                    "activations quantised per run, no photos needed.")
    p.add_argument("--model", help="weights by name (`distillsr models`); needs --scale")
    p.add_argument("--weights", help="a checkpoint (any format distillsr.load_model reads) or an fp32 "
                                     "ONNX export from `distillsr export`")
    p.add_argument("--scale", type=int, help="upscaling factor (with --weights: checked against the file)")
    p.add_argument("-o", "--output", required=True, help="output .onnx file")
    p.add_argument("--method", choices=METHODS, default="static", help="static (default) or dynamic")
    p.add_argument("--calib", metavar="DIR", help=CALIB_HELP)
    p.add_argument("--calib-count", type=int, default=32, metavar="N",
                   help="LR patches to calibrate on (default 32, two per photo)")
    p.add_argument("--calib-size", type=int, default=64, metavar="PX", help="LR patch side (default 64)")
    p.add_argument("--check-count", type=int, default=16, metavar="N",
                   help="held-out patches the sensitivity is scored on (default 16)")
    p.add_argument("--sensitivity", choices=("auto",) + GRANULARITIES, default="auto",
                   help="sensitivity unit: layer (each module's own nodes), block (top-level modules), "
                        "then the last block kept float cut to its leading nodes; off (quantise all but "
                        "LayerNorm/Softmax); auto (block when modules nest, else layer; the default)")
    p.add_argument("--max-drop", type=float, default=0.15, metavar="DB",
                   help="PSNR cost allowed on the held-out patches (default 0.15 dB; these detailed "
                        "crops lose more than the benchmark sets: 0.13 dB there was 0.09 dB on Set5 "
                        "for E-RFDN x4)")
    p.add_argument("--report", metavar="PATH", help="sensitivity JSON (default: OUTPUT.sensitivity.json)")
    p.set_defaults(func=run)


def default_calib_dir():
    """``$DISTILLSR_DATA/../train_photos`` when that folder exists, else None."""
    data = os.environ.get("DISTILLSR_DATA")
    if data:
        photos = Path(data).parent / "train_photos"
        if photos.is_dir():
            return photos
    return None


def run(args) -> int:
    from ..checkpoint import CheckpointError
    from ..engine.export import ExportError
    from ..engine.quantize import QuantizeError, format_report, quantize
    from ..io import atomic_write_text

    def err(msg: str, code: int) -> int:
        print(f"distillsr quantize: error: {msg}", file=sys.stderr)
        return code

    out = Path(args.output)
    if out.suffix.lower() != ".onnx":
        return err(f"{out}: the output file should end in .onnx", 2)
    if args.weights is None and (args.model is None or args.scale is None):
        return err("give --model NAME with --scale S, or --weights FILE", 2)
    for name, value in (("--calib-count", args.calib_count), ("--calib-size", args.calib_size),
                        ("--check-count", args.check_count)):
        if value < 1:
            return err(f"{name} must be >= 1, got {value}", 2)
    calib = args.calib
    if args.method == "static":
        calib = Path(calib) if calib else default_calib_dir()
        if calib is None:
            return err("static quantisation calibrates on photos: give --calib DIR (a folder of photos), "
                       "or set DISTILLSR_DATA so that $DISTILLSR_DATA/../train_photos exists", 2)
        if not calib.is_dir():
            return err(f"--calib {calib}: no such folder", 2)
    report_path = Path(args.report) if args.report else out.with_name(out.name + ".sensitivity.json")
    try:
        with tempfile.TemporaryDirectory(prefix="distillsr-quantize-") as tmp:
            src = _fp32_export(args, Path(tmp))
            granularity = args.sensitivity
            if granularity == "auto":
                granularity = _auto_granularity(src)
            report = quantize(src, out, method=args.method, calib_dir=calib, calib_count=args.calib_count,
                              calib_size=args.calib_size, check_count=args.check_count,
                              granularity=granularity, max_drop=args.max_drop,
                              log=lambda msg: print(msg, flush=True))
    except (ValueError, KeyError, CheckpointError, QuantizeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        return err(str(msg), 2)
    except (ExportError, RuntimeError, OSError) as e:
        return err(str(e), 1)
    print(format_report(report))
    if report.units or args.method == "static":
        try:
            atomic_write_text(report_path, report.to_json() + "\n")
        except OSError as e:
            return err(f"cannot write {report_path}: {e}", 1)
        print(f"wrote {report_path}")
    print(f"wrote {out} ({report.arch} x{report.scale}, int8 {report.method}, "
          f"{out.stat().st_size / 2**20:.1f} MiB, {report.seconds:.0f} s)")
    return 0


def _auto_granularity(src: Path) -> str:
    from ..engine.quantize import _load_proto, auto_granularity
    return auto_granularity(_load_proto(src))


def _fp32_export(args, tmp: Path) -> Path:
    """The fp32 ONNX file to quantise: the given export, or the network exported to ``tmp``."""
    from ..engine.backends import is_onnx_file
    from ..engine.export import export_onnx
    if args.weights and is_onnx_file(args.weights):
        from ..engine.quantize import _load_proto, onnx_scale
        path = Path(args.weights)
        if not path.is_file():
            raise ValueError(f"{path}: no such file")
        scale = onnx_scale(_load_proto(path))
        if args.scale is not None and scale != args.scale:
            raise ValueError(f"{path}: the export upscales x{scale}, not x{args.scale}")
        return path
    if args.weights:
        from ..checkpoint import load_model
        model = load_model(args.weights)
        if args.model and model.arch_name != args.model.lower():
            raise ValueError(f"{args.weights}: holds {model.arch_name}, not {args.model}")
        if args.scale is not None and model.scale != args.scale:
            raise ValueError(f"{args.weights}: the model upscales x{model.scale}, not x{args.scale}")
    else:
        from ..pretrained import PretrainedError, load_pretrained
        try:
            model = load_pretrained(args.model, args.scale)
        except PretrainedError as e:
            raise ValueError(str(e)) from None
    print(f"exporting {model.arch_name} x{model.scale} to fp32 ONNX (a minute or more for large graphs)")
    return export_onnx(model, tmp / "fp32.onnx")
