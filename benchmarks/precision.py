"""How much bf16 / fp16 inference changes the results, on Set5 / Set14 x4.

    python3 benchmarks/precision.py [--sets Set5,Set14] [--dtypes bf16,fp16]

For each model: PSNR-Y (crop = scale, MATLAB Y, ``distillsr.metrics``) of the fp32
result against HR, the same for each reduced precision, and the PSNR of the reduced-
precision result against the fp32 result (how far it moved). Models: the released,
trained E-RFDN and FDIWN x4 weights in ../shared/weights/official, and the ASID x4
weights shipped in the package (``distillsr.load_pretrained``). Weights and input are
cast (``model.to(dtype)``); CPU; the networks prepared for inference as the CLI runs them
(``distillsr.kernels.prepare_for_inference``).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

import distillsr  # noqa: E402
from distillsr import io as imgio  # noqa: E402
from distillsr.kernels import prepare_for_inference  # noqa: E402
from distillsr.metrics import psnr, to_uint8, y_channel  # noqa: E402
from distillsr.pretrained import load_pretrained  # noqa: E402

SHARED = HERE.parent.parent / "shared"
MODELS = [("e-rfdn x4 (released weights)", SHARED / "weights/official/rfdn_aim_x4.pth", True),
          ("fdiwn x4 (released weights)", SHARED / "weights/official/fdiwn_x4_state.pth", True),
          ("asid x4 (shipped weights)", "pretrained:asid", True)]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sets", default="Set5,Set14")
    p.add_argument("--dtypes", default="bf16,fp16")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    dtypes = [d for d in args.dtypes.split(",") if d]
    print("| model | set | fp32 PSNR | " + " | ".join(f"{d} PSNR | {d} vs fp32 (dB)" for d in dtypes) + " |")
    print("|---|---|---|" + "---|---|" * len(dtypes))
    for label, weights, trained in MODELS:
        if weights == "pretrained:asid":
            model = load_pretrained("asid", 4).eval()
        elif not weights.is_file():
            print(f"| {label} | missing {weights} |")
            continue
        else:
            model = distillsr.load_model(weights).eval()
        prepare_for_inference(model)
        s = model.scale
        for name in args.sets.split(","):
            root = SHARED / "data/benchmark" / name
            scores = {k: [] for k in ["fp32"] + dtypes + [d + "_vs" for d in dtypes]}
            for hr_path in sorted((root / "HR").glob("*.png")):
                lr_path = root / "LR_bicubic" / f"X{s}" / f"{hr_path.stem}x{s}.png"
                hr = imgio.read_image_native(hr_path)[0]
                lr = imgio.read_image(lr_path)[0]
                if lr.ndim == 2 or lr.shape[-1] == 1:
                    lr = np.repeat(lr.reshape(*lr.shape[:2], 1), 3, axis=2)
                x = torch.from_numpy(np.ascontiguousarray(lr[..., :3])).permute(2, 0, 1)[None]
                outs = {}
                with torch.inference_mode():
                    outs["fp32"] = model.float()(x)
                    for d in dtypes:
                        try:
                            outs[d] = model.to(DTYPES[d])(x.to(DTYPES[d])).float()
                        except RuntimeError as e:  # an op without a CPU kernel for the dtype
                            outs[d] = None
                            print(f"# {label} {d}: {str(e).splitlines()[0]}", file=sys.stderr)
                model.float()
                hr_y = y_channel(hr)
                sr = {k: None if v is None else to_uint8(v[0].permute(1, 2, 0).clamp(0, 1).numpy())
                      for k, v in outs.items()}
                scores["fp32"].append(psnr(y_channel(sr["fp32"]), hr_y, crop=s))
                for d in dtypes:
                    if sr[d] is None:
                        continue
                    scores[d].append(psnr(y_channel(sr[d]), hr_y, crop=s))
                    ref = outs["fp32"][0].clamp(0, 1)
                    mse = float((outs[d][0].clamp(0, 1) - ref).double().pow(2).mean())
                    scores[d + "_vs"].append(10 * np.log10(1 / mse) if mse > 0 else float("inf"))

            def fmt(v, meaningful=True):
                return "-" if not v else (f"{np.mean(v):.3f}" if meaningful else f"({np.mean(v):.2f})")
            row = [label, name, fmt(scores["fp32"], trained)]
            for d in dtypes:
                row += [fmt(scores[d], trained), fmt(scores[d + "_vs"])]
            print("| " + " | ".join(row) + " |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
