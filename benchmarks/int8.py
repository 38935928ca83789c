"""int8 (``distillsr quantize``) against fp32, in one run: PSNR cost and speed.

    python3 benchmarks/int8.py                                  # E-RFDN, FDIWN, ASID x4
    python3 benchmarks/int8.py --models e-rfdn --sets Set5 --repeats 3

For each network (x4): the fp32 ONNX export, its static int8 quantisation (the defaults of
``distillsr quantize``: QDQ, per-channel weights, 32 calibration patches of the training photos,
sensitive units kept float), then

* PSNR (Y, border 4) on the benchmark sets of: our torch fast path
  (``distillsr.kernels.prepare_for_inference``), the fp32 export in onnxruntime, the int8 file
  in onnxruntime (both through ``OnnxModel``, as ``distillsr eval --weights FILE.onnx`` runs them);
* seconds per 1280x720 output (320x180 LR), the three runners interleaved round by round,
  median of ``--repeats``; ratios are taken within the run.

Networks: e-rfdn = the released RFDN_AIM x4 checkpoint, fdiwn = the released FDIWN x4,
asid = the bundled ASID x4 weights. Exports and int8 files are kept in ``--work`` and reused.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

SHARED = Path(os.environ.get("DISTILLSR_SHARED", HERE.parent.parent / "shared"))
SOURCES = {  # name -> (weights file or bundled name, scale)
    "e-rfdn": ("weights/official/rfdn_aim_x4.pth", 4),
    "fdiwn": ("weights/official/fdiwn_x4_state.pth", 4),
    "asid": ("asid", 4),
}


def load_torch(name: str):
    from distillsr.checkpoint import load_model
    from distillsr.pretrained import load_pretrained
    src, scale = SOURCES[name]
    if src.startswith("weights/"):
        return load_model(SHARED / src)
    return load_pretrained(src, scale)


def prepare(name: str, work: Path, calib: Path, log) -> dict:
    from distillsr.engine.quantize import quantize
    fp32, int8 = prepare_fp32(name, work, log), work / f"{name}_x4_int8.onnx"
    info = {}
    report_path = work / f"{name}_x4_int8.json"
    if not int8.is_file() or not report_path.is_file():
        from distillsr.engine.quantize import _load_proto, auto_granularity
        granularity = auto_granularity(_load_proto(fp32))
        report = quantize(fp32, int8, calib_dir=calib, granularity=granularity, log=log)
        report_path.write_text(report.to_json())
    info["report"] = json.loads(report_path.read_text())
    info["fp32"], info["int8"] = fp32, int8
    return info


def psnr_rows(name: str, runners: dict, data: Path, sets, log) -> list:
    from distillsr.engine.evaluate import evaluate
    rows = []
    for ds in sets:
        row = {"model": name, "set": ds}
        for key, runner in runners.items():
            t = time.perf_counter()
            r = evaluate(runner, 4, data, [ds], device="cpu")
            row[key] = r["results"][0]["psnr"]
            log(f"{name} {ds} {key}: {row[key]:.4f} dB ({time.perf_counter() - t:.0f} s)")
        rows.append(row)
    return rows


def speed_row(name: str, runners: dict, repeats: int, lr=(180, 320)) -> dict:
    import torch
    x = torch.rand(1, 3, *lr)
    times = {k: [] for k in runners}
    with torch.inference_mode():
        for fn in runners.values():  # warm-up
            fn(x)
        for _ in range(repeats):  # interleaved: each round runs all of them
            for key, fn in runners.items():
                t = time.perf_counter()
                fn(x)
                times[key].append(time.perf_counter() - t)
    return {"model": name, **{k: statistics.median(v) for k, v in times.items()},
            "all": {k: [round(t, 4) for t in v] for k, v in times.items()}}


def curve(args, work: Path, log) -> int:
    """Set5 cost and speed of E-RFDN x4 with the first k layers of the keep-float order float."""
    from distillsr.engine.onnx_backend import OnnxModel
    from distillsr.engine.quantize import quantize
    fp32 = prepare_fp32("e-rfdn", work, log)
    layer_json = work / "e-rfdn_x4_layer.json"
    if not layer_json.is_file():
        report = quantize(fp32, work / "e-rfdn_x4_layer.onnx", calib_dir=args.calib, granularity="layer", log=log)
        layer_json.write_text(report.to_json())
    from distillsr.engine.quantize import ISLAND_SHARE
    # the order distillsr quantize keeps units float in: PSNR saved per share of run time
    units = sorted(json.loads(layer_json.read_text())["units"],
                   key=lambda u: -u["drop_db"] / ((u.get("time_share") or 0.0) + ISLAND_SHARE))
    runners = {"ort_fp32": OnnxModel(fp32)}
    for k in [int(v) for v in args.curve.split(",")]:
        path = work / f"e-rfdn_x4_float{k}.onnx"
        quantize(fp32, path, calib_dir=args.calib, granularity="layer", keep_float=[u["unit"] for u in units[:k]])
        runners[f"int8_float{k}"] = OnnxModel(path)
    row = psnr_rows("e-rfdn", runners, Path(args.data), ["Set5"], log)[0]
    speed = speed_row("e-rfdn", runners, args.repeats)
    print(f"E-RFDN x4: the first k of {len(units)} layers kept float (order of distillsr quantize); "
          f"Set5 PSNR and seconds per 1280x720 output (median of {args.repeats}, interleaved)")
    print(f"{'runner':<14} {'Set5 dB':>8} {'cost':>7} {'seconds':>8} {'speed-up':>9}")
    for key in runners:
        print(f"{key:<14} {row[key]:>8.3f} {row[key] - row['ort_fp32']:>+7.3f} {speed[key]:>8.3f} "
              f"{speed['ort_fp32'] / speed[key]:>8.2f}x")
    return 0


def prepare_fp32(name: str, work: Path, log) -> Path:
    from distillsr.engine.export import export_onnx
    fp32 = work / f"{name}_x4_fp32.onnx"
    if not fp32.is_file():
        t = time.perf_counter()
        export_onnx(load_torch(name), fp32)
        log(f"{name}: exported in {time.perf_counter() - t:.0f} s")
    return fp32


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", default="e-rfdn,fdiwn,asid")
    p.add_argument("--sets", default="Set5,Set14,B100")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--work", default="/tmp/distillsr-int8", help="exports and int8 files (reused)")
    p.add_argument("--calib", default=str(SHARED / "data" / "train_photos"))
    p.add_argument("--data", default=str(SHARED / "data" / "benchmark"))
    p.add_argument("--json", help="write the results here")
    p.add_argument("--curve", metavar="K,K,...",
                   help="instead: E-RFDN with its first K layers float (in the order distillsr quantize "
                        "keeps them float, from WORK/e-rfdn_x4_layer.json, made first if missing): Set5 "
                        "cost and speed")
    args = p.parse_args()

    import torch
    from distillsr.engine.onnx_backend import OnnxModel
    from distillsr.kernels import prepare_for_inference

    def log(msg):
        print(msg, file=sys.stderr, flush=True)

    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    if args.curve:
        return curve(args, work, log)
    psnr, speed, reports = [], [], {}
    for name in args.models.split(","):
        info = prepare(name, work, Path(args.calib), log)
        reports[name] = info["report"]
        runners = {"torch": prepare_for_inference(load_torch(name)),
                   "ort_fp32": OnnxModel(info["fp32"]), "ort_int8": OnnxModel(info["int8"])}
        psnr += psnr_rows(name, runners, Path(args.data), args.sets.split(","), log)
        speed.append(speed_row(name, runners, args.repeats))
        log(f"{name} speed: " + ", ".join(f"{k} {speed[-1][k]:.3f} s" for k in runners))

    print(f"int8 vs fp32, x4; {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads, "
          f"onnxruntime {__import__('onnxruntime').__version__}, torch {torch.__version__}")
    print("\nPSNR (Y, dB)")
    print(f"{'model':<8} {'set':<6} {'torch fast':>10} {'ort fp32':>9} {'ort int8':>9} {'int8 cost':>9}")
    for r in psnr:
        print(f"{r['model']:<8} {r['set']:<6} {r['torch']:>10.3f} {r['ort_fp32']:>9.3f} {r['ort_int8']:>9.3f} "
              f"{r['ort_int8'] - r['ort_fp32']:>+9.3f}")
    print(f"\nseconds per 1280x720 output (median of {args.repeats}, interleaved)")
    print(f"{'model':<8} {'torch fast':>10} {'ort fp32':>9} {'ort int8':>9} {'int8/fp32 ort':>14} "
          f"{'int8/torch':>11} {'float units':>12}")
    for r in speed:
        rep = reports[r["model"]]
        kept = f"{len(rep['kept_float'])}/{len(rep['units'])}" if rep["units"] else "-"
        print(f"{r['model']:<8} {r['torch']:>10.3f} {r['ort_fp32']:>9.3f} {r['ort_int8']:>9.3f} "
              f"{r['ort_fp32'] / r['ort_int8']:>13.2f}x {r['torch'] / r['ort_int8']:>10.2f}x {kept:>12}")
    if args.json:
        Path(args.json).write_text(json.dumps({"psnr": psnr, "speed": speed, "reports": reports}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
