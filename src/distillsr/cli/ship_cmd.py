"""``distillsr ship``: evaluate a checkpoint and write it, with its model card, as pretrained weights."""
from __future__ import annotations

import os
import sys


def register(sub) -> None:
    p = sub.add_parser(
        "ship", help="evaluate a checkpoint and write it as pretrained weights with its model card",
        description="Evaluate a checkpoint on Set5, Set14 and B100 with `distillsr eval`'s defaults (whole "
                    "image, Y channel, Wang SSIM, grey replicate) and write NAME_x<scale>.safetensors with its "
                    "model card (PSNR and SSIM per set) into a weights folder. A card already there is brought "
                    "up to date: its training record and notes are kept, this run's --iterations and "
                    "--wall-time-h are added to its totals and --command is appended to its commands. "
                    "Exit status: 0 shipped, 1 not better (--only-if-better), 2 error.")
    p.add_argument("checkpoint", help="the weights to ship (any checkpoint distillsr.load_model reads)")
    p.add_argument("--name", required=True, help="the name of the weights (`distillsr models`)")
    p.add_argument("--data", metavar="ROOT", default=os.environ.get("DISTILLSR_DATA"),
                   help="folder holding the benchmark sets (default: $DISTILLSR_DATA)")
    p.add_argument("--datasets", nargs="+", metavar="SET", default=["Set5", "Set14", "B100"],
                   help="sets to evaluate on and compare by (default: Set5 Set14 B100)")
    p.add_argument("--to", metavar="DIR", help="weights folder to write into (default: the package's own, "
                   "where the bundled weights are)")
    p.add_argument("--only-if-better", action="store_true",
                   help="write nothing (exit status 1) unless the mean PSNR over the sets beats the card there")
    p.add_argument("--replace", action="store_true",
                   help="start a new card from this run alone instead of updating the one there")
    p.add_argument("--json", metavar="PATH", help="also write the evaluation (per image too) as JSON")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda when available, as eval)")
    run = p.add_argument_group("the training run (recorded in the card's training fields)")
    run.add_argument("--iterations", type=int, metavar="N", help="iterations of this run (added to the total)")
    run.add_argument("--wall-time-h", type=float, metavar="H", help="hours this run took (added to the total)")
    run.add_argument("--command", metavar="TEXT", help="the command of this run (appended to the commands)")
    run.add_argument("--training-data", metavar="TEXT", help="what the weights were trained on (replaces it)")
    run.add_argument("--hardware", metavar="TEXT", help="what they were trained on, e.g. 'a 2-core AMD EPYC VM, "
                     "CPU only' (replaces it)")
    run.add_argument("--notes", metavar="TEXT", help="a short remark for the card (replaces its notes)")
    p.set_defaults(func=run_ship)


def run_ship(args) -> int:
    from ..checkpoint import CheckpointError
    from ..engine.evaluate import EvalError
    from ..engine.ship import Run, ShipError, ship
    from ..pretrained import PACKAGE_WEIGHTS_DIR, PretrainedError

    def err(msg: str) -> int:
        print(f"distillsr ship: error: {msg}", file=sys.stderr)
        return 2

    if args.data is None:
        return err("give --data ROOT (the folder holding Set5, Set14, B100) or set DISTILLSR_DATA")
    for flag, value in (("--iterations", args.iterations), ("--wall-time-h", args.wall_time_h)):
        if value is not None and value < 0:
            return err(f"{flag} must not be negative")
    from ..engine.upscale import select_device
    try:
        device = str(select_device(args.device or "auto"))
    except (ValueError, RuntimeError) as e:
        return err(str(e) if isinstance(e, ValueError) else
                   f"--device {args.device!r} is not a device; use cpu, cuda or cuda:N")
    run = Run(iterations=args.iterations, wall_time_h=args.wall_time_h, command=args.command,
              data=args.training_data, hardware=args.hardware)
    try:
        out = ship(args.checkpoint, args.name, args.data, to=args.to or PACKAGE_WEIGHTS_DIR,
                   datasets=args.datasets, only_if_better=args.only_if_better, replace=args.replace, run=run,
                   notes=args.notes, device=device, json_path=args.json)
    except (ShipError, PretrainedError, CheckpointError, EvalError, OSError) as e:
        return err(str(e))
    if not out.shipped:
        print(f"not shipped: {out.verdict}")
        return 1
    if out.old_mean is not None:
        print(f"better: {out.verdict}")
    print(f"wrote {out.entry.file} and {out.entry.card.name} (sha256 {out.entry.sha256[:12]}...)")
    return 0
