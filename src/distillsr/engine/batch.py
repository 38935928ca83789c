"""Batches of files: :func:`upscale_files` upscales files, folders and globs into an output
folder keeping their relative paths and returns a :class:`BatchReport`; a bad input is
reported and the batch goes on. The steps: check the options, gather the inputs
(``engine.inputs``), plan an output for each (one input per output, by a fixed rule),
decide from the folder's record (``engine.records``) whether an existing output is skipped
or made again, and run each job.
"""
from __future__ import annotations

import os
import sys
import time
from collections import Counter
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, Iterator, List, Optional, Tuple, Union

import torch

from .. import io as imgio
from ..io import ImageReadError, ImageWriteError
from .backends import runner_identity
from .inputs import OwnOutputs, check_output_dir, check_suffix, collect_inputs, output_path
from .records import COMPARED, MANIFEST, OutputRecord, describe_settings
from .upscaler import Upscaler

__all__ = ["collect_inputs", "output_path", "upscale_files", "BatchReport", "check_suffix",
           "check_output_dir", "MANIFEST"]

PathArg = Union[str, os.PathLike]


@dataclass
class BatchReport:
    """What a batch did: written outputs, skipped ones (with why), failures with their reasons."""
    done: List[Tuple[Path, Path]] = field(default_factory=list)      # (input, output)
    skipped: List[Tuple[Path, Path]] = field(default_factory=list)   # output already there
    failed: List[Tuple[str, str]] = field(default_factory=list)      # (input, message)
    seconds: float = 0.0
    skip_reasons: Dict[Path, str] = field(default_factory=dict)      # output -> why it was skipped
    redone: Dict[Path, str] = field(default_factory=dict)            # output -> why it was made again
    left_out: List[Path] = field(default_factory=list)               # outputs of upscale found as inputs
    _skip_kinds: Counter = field(default_factory=Counter, repr=False)

    @property
    def ok(self) -> bool:
        return not self.failed

    def summary(self) -> str:
        total = len(self.done) + len(self.skipped) + len(self.failed)
        skipped = f"{len(self.skipped)} skipped"
        if self.skipped:
            kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(self._skip_kinds.items()))
            skipped += f" ({kinds}; --overwrite redoes them)"
        return (f"{len(self.done)} upscaled, {skipped}, {len(self.failed)} failed, of {total} inputs "
                f"in {self.seconds:.1f} s")


@dataclass
class _Job:
    src: Path
    rel: Path
    dst: Path
    fmt: str


def _check_batch_options(format: Optional[str], suffix: str, out_dir: PathArg) -> Path:
    if format is not None and format.lower() not in imgio.FORMATS:
        raise ValueError(f"unknown format {format!r}; use one of png, jpg, webp, tiff")
    check_suffix(suffix)
    return check_output_dir(out_dir)


def _collision_hint(job: _Job, winner: _Job, out_dir: Path, suffix: str) -> str:
    """What separates two inputs that map to one output."""
    own = [output_path(j.rel, out_dir, None, suffix)[0] for j in (job, winner)]
    if own[0] != own[1]:
        return "leave out --format: each output then keeps its input's format and extension"
    if job.rel == winner.rel:
        return ("upscale them into separate -o folders, or name a folder above both (with --recursive) "
                "so that outputs keep their sub-folders")
    return "rename one of the inputs, or upscale it into another -o folder"


def _winner(group: List[_Job]) -> _Job:
    """Of inputs that map to one output: the one already in the output's format, then the
    first by path (so the choice never depends on the order inputs are listed in)."""
    def ext(p: Path) -> str:
        e = p.suffix.lower().lstrip(".")
        return imgio.FORMATS[e][1] if e in imgio.FORMATS else e
    return min(group, key=lambda j: (ext(j.src) != ext(j.dst), str(j.src)))


def _plan_jobs(items: List[Tuple[Path, Path]], out_dir: Path, format: Optional[str], suffix: str
               ) -> Tuple[List[_Job], Dict[Path, str]]:
    """The output of every input, and the inputs refused (an output that would replace its own
    input, or that another input also maps to) with the message."""
    jobs, refused = [], {}
    groups: Dict[Path, List[_Job]] = {}
    for src, rel in items:
        dst, fmt = output_path(rel, out_dir, format, suffix)
        job = _Job(src, rel, dst, fmt)
        jobs.append(job)
        if dst.resolve() == src.resolve():
            refused[src] = (f"output {dst} would replace its own input (use another output folder or "
                            "--suffix)")
            continue
        groups.setdefault(dst.resolve(), []).append(job)
    for group in groups.values():
        if len(group) < 2:
            continue
        win = _winner(group)
        for job in group:
            if job is not win:
                refused[job.src] = (f"{job.src}: its output {job.dst} is also the output of {win.src}, which "
                                    "is upscaled (the input already in the output's format wins, else the "
                                    f"first by path); {_collision_hint(job, win, out_dir, suffix)}")
    return jobs, refused


def _settings(upscaler: Upscaler, fmt: str, quality: int, identity: Tuple[str, str]) -> dict:
    """What an output's pixels depend on besides its input."""
    label, ident = identity
    lossy = imgio.FORMATS[fmt][0] in ("JPEG", "WEBP")
    return {"scale": upscaler.scale, "model": label, "model_id": ident,
            "self_ensemble": upscaler.self_ensemble, "quality": quality if lossy else None}


def _decide(job: _Job, settings: dict, record: OutputRecord, overwrite: bool
            ) -> Tuple[str, Optional[str], Optional[str]]:
    """``("run" | "skip", kind, reason)`` for a job whose output may exist already."""
    if not job.dst.exists():
        return "run", None, None
    if overwrite:
        return "run", None, None
    entry = record.entry(job.dst)
    if entry is None:
        return ("skip", "not recorded as made by upscale",
                "exists, and is not recorded as made by distillsr upscale (or was changed since)")
    old = {k: entry.get(k) for k in COMPARED}
    new = {k: settings.get(k) for k in COMPARED}
    if old != new:
        return "run", None, f"was made with {describe_settings(entry)}, now {describe_settings(settings)}"
    try:
        ist = job.src.stat()
        same_input = (entry.get("input") == str(job.src.resolve()) and entry.get("input_size") == ist.st_size
                      and entry.get("input_mtime_ns") == ist.st_mtime_ns)
    except OSError:
        same_input = False
    if not same_input:
        return "run", None, f"its input {job.src} changed since it was made"
    return "skip", "made with the same settings", f"made already from this input with {describe_settings(settings)}"


@contextmanager
def _progress(total: int, progress: Optional[bool]) -> Iterator[tuple]:
    """(images bar, tiles bar): shown on a terminal only when ``progress`` is None."""
    from tqdm import tqdm
    disable = None if progress is None else not progress
    images = tqdm(total=total, desc="images", unit="img", disable=disable, file=sys.stderr)
    tiles = tqdm(total=0, desc="tiles ", unit="tile", disable=disable, file=sys.stderr, leave=False)
    try:
        yield images, tiles
    finally:
        tiles.close()
        images.close()


def _run_job(job: _Job, upscaler: Upscaler, report: BatchReport, log: Callable[[str], None], **write) -> bool:
    """Upscale one input into its output; a failure is reported and logged, never raised
    (but an interruption is)."""
    try:
        upscaler.upscale_file(job.src, job.dst, format=job.fmt, **write)
        report.done.append((job.src, job.dst))
        return True
    except (ImageReadError, ImageWriteError) as e:
        report.failed.append((str(job.src), str(e)))
        log(f"error: {e}")
    except imgio.FileWriteError:  # a full or read-only disk fails every output: stop the batch
        raise
    except Exception as e:  # out of memory, a model error ...: report, go on
        oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
        hint = "; try a smaller --tile" if oom else ""
        report.failed.append((str(job.src), f"{type(e).__name__}: {e}{hint}"))
        log(f"error: {job.src}: {type(e).__name__}: {e}{hint}")
    return False


def _default_log(msg: str) -> None:
    from tqdm import tqdm
    tqdm.write(msg, file=sys.stderr)


def _gather(inputs: Iterable[PathArg], out_dir: Path, recursive: bool, suffix: str, record: OutputRecord,
            report: BatchReport, log: Callable[[str], None]) -> List[Tuple[Path, Path]]:
    """The input files, without outputs of upscale; inputs that match nothing are failures."""
    own = OwnOutputs(out_dir, suffix, record.outputs())
    items, problems = collect_inputs(inputs, recursive, own_outputs=own)
    report.left_out = own.left_out
    if own.left_out:
        log(f"note: left out {len(own.left_out)} file(s) under {out_dir} that are outputs of upscale "
            f"(the output folder inside an input folder, or named with the suffix or recorded as outputs)")
    for item, msg in problems:
        report.failed.append((item, msg))
        log(f"error: {item}: {msg}")
    return items


def _process(job: _Job, refusal: Optional[str], settings: dict, upscaler: Upscaler, record: OutputRecord,
             report: BatchReport, log: Callable[[str], None], overwrite: bool, **write) -> None:
    """One job: refused, skipped (saying why), or run and recorded."""
    if refusal:
        report.failed.append((str(job.src), refusal))
        log(f"error: {refusal}")
        return
    action, kind, why = _decide(job, settings, record, overwrite)
    if action == "skip":
        report.skipped.append((job.src, job.dst))
        report.skip_reasons[job.dst] = why
        report._skip_kinds[kind] += 1
        log(f"skip: {job.dst}: {why}")
        return
    if why:
        report.redone[job.dst] = why
        log(f"redo: {job.dst}: {why}")
    if _run_job(job, upscaler, report, log, **write):
        record.add(job.dst, job.src, settings)
        record.save(force=False)


def upscale_files(inputs: Iterable[PathArg], out_dir: PathArg, upscaler: Upscaler, *,
                  format: Optional[str] = None, suffix: str = "", overwrite: bool = False,
                  recursive: bool = False, quality: int = 95,
                  max_pixels: Optional[int] = imgio.DEFAULT_MAX_PIXELS, progress: Optional[bool] = None,
                  log: Callable[[str], None] = None,
                  items: Optional[List[Tuple[Path, Path]]] = None) -> BatchReport:
    """Upscale files / folders / globs into ``out_dir`` keeping relative paths.

    An existing output is skipped when the folder's record says it was made from the same
    input with the same scale, model and settings, or when it is not recorded as made by
    upscale (a file of the user's); one made otherwise is made again. ``overwrite`` redoes
    all. Outputs of upscale met among the inputs are left out (:func:`collect_inputs`). Every
    failure is logged with the input's name and the batch goes on. ``progress`` None shows
    bars on a terminal only. ``items``: ``(file, relative path)`` pairs gathered already
    (``engine.shard``), used instead of gathering ``inputs``.
    """
    start = time.perf_counter()
    out_dir = _check_batch_options(format, suffix, out_dir)
    log = log or _default_log
    report = BatchReport()
    record = OutputRecord(out_dir, log)
    items = _gather(inputs, out_dir, recursive, suffix, record, report, log) if items is None else list(items)
    jobs, refused = _plan_jobs(items, out_dir, format, suffix)
    for folder in sorted({job.dst.parent for job in jobs}):  # temp files of runs killed mid-write
        for p in imgio.remove_stale_temp_files(folder):
            log(f"note: removed {p}, the temp file of a run killed while writing")
    identity = runner_identity(upscaler.runner)
    try:
        with _progress(len(jobs), progress) as (images_bar, tiles_bar):
            for job in jobs:
                _process(job, refused.get(job.src), _settings(upscaler, job.fmt, quality, identity), upscaler,
                         record, report, log, overwrite, quality=quality, max_pixels=max_pixels, bar=tiles_bar)
                images_bar.update(1)
    finally:
        record.save()
    report.seconds = time.perf_counter() - start
    return report
