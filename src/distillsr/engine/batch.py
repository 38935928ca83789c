"""Batches of files: :func:`collect_inputs` expands files, folders and globs,
:func:`upscale_files` upscales them into an output folder keeping their relative paths and
returns a :class:`BatchReport`; a bad input is reported and the batch goes on."""
from __future__ import annotations

import glob
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Tuple, Union

import torch

from .. import io as imgio
from ..io import ImageReadError, ImageWriteError
from .upscaler import Upscaler

__all__ = ["collect_inputs", "output_path", "upscale_files", "BatchReport"]


def collect_inputs(inputs: Iterable[Union[str, os.PathLike]], recursive: bool = False
                   ) -> Tuple[List[Tuple[Path, Path]], List[Tuple[str, str]]]:
    """Expand files, folders and glob patterns.

    Returns ``(items, problems)``: items are ``(file, relative path)`` where the relative path
    is what the output keeps (a folder's files relative to that folder, a glob's matches
    relative to the pattern's fixed leading folders, a named file by its name); problems are
    ``(input, message)`` for inputs that match nothing.
    """
    items: List[Tuple[Path, Path]] = []
    problems: List[Tuple[str, str]] = []
    seen = set()

    def add(path: Path, rel: Path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append((path, rel))

    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in imgio.INPUT_EXTENSIONS and not p.name.startswith(".")

    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            files = sorted(f for f in (p.rglob("*") if recursive else p.glob("*")) if is_image(f))
            if not files:
                problems.append((item, "folder holds no images (" + ", ".join(sorted(imgio.INPUT_EXTENSIONS))
                                 + ")" + ("" if recursive else "; --recursive looks into sub-folders")))
            for f in files:
                add(f, f.relative_to(p))
        elif p.is_file():
            add(p, Path(p.name))
        elif glob.has_magic(item):
            parts = Path(item).parts
            fixed = next((i for i, part in enumerate(parts) if glob.has_magic(part)), len(parts))
            base = Path(*parts[:fixed]) if fixed else Path(".")
            matches = sorted(Path(m) for m in glob.glob(item, recursive=recursive))
            files = [m for m in matches if is_image(m)]
            if not files:
                problems.append((item, "pattern matches no images"))
            for f in files:
                add(f, f.relative_to(base))
        else:
            problems.append((item, "no such file or folder"))
    return items, problems


@dataclass
class BatchReport:
    """What a batch did: written outputs, skipped ones, failures with their reasons."""
    done: List[Tuple[Path, Path]] = field(default_factory=list)      # (input, output)
    skipped: List[Tuple[Path, Path]] = field(default_factory=list)   # output already there
    failed: List[Tuple[str, str]] = field(default_factory=list)      # (input, message)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        total = len(self.done) + len(self.skipped) + len(self.failed)
        skipped = f"{len(self.skipped)} skipped" + (" (output exists; --overwrite redoes them)"
                                                   if self.skipped else "")
        return (f"{len(self.done)} upscaled, {skipped}, {len(self.failed)} failed, of {total} inputs "
                f"in {self.seconds:.1f} s")


def output_path(rel: Path, out_dir: Path, fmt: Optional[str], suffix: str = "") -> Tuple[Path, str]:
    """Output file for an input's relative path, and its format (png/jpg/webp/tiff).

    Without ``fmt`` the input's format is kept (its extension too), other inputs give PNG.
    """
    in_ext = rel.suffix.lower().lstrip(".")
    if fmt is None:
        if in_ext in imgio.FORMATS:
            return out_dir / rel.parent / f"{rel.stem}{suffix}{rel.suffix}", in_ext
        fmt = "png"
    return out_dir / rel.parent / f"{rel.stem}{suffix}{imgio.FORMATS[fmt.lower()][1]}", fmt.lower()


def upscale_files(inputs: Iterable[Union[str, os.PathLike]], out_dir: Union[str, os.PathLike],
                  upscaler: Upscaler, *, format: Optional[str] = None, suffix: str = "",
                  overwrite: bool = False, recursive: bool = False, quality: int = 95,
                  max_pixels: Optional[int] = imgio.DEFAULT_MAX_PIXELS, progress: Optional[bool] = None,
                  log: Callable[[str], None] = None) -> BatchReport:
    """Upscale files / folders / globs into ``out_dir`` keeping relative paths.

    Existing outputs are skipped unless ``overwrite``. Every failure is logged with the
    input's name and the batch goes on. ``progress`` None shows bars on a terminal only.
    """
    from tqdm import tqdm
    if format is not None and format.lower() not in imgio.FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of png, jpg, webp, tiff")
    start = time.perf_counter()
    out_dir = Path(out_dir)
    report = BatchReport()
    items, problems = collect_inputs(inputs, recursive)
    disable = None if progress is None else not progress
    images_bar = tqdm(total=len(items), desc="images", unit="img", disable=disable, file=sys.stderr)
    tiles_bar = tqdm(total=0, desc="tiles ", unit="tile", disable=disable, file=sys.stderr, leave=False)
    if log is None:
        def log(msg):
            tqdm.write(msg, file=sys.stderr)
    for item, msg in problems:
        report.failed.append((item, msg))
        log(f"error: {item}: {msg}")
    claimed: Dict[Path, Path] = {}
    try:
        for src, rel in items:
            dst, fmt = output_path(rel, out_dir, format, suffix)
            try:
                if dst.resolve() == src.resolve():
                    raise ImageWriteError(f"output {dst} would replace its own input (use another "
                                          "output folder or --suffix)")
                if dst.resolve() in claimed:
                    raise ImageWriteError(f"output {dst} is also the output of {claimed[dst.resolve()]} "
                                          "(inputs differing only in extension; use --suffix or --format)")
                claimed[dst.resolve()] = src
                if dst.exists() and not overwrite:
                    report.skipped.append((src, dst))
                    continue
                upscaler.upscale_file(src, dst, format=fmt, quality=quality, max_pixels=max_pixels,
                                      bar=tiles_bar)
                report.done.append((src, dst))
            except (ImageReadError, ImageWriteError) as e:
                report.failed.append((str(src), str(e)))
                log(f"error: {e}")
            except Exception as e:  # out of memory, a model error ...: report, go on
                oom = isinstance(e, torch.cuda.OutOfMemoryError) or isinstance(e, MemoryError)
                hint = "; try a smaller --tile" if oom else ""
                report.failed.append((str(src), f"{type(e).__name__}: {e}{hint}"))
                log(f"error: {src}: {type(e).__name__}: {e}{hint}")
            finally:
                images_bar.update(1)
    finally:
        tiles_bar.close()
        images_bar.close()
    report.seconds = time.perf_counter() - start
    return report
