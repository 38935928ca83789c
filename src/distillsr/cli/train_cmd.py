"""``distillsr train``: run a training config (see distillsr.engine)."""
from __future__ import annotations

import sys


def register(sub) -> None:
    p = sub.add_parser(
        "train", help="train a network from a config",
        description="Train a network. CONFIG is a YAML file or the name of a packaged config "
                    "(see --list-configs); KEY=VALUE arguments override its entries, e.g. "
                    "train.iters=20000 data.batch_size=8 optim.lr=1e-3. Packaged configs name no data "
                    "folder: give it with --data DIR (and --val DIR to validate). Multi-GPU / multi-node: "
                    "torchrun --nproc_per_node N -m distillsr train --config ...",
    )
    p.add_argument("--config", "-c", metavar="CONFIG", help="YAML file or packaged config name (e.g. asid_x2)")
    p.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="config overrides")
    p.add_argument("--data", metavar="DIR",
                   help="the training data (sets data.root): the folder holding DIV2K_<split>_HR for "
                        "data.kind div2k, the folder of HR images for hr_folder and paired")
    p.add_argument("--val", metavar="DIR",
                   help="the validation set (sets val.dir): a benchmark set folder (HR/ and "
                        "LR_bicubic/X<s>/) or a folder of HR images")
    p.add_argument("--resume", metavar="auto|PATH",
                   help="continue a run: 'auto' (latest good checkpoint of this run, or start fresh), a run or "
                        "checkpoints folder, or a checkpoint's .state.pt / .safetensors file")
    p.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    p.add_argument("--list-configs", action="store_true", help="list the packaged configs and exit")
    p.set_defaults(func=run)


def run(args) -> int:
    from ..engine.config import (ConfigError, check_data_paths, dump_config, load_config,
                                 packaged_configs)
    if args.list_configs:
        for name in packaged_configs():
            print(name)
        return 0
    if not args.config:
        print("error: --config is required (a YAML file or one of: " + ", ".join(packaged_configs()) + ")",
              file=sys.stderr)
        return 2
    try:
        cfg = load_config(args.config, args.overrides)
        if args.data is not None:
            cfg.data.root = args.data
        if args.val is not None:
            cfg.val.dir = args.val
        if args.print_config:
            print(dump_config(cfg), end="")
            return 0
        check_data_paths(cfg)
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    from ..data.train_data import DataError
    from ..engine.train import TrainError, train
    from ..checkpoint import CheckpointError
    from ..io import FileWriteError
    try:
        result = train(cfg, resume=args.resume)
    except ConfigError as e:  # a setting that does not fit (e.g. the checkpoint resumed from)
        print(f"error: {e}", file=sys.stderr)
        return 2
    except (DataError, TrainError, CheckpointError, FileWriteError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0 if result.completed else 130
