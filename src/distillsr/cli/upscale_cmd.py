"""``distillsr upscale``: upscale image and video files, folders and globs (see engine.upscale,
engine.video), in one process or many under torchrun (engine.shard)."""
from __future__ import annotations

import argparse
import sys


def _tile(value: str):
    if value == "auto":
        return "auto"
    try:
        n = int(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"--tile takes 'auto' or a number of LR pixels, not {value!r}")
    if n < 0:
        raise argparse.ArgumentTypeError("--tile must be >= 0 (0 = whole image)")
    return n


def _positive(value: str) -> int:
    try:
        n = int(value)
    except ValueError:
        n = 0
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected a positive whole number, not {value!r}")
    return n


def register(sub) -> None:
    from ..engine.upscale import BACKENDS, DEFAULT_BLEND, DEFAULT_OVERLAP
    from ..io import DEFAULT_MAX_PIXELS
    p = sub.add_parser("upscale", help="upscale images and videos (files, folders, globs)",
                       description="Upscale images and videos with a pretrained model or a checkpoint. Outputs "
                       "keep the input's relative path, bit depth, alpha and ICC profile (videos: container, "
                       "timestamps, rotation, colour tags; audio and subtitles copied); each is written "
                       "atomically. Under torchrun the inputs are shared between the processes. Exit status 1 "
                       "when any input failed.")
    p.add_argument("inputs", nargs="+", metavar="INPUT", help="image or video files, folders or glob patterns")
    p.add_argument("-o", "--output", required=True, metavar="OUT", help="output folder")
    p.add_argument("--scale", type=int, choices=(2, 3, 4), default=None,
                   help="upscaling factor (default 4; with --weights, the checkpoint's)")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--model", default=None, metavar="NAME",
                   help="weights by name (`distillsr models`; a release is pulled on first use), or "
                   "bicubic (MATLAB's bicubic resize, no network); default: the best weights on this "
                   "machine for the scale, by their Set5 PSNR")
    g.add_argument("--weights", default=None, metavar="PATH",
                   help="a checkpoint file instead, or an ONNX export (.onnx, run by onnxruntime)")
    p.add_argument("--backend", default=None, choices=sorted(BACKENDS),
                   help="inference backend (default: onnxruntime for a .onnx file, else torch)")
    p.add_argument("--device", default="auto", help="auto (CUDA if available), cpu, cuda, cuda:N")
    p.add_argument("--tile", type=_tile, default="auto", metavar="auto|N",
                   help="tile size in LR pixels; auto picks it from free memory and uses the whole "
                   "image when it fits; 0 = always the whole image")
    p.add_argument("--tile-overlap", type=int, default=DEFAULT_OVERLAP, metavar="N",
                   help=f"LR pixels shared by neighbouring tiles (default {DEFAULT_OVERLAP})")
    p.add_argument("--blend", default=DEFAULT_BLEND, choices=("mean", "feather"),
                   help="how overlapping tiles are combined")
    p.add_argument("--self-ensemble", action="store_true",
                   help="average the 8 flips/rotations (8x slower, slightly better)")
    p.add_argument("--format", choices=("png", "jpg", "webp", "tiff"), default=None,
                   help="output format (default: the input's, PNG for other inputs)")
    p.add_argument("--suffix", default="", help="added to output names, e.g. _x4 (no / or ..)")
    p.add_argument("--quality", type=int, default=95, metavar="Q", help="JPEG / WebP quality 1-100 (default 95)")
    p.add_argument("--overwrite", action="store_true",
                   help="redo outputs that already exist (by default those made from the same input "
                   "with the same scale and model are skipped, others made again; files not made by "
                   "upscale are kept)")
    p.add_argument("--recursive", action="store_true", help="look into sub-folders (and ** in globs)")
    p.add_argument("--max-pixels", type=int, default=DEFAULT_MAX_PIXELS, metavar="N",
                   help=f"refuse inputs with more pixels (default {DEFAULT_MAX_PIXELS:,}; 0 = no limit)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    v = p.add_argument_group("video (needs PyAV: pip install distillsr[video])")
    v.add_argument("--codec", default=None, metavar="NAME",
                   help="FFmpeg video encoder: libx264 (default; libvpx-vp9 for .webm), libx265, ffv1 "
                   "(lossless), libx264rgb ...")
    v.add_argument("--crf", type=int, default=None, metavar="N",
                   help="constant rate factor for encoders that have one (default 18; lower = better)")
    v.add_argument("--pix-fmt", default=None, metavar="FMT",
                   help="output pixel format (default: the input's where the encoder takes it)")
    v.add_argument("--batch", type=_positive, default=1, metavar="N",
                   help="frames per network call (default 1; more can be faster on a GPU)")
    p.add_argument("--summary", default=None, metavar="JSON",
                   help="write the summary (merged over all processes under torchrun) as JSON")
    p.set_defaults(func=run)


def _default_weights(scale: int) -> str:
    """The best weights present for x``scale`` (never the network), said on stdout; on a
    terminal, one hint line when a release that is not here would do better."""
    from ..pretrained import choose_default
    from ..releases import better_release
    entry = choose_default(scale)
    where = "bundled" if entry.bundled else f"from {entry.file.parent}"
    score = f"Set5 {entry.set5:.2f} dB {entry.set5_source}" if entry.set5 is not None else "no Set5 score"
    print(f"x{scale}: using {entry.name} ({where}; {score}), the best weights on this machine "
          f"(--model NAME chooses others)")
    if sys.stderr.isatty():
        better = better_release(entry)
        if better is not None:
            print(f"hint: better x{scale} weights can be pulled: distillsr weights pull {better.name} --scale "
                  f"{scale} (Set5 {better.set5:.2f} dB)", file=sys.stderr)
    return entry.name


def run(args) -> int:
    from ..checkpoint import CheckpointError
    from ..engine.inputs import check_output_dir, check_suffix
    from ..engine.shard import (Ranks, gather_reports, rank_device, split_cpu_threads, start_group,
                                stop_group, upscale_collection, write_summary)
    from ..engine.upscale import Upscaler, load_runner, select_device
    from ..engine.video import VideoOptions, check_video_options
    from ..pretrained import PretrainedError
    if not 1 <= args.quality <= 100:
        print(f"error: --quality must be in 1..100, got {args.quality}", file=sys.stderr)
        return 2
    try:  # options that would fail every image are refused before the model loads
        check_suffix(args.suffix)
        check_output_dir(args.output)
        ranks = Ranks.from_env()
        video = (check_video_options(args.codec, args.crf, args.pix_fmt, args.batch)
                 if args.codec or args.crf is not None or args.pix_fmt else VideoOptions(batch=args.batch))
    except ValueError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    try:
        device = select_device(rank_device(args.device, ranks))
        if str(device) == "cpu" and ranks.distributed:
            split_cpu_threads(ranks)
        scale = args.scale if args.scale is not None or args.weights else 4
        model = args.model
        if model is None and args.weights is None:
            model = _default_weights(scale)
        runner = load_runner(model, scale, weights=args.weights, device=device, backend=args.backend)
        upscaler = Upscaler(runner, device, tile=args.tile, tile_overlap=args.tile_overlap,
                            blend=args.blend, self_ensemble=args.self_ensemble)
    except (CheckpointError, PretrainedError, ValueError, RuntimeError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..io import FileWriteError
    start_group(ranks)
    try:
        report = upscale_collection(args.inputs, args.output, upscaler, ranks=ranks, video=video,
                                    format=args.format, suffix=args.suffix, overwrite=args.overwrite,
                                    recursive=args.recursive, quality=args.quality,
                                    max_pixels=args.max_pixels or None, progress=False if args.no_progress else None)
        report, summary = gather_reports(report, ranks)
    except FileWriteError as e:  # full disk, read-only folder: every further output would fail
        print(f"error: {e}", file=sys.stderr)
        return 1
    finally:
        stop_group()
    if ranks.rank == 0:
        procs = f", {ranks.world} processes" if ranks.distributed else ""
        print(f"{'done' if report.ok else 'FAILED'}: {report.summary()}"
              f" (x{upscaler.scale}, {getattr(runner, 'arch_name', type(runner).__name__)}, {device}{procs})")
        if args.summary:
            write_summary(args.summary, summary)
    return 0 if report.ok else 1
