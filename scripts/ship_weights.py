"""Put a trained checkpoint into the shipped-weights table, with its measured PSNR.

    python3 scripts/ship_weights.py runs/asid_x4/checkpoints/iter_00000500.safetensors \
        --name asid --only-if-better --append-notes "Then 500 more iterations in session 8 (...)."

Evaluates the checkpoint with the papers' protocol (whole image, Y channel, Wang SSIM,
grey replicate) on Set5, Set14 and B100, then writes ``<name>_x<s>.safetensors`` and its
JSON model card into ``src/distillsr/weights`` (``distillsr.pretrained.save_pretrained``).

``--only-if-better`` writes nothing (exit status 1) unless the mean PSNR of the datasets beats
the card already there. ``--append-notes`` keeps the training history of that card's notes and
adds the new text after it; its training data is kept unless ``--training-data`` is given.
"""
import argparse
import json
import re
import sys
from pathlib import Path

import distillsr
from distillsr.engine.evaluate import evaluate, format_table
from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, PretrainedError, get_pretrained, save_pretrained

# ship_weights ends every card's notes with this sentence; appended notes replace it with a new one.
_SSIM_SENTENCE = re.compile(r"\s*SSIM \(wang\): \{[^{}]*\}\.\s*$")


def mean_psnr(psnr: dict, datasets) -> float:
    """Mean PSNR over ``datasets``; a card that lacks one of them cannot be compared."""
    missing = [d for d in datasets if d not in psnr]
    if missing:
        raise KeyError(f"no PSNR for {', '.join(missing)}")
    return sum(psnr[d] for d in datasets) / len(datasets)


def merge_notes(old: str, new: str) -> str:
    """The old notes without their trailing SSIM sentence, then the new text.

    A closing sentence of the old notes that the new text ends with too (a remark such as "Far
    below the paper.") moves to the end instead of being repeated.
    """
    old, new = _SSIM_SENTENCE.sub("", old or "").strip(), new.strip()
    sentences = re.split(r"(?<=\.)\s+", old)
    if len(sentences) > 1 and new.endswith(sentences[-1]):
        old = old[:-len(sentences[-1])].rstrip()
    return " ".join(t for t in (old, new) if t)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("checkpoint")
    ap.add_argument("--name", default="asid")
    ap.add_argument("--data", default="../shared/data/benchmark")
    ap.add_argument("--datasets", nargs="+", default=["Set5", "Set14", "B100"])
    ap.add_argument("--training-data", default=None,
                    help="the card's training data (default: the existing card's with --append-notes)")
    ap.add_argument("--notes", default="", help="the card's notes (replaces the existing ones)")
    ap.add_argument("--append-notes", default=None, metavar="TEXT",
                    help="keep the existing card's notes and add TEXT after them")
    ap.add_argument("--only-if-better", action="store_true",
                    help="write nothing unless the mean PSNR beats the existing card's")
    ap.add_argument("--to", default=str(PACKAGE_WEIGHTS_DIR))
    ap.add_argument("--json", help="also write the evaluation result here")
    args = ap.parse_args(argv)
    if args.notes and args.append_notes is not None:
        ap.error("--notes replaces the card's notes and --append-notes keeps them: give one")

    model = distillsr.load_model(args.checkpoint)
    folder = Path(args.to)
    old = None
    if args.append_notes is not None or args.only_if_better:
        try:
            old = get_pretrained(args.name, model.scale, weights_dir=folder)
        except PretrainedError as e:
            print(f"error: no card {args.name.lower()}_x{model.scale}.json in {folder} to append to or "
                  f"compare with ({e})", file=sys.stderr)
            return 2

    result = evaluate(model, model.scale, args.data, args.datasets, progress=False)
    print(format_table(result))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1) + "\n")
    psnr = {r["dataset"]: round(r["psnr"], 4) for r in result["results"]}
    ssim = {r["dataset"]: round(r["ssim"], 5) for r in result["results"]}

    if args.only_if_better:
        new_mean = mean_psnr(psnr, args.datasets)
        try:
            old_mean = mean_psnr(old.psnr, args.datasets)
        except KeyError as e:
            print(f"error: the existing card cannot be compared: {e.args[0]}", file=sys.stderr)
            return 2
        verdict = f"mean PSNR {new_mean:.4f} dB vs {old_mean:.4f} dB shipped ({new_mean - old_mean:+.4f})"
        if new_mean <= old_mean:
            print(f"not shipped: {verdict}")
            return 1
        print(f"better: {verdict}")

    if args.append_notes is not None:
        notes = merge_notes(old.notes, args.append_notes)
        training_data = old.training_data if args.training_data is None else args.training_data
    else:
        notes, training_data = args.notes, args.training_data or ""
    notes = (notes + f" SSIM (wang): {json.dumps(ssim)}.").strip()
    entry = save_pretrained(model, args.name, folder, training_data=training_data, psnr=psnr,
                            psnr_protocol="Y channel, border = scale, whole image, fp32 CPU, "
                                          "SSIM wang, grey replicate (distillsr eval defaults)",
                            notes=notes)
    print(f"wrote {entry.file} (sha256 {entry.sha256[:12]}...)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
