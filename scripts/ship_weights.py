"""Put a trained checkpoint into the shipped-weights table, with its measured PSNR.

    python3 scripts/ship_weights.py runs/asid_x4/checkpoints/iter_00000500_ema.safetensors \
        --name asid --data ../shared/data/benchmark --training-data "..." --notes "..."

Evaluates the checkpoint with the papers' protocol (whole image, Y channel, Wang SSIM,
grey replicate) on Set5, Set14 and B100, then writes ``<name>_x<s>.safetensors`` and its
JSON model card into ``src/distillsr/weights`` (``distillsr.pretrained.save_pretrained``).
"""
import argparse
import json
from pathlib import Path

import distillsr
from distillsr.engine.evaluate import evaluate, format_table
from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, save_pretrained


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--name", default="asid")
    ap.add_argument("--data", default="../shared/data/benchmark")
    ap.add_argument("--datasets", nargs="+", default=["Set5", "Set14", "B100"])
    ap.add_argument("--training-data", default="")
    ap.add_argument("--notes", default="")
    ap.add_argument("--to", default=str(PACKAGE_WEIGHTS_DIR))
    ap.add_argument("--json", help="also write the evaluation result here")
    args = ap.parse_args()

    model = distillsr.load_model(args.checkpoint)
    result = evaluate(model, model.scale, args.data, args.datasets, progress=False)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    psnr = {r["dataset"]: round(r["psnr"], 4) for r in result["results"]}
    ssim = {r["dataset"]: round(r["ssim"], 5) for r in result["results"]}
    notes = (args.notes + f" SSIM (wang): {json.dumps(ssim)}.").strip()
    entry = save_pretrained(model, args.name, args.to, training_data=args.training_data, psnr=psnr,
                            psnr_protocol="Y channel, border = scale, whole image, fp32 CPU, "
                                          "SSIM wang, grey replicate (distillsr eval defaults)",
                            notes=notes)
    print(f"wrote {entry.file} (sha256 {entry.sha256[:12]}...)")


if __name__ == "__main__":
    main()
