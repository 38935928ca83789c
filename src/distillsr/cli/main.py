"""``distillsr`` command line: a thin layer over the Python API.

Each sub-command lives in its own module of this package, which defines
``register(subparsers)``; the parser it adds sets ``func(args) -> int``.
"""
from __future__ import annotations

import argparse
import importlib
import sys
from typing import List, Optional

# sub-command modules, in the order ``--help`` lists them
COMMANDS = ["upscale", "models", "weights", "eval", "degrade", "train", "data", "profile", "export", "ship",
            "quantize", "report", "serve"]


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__
    p = argparse.ArgumentParser(prog="distillsr", description="Lightweight single-image super-resolution "
                                "(ASID, RFDN/E-RFDN, FDIWN/FDIWN-M).")
    p.add_argument("--version", action="version", version=f"distillsr {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"{__package__}.{name}_cmd").register(sub)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
