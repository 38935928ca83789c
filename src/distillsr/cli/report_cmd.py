"""``distillsr report``: one page of the papers' tables and figures, measured here."""
from __future__ import annotations

import os
import shlex
import sys


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "report", help="the papers' tables and figures (Table 1, Fig. 1, 5, 6, 7...) measured on this machine",
        description="Score models on benchmark sets (as `distillsr eval`, under each model's release protocol "
                    "and the default one), count and time them (as `distillsr profile`), and write "
                    "DIR/index.html (one self-contained page, figures as PNG) and DIR/results.json. "
                    "Measurements are cached in DIR/cache: a rerun computes only what changed.")
    p.add_argument("-o", "--out", required=True, metavar="DIR", help="output folder")
    p.add_argument("--data", metavar="ROOT", default=os.environ.get("DISTILLSR_DATA"),
                   help="folder holding the sets (default: $DISTILLSR_DATA)")
    p.add_argument("--datasets", nargs="+", metavar="SET", help="set folders under ROOT (default: all there)")
    p.add_argument("--models", nargs="+", metavar="NAME",
                   help="'bicubic' and weights by name (`distillsr models`); releases only if already pulled "
                        "(nothing is downloaded). Default: bicubic and every installed weights name")
    p.add_argument("--weights", nargs="+", metavar="FILE", default=[], help="checkpoint files to report too")
    p.add_argument("--scales", nargs="+", type=int, default=[2, 3, 4], metavar="S", help="scales (default 2 3 4)")
    p.add_argument("--runs", nargs="+", metavar="RUN_DIR", default=[],
                   help="training run folders (`distillsr train` output) for learning curves")
    p.add_argument("--crop", action="append", default=[], metavar="IMAGE:X,Y,W,H",
                   help="a Fig. 5 crop in HR pixels (repeatable); default: where the models differ most")
    p.add_argument("--query", metavar="ROW,COL",
                   help="the Fig. 6 query pixel, in LR pixels of the first set's first image (default: its centre)")
    p.add_argument("--device", help="cpu, cuda, cuda:1, ... (default cpu)")
    p.add_argument("--quick", action="store_true",
                   help="the two smallest images per set and a small output size for Table 2 (for tests)")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..report import ReportError, build_report

    if args.data is None:
        print("distillsr report: error: give --data ROOT (the folder holding Set5, Set14, ...) or set "
              "DISTILLSR_DATA", file=sys.stderr)
        return 2
    command = "distillsr " + " ".join(shlex.quote(a) for a in sys.argv[1:]) if sys.argv[1:] else ""
    try:
        build_report(args.out, args.data, args.datasets, models=args.models, weights=args.weights,
                     scales=args.scales, runs=args.runs, device=args.device, quick=args.quick, crops=args.crop,
                     query=args.query, command=command)
    except (ReportError, OSError) as e:
        print(f"distillsr report: error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {os.path.join(args.out, 'index.html')}")
    return 0
