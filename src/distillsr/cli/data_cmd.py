"""``distillsr data``: download datasets, make benchmark LR images, cut sub-images."""
from __future__ import annotations

import sys


def register(sub) -> None:
    from ..data.download import DATASETS, MIRROR_ENV
    p = sub.add_parser("data", help="download and prepare datasets",
                       description="Download and prepare training / benchmark data.")
    dsub = p.add_subparsers(dest="data_command", metavar="ACTION")

    d = dsub.add_parser(
        "download", help="download, check and extract a dataset (resumable)",
        description="Download a dataset (resuming partial files with HTTP Range requests), check its "
                    "size / checksum where known, extract it, and for benchmark sets make any missing "
                    "LR_bicubic/X<s> image with MATLAB bicubic. Datasets: "
                    + "; ".join(f"{k}: {v.description}" for k, v in DATASETS.items()))
    d.add_argument("dataset", choices=sorted(DATASETS))
    d.add_argument("--to", required=True, metavar="DIR", help="target folder (archives go to DIR/archives)")
    d.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4], help="LR scales (default 2 3 4)")
    d.add_argument("--parts", nargs="+", metavar="PART",
                   help="only these parts (div2k: " + ", ".join(DATASETS["div2k"].files) + ")")
    d.add_argument("--mirror", metavar="URL",
                   help=f"fetch <URL>/<file name> instead of the official location (or set {MIRROR_ENV})")
    d.add_argument("--no-extract", action="store_true", help="only download and check the archives")
    d.add_argument("--no-lr", action="store_true", help="do not make missing benchmark LR images")
    d.add_argument("--delete-archives", action="store_true", help="delete each archive once extracted")
    d.add_argument("--retries", type=int, default=3, help="resume attempts after a dropped connection")
    d.add_argument("--quiet", action="store_true", help="no progress bars")
    d.set_defaults(func=run_download)

    m = dsub.add_parser("make-lr", help="make missing LR_bicubic/X<s> images of benchmark sets",
                        description="For every ROOT/<set>/HR, write missing LR_bicubic/X<s>/<name>x<s>.png "
                                    "with MATLAB bicubic (the benchmarks' protocol).")
    m.add_argument("root")
    m.add_argument("--scales", type=int, nargs="+", default=[2, 3, 4])
    m.set_defaults(func=run_make_lr)

    s = dsub.add_parser("subimages", help="cut images into overlapping tiles (faster training I/O)",
                        description="Cut every HR image (and its LR with --lr-dir) into overlapping tiles "
                                    "in OUT/HR (and OUT/LR); train on them with data.kind=paired "
                                    "data.root=OUT/HR data.lr_root=OUT/LR.")
    s.add_argument("hr_dir")
    s.add_argument("out_dir")
    s.add_argument("--lr-dir", help="matching LR folder (names <name>x<s>.png or <name>.png)")
    s.add_argument("--scale", type=int, default=1, help="scale of --lr-dir")
    s.add_argument("--size", type=int, default=480, help="HR tile side (default 480)")
    s.add_argument("--step", type=int, default=240, help="HR tile step (default 240)")
    s.set_defaults(func=run_subimages)
    p.set_defaults(func=lambda args: (p.print_help(), 2)[1])


def run_download(args) -> int:
    from ..data.download import DownloadError, check_url, download_dataset
    from ..data.train_data import DataError
    if args.mirror is not None:
        try:
            check_url(args.mirror, "--mirror")
        except DownloadError as e:
            print(f"error: {e}", file=sys.stderr)
            return 2
    try:
        download_dataset(args.dataset, args.to, parts=args.parts, scales=args.scales, mirror=args.mirror,
                         extract=not args.no_extract, make_lr=not args.no_lr,
                         keep_archives=not args.delete_archives, retries=args.retries, progress=not args.quiet)
    except (DownloadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_make_lr(args) -> int:
    from ..data.download import DownloadError, make_benchmark_lr
    from ..data.train_data import DataError
    try:
        make_benchmark_lr(args.root, args.scales)
    except (DownloadError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


def run_subimages(args) -> int:
    from ..data.train_data import DataError, extract_subimages
    if args.lr_dir and args.scale < 2:
        print("error: --lr-dir needs --scale (2, 3, 4 ...)", file=sys.stderr)
        return 2
    try:
        extract_subimages(args.hr_dir, args.out_dir, args.size, args.step, args.lr_dir, args.scale)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0
