"""``distillsr eval``: PSNR / SSIM on benchmark sets with the papers' protocol."""
from __future__ import annotations

import os
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "eval", help="PSNR/SSIM (Y channel) on Set5, Set14, B100, ... with the papers' protocol",
        description="Evaluate a model (or the bicubic baseline) on benchmark sets laid out as "
                    "ROOT/<Set>/HR/<name>.png and ROOT/<Set>/LR_bicubic/X<s>/<name>x<s>.png. "
                    "Missing LR files are made from HR with MATLAB-compatible bicubic. "
                    "Scores: Y channel, border = scale, PSNR and SSIM per image, mean per set.")
    what = p.add_argument_group("what to evaluate")
    what.add_argument("--model", metavar="NAME",
                      help="'bicubic' (the classic baseline) or weights by name (`distillsr models`; a "
                           "release such as fdiwn-release is pulled on first use)")
    what.add_argument("--weights", metavar="PATH", help="a checkpoint (any format distillsr.load_model reads)")
    p.add_argument("--scale", type=int,
                   help="upscaling factor (2, 3, 4, ...); with --weights, default the checkpoint's")
    p.add_argument("--data", metavar="ROOT", default=os.environ.get("DISTILLSR_DATA"),
                   help="folder holding the sets (default: $DISTILLSR_DATA)")
    p.add_argument("--datasets", nargs="+", metavar="SET",
                   help="set folders under ROOT (default: all there, Set5 Set14 B100 Urban100 Manga109 first)")
    p.add_argument("--protocol", choices=["release"],
                   help="'release': the model's own release test path (ASID: tiles 64, overlap 24, "
                        "--ssim matlab; FDIWN: chop; RFDN/E-RFDN: whole image); sets the inference and "
                        "SSIM options below itself")
    inf = p.add_argument_group("inference")
    inf.add_argument("--tile", type=int, metavar="N",
                     help="tiled inference over the LR with N x N tiles (ASID release: --tile 64 "
                          "--tile-overlap 24); default: whole image")
    inf.add_argument("--tile-overlap", type=int, metavar="N", help="tile overlap in LR pixels (24)")
    inf.add_argument("--chop", action="store_true",
                     help="EDSR-style chop: 4 overlapping quadrants, recursive (FDIWN's test)")
    inf.add_argument("--self-ensemble", action="store_true", help="x8 flips/transpositions, averaged")
    inf.add_argument("--device", help="cpu, cuda, cuda:1, ... (default: cuda when available)")
    met = p.add_argument_group("metrics")
    met.add_argument("--ssim", choices=["wang", "matlab"],
                     help="SSIM variant: 'wang' (ssim_index, RFDN/FDIWN scripts; default) or "
                          "'matlab' (MATLAB ssim, ASID release)")
    met.add_argument("--grey", choices=["replicate", "raw"], default="replicate",
                     help="greyscale images: 'replicate' to RGB then Y (default; ASID/FDIWN) or "
                          "'raw' grey value as Y (classic bicubic rows)")
    out = p.add_argument_group("output")
    out.add_argument("--save-images", metavar="DIR", help="write SR images to DIR/<Set>/X<s>/<name>.png")
    out.add_argument("--json", metavar="PATH", help="write all results (per image too) as JSON")
    out.add_argument("--skip-bad", action="store_true",
                     help="skip unreadable or inconsistent images (reported) instead of stopping")
    out.add_argument("--no-progress", action="store_true", help="no progress bar (there is none unless "
                     "stderr is a terminal)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.evaluate import (EvalError, evaluate, format_table, load_eval_model, release_protocol_for,
                                   write_json)
    from ..engine.device import select_device
    from ..engine.infer import check_tiles

    def err(msg: str) -> None:
        print(f"distillsr eval: error: {msg}", file=sys.stderr)

    if args.model is None and args.weights is None:
        err("give --model NAME (or 'bicubic') or --weights PATH")
        return 2
    if args.data is None:
        err("give --data ROOT (the folder holding Set5, Set14, ...) or set DISTILLSR_DATA")
        return 2
    if args.protocol is not None:
        given = [f for f, v in (("--tile", args.tile), ("--tile-overlap", args.tile_overlap),
                                ("--chop", args.chop or None), ("--ssim", args.ssim)) if v is not None]
        if given:
            err(f"--protocol {args.protocol} sets {', '.join(given)} itself; leave them out")
            return 2
    args.tile_overlap = 24 if args.tile_overlap is None else args.tile_overlap
    args.ssim = args.ssim or "wang"
    if args.scale is None and args.weights is None:
        err("give --scale (it is read from the checkpoint only with --weights)")
        return 2
    if args.scale is not None and args.scale < 1:
        err(f"--scale must be a positive integer, got {args.scale}")
        return 2
    if args.tile is not None and args.chop:
        err("--tile and --chop are two different inference strategies; choose one")
        return 2
    if args.tile is not None:
        try:
            check_tiles(args.tile, args.tile_overlap)
        except ValueError as e:
            err(f"--tile / --tile-overlap: {e}")
            return 2
    try:
        device = str(select_device(args.device or "auto"))
    except ValueError as e:
        err(str(e))
        return 2
    skipped = []
    try:
        model = load_eval_model(args.model, args.weights, scale=args.scale, device=device)
        if args.scale is None:
            args.scale = model.module.scale
        if args.protocol == "release":
            proto = release_protocol_for(model)
            args.tile, args.tile_overlap, args.chop, args.ssim = (proto["tile"], proto["tile_overlap"],
                                                                  proto["chop"], proto["ssim"])
            print(f"protocol release: {proto['about']}")
        result = evaluate(model, args.scale, args.data, args.datasets, tile=args.tile,
                          tile_overlap=args.tile_overlap, self_ensemble=args.self_ensemble,
                          chop=args.chop, ssim_variant=args.ssim, grey=args.grey,
                          save_images=args.save_images, device=device, skip_bad=args.skip_bad,
                          progress=not args.no_progress and sys.stderr.isatty(), skipped=skipped)
        result["protocol"] = args.protocol
    except (EvalError, OSError) as e:  # OSError: --save-images could not write
        err(str(e))
        return 1
    print(format_table(result, chop=args.chop))
    if skipped:
        print(f"{len(skipped)} image(s) skipped (not in the means):")
        for ds, msg in skipped:
            print(f"  {ds}: {msg}")
    if args.json:
        try:
            write_json(result, args.json)
        except OSError as e:
            err(f"cannot write {args.json}: {e}")
            return 1
        print(f"wrote {args.json}")
    return 0
