"""``distillsr degrade``: MATLAB-bicubic LR images from a folder of HR images."""
from __future__ import annotations

import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "degrade", help="make MATLAB-bicubic LR images (LR_bicubic/X<s>/<name>x<s>.png) from HR images",
        description="Shrink every image of HR_DIR by each scale with MATLAB-compatible bicubic imresize "
                    "(uint8, bit-exact), after cropping it to a multiple of the scale, and write "
                    "OUT_DIR/LR_bicubic/X<s>/<name>x<s>.png -- the layout of DIV2K and the benchmark sets.")
    p.add_argument("hr_dir", metavar="HR_DIR", help="folder of HR images (png, jpg, bmp, tif, webp)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="where LR_bicubic/X<s>/ goes")
    p.add_argument("--scale", type=int, nargs="+", required=True, metavar="S", help="one or more factors")
    p.add_argument("--overwrite", action="store_true", help="rewrite LR files that exist (default: keep them)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..data.benchmark import degrade_folder

    failed = []

    def on_error(path, exc):
        failed.append(path)
        print(f"distillsr degrade: error: {exc}", file=sys.stderr)

    try:
        stats = degrade_folder(args.hr_dir, args.out_dir, args.scale, overwrite=args.overwrite,
                               on_error=on_error, progress=not args.no_progress)
    except (FileNotFoundError, ValueError) as e:
        print(f"distillsr degrade: error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {stats['written']} LR image(s) under {args.out_dir}/LR_bicubic"
          + (f", kept {stats['kept']} existing" if stats["kept"] else "")
          + (f"; {len(failed)} input(s) failed" if failed else ""))
    return 1 if failed else 0
