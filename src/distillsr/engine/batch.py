"""Batches of files: :func:`collect_inputs` expands files, folders and globs,
:func:`upscale_files` upscales them into an output folder keeping their relative paths and
returns a :class:`BatchReport`; a bad input is reported and the batch goes on.

Each output made is recorded in the output folder's ``.distillsr-upscale.json`` (its input,
the scale, the model and the settings that change the pixels, and the output's size and
modification time), so that a later run skips only outputs made from the same input with
the same settings, redoes the others, and leaves its own outputs out of its inputs.
"""
from __future__ import annotations

import glob
import json
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
from ..io import ImageReadError, ImageWriteError, atomic_write, file_lock
from .backends import runner_identity
from .upscaler import Upscaler

__all__ = ["collect_inputs", "output_path", "upscale_files", "BatchReport", "check_suffix",
           "check_output_dir", "MANIFEST"]

MANIFEST = ".distillsr-upscale.json"  # the record of outputs, in the output folder
MANIFEST_SAVE_SECONDS = 5.0           # a long batch saves its record at least this often
PathArg = Union[str, os.PathLike]


# ----------------------------------------------------------------------------- options

def check_suffix(suffix: str) -> str:
    """The suffix added to output names: refused when it could leave the output folder."""
    if any(sep in suffix for sep in ("/", "\\", os.sep, os.altsep) if sep) or ".." in suffix:
        raise ValueError(f"--suffix {suffix!r}: a suffix is added to file names and may not contain "
                         "a path separator or '..'")
    return suffix


def check_output_dir(out_dir: PathArg) -> Path:
    """The output folder: refused when it, or a folder above it, is an existing file."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file; -o takes a folder")
    for above in out.parents:
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"output folder {out}: {above} is an existing file, not a folder")
            break
    return out


# ----------------------------------------------------------------------------- inputs

def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


class _OwnOutputs:
    """Decides which files found in folders and globs are outputs of upscale itself: those in
    an output folder that lies inside the folder walked, those in the output folder named with
    the suffix, and those recorded as outputs there."""

    def __init__(self, out_dir: Optional[PathArg], suffix: str = "", recorded: Iterable[Path] = ()):
        self.out = Path(out_dir).resolve() if out_dir is not None else None
        self.suffix = suffix
        self.recorded = {p.resolve() for p in recorded}
        self.left_out: List[Path] = []

    def __call__(self, path: Path, root: Path) -> bool:
        if self.out is None:
            return False
        real, root = path.resolve(), root.resolve()
        if not _inside(real, self.out):
            return False
        own = (self.out != root and _inside(self.out, root)                 # output tree below the input
               or bool(self.suffix) and path.stem.endswith(self.suffix)    # our suffixed outputs
               or real in self.recorded)                                   # recorded outputs
        if own:
            self.left_out.append(path)
        return own


def collect_inputs(inputs: Iterable[PathArg], recursive: bool = False, *,
                   out_dir: Optional[PathArg] = None, suffix: str = "",
                   own_outputs: Optional[_OwnOutputs] = None
                   ) -> Tuple[List[Tuple[Path, Path]], List[Tuple[str, str]]]:
    """Expand files, folders and glob patterns.

    Returns ``(items, problems)``: items are ``(file, relative path)`` where the relative path
    is what the output keeps (a folder's files relative to that folder, a glob's matches
    relative to the pattern's fixed leading folders, a named file by its name); problems are
    ``(input, message)`` for inputs that match nothing. With ``out_dir``, files that folders
    and globs find in the output tree are left out when the tree lies inside the folder walked,
    or when their name ends with ``suffix`` (outputs of an earlier run); named files never are.
    """
    own = own_outputs or _OwnOutputs(out_dir, suffix)
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
            found = sorted(f for f in (p.rglob("*") if recursive else p.glob("*")) if is_image(f))
            files = [f for f in found if not own(f, p)]
            if not found:
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
            found = [m for m in matches if is_image(m)]
            files = [f for f in found if not own(f, base)]
            if not found:
                problems.append((item, "pattern matches no images"))
            for f in files:
                add(f, f.relative_to(base))
        else:
            problems.append((item, "no such file or folder"))
    return items, problems


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


# ----------------------------------------------------------------------------- the record

def _describe(settings: dict) -> str:
    text = f"x{settings.get('scale')} {settings.get('model')}"
    if settings.get("self_ensemble"):
        text += " with self-ensemble"
    if settings.get("quality") is not None:
        text += f" at quality {settings['quality']}"
    return text


_COMPARED = ("scale", "model_id", "self_ensemble", "quality")


class _Manifest:
    """The output folder's record of what upscale made: ``{"outputs": {relative path: entry}}``,
    an entry holding the settings, the input and the output's size and modification time (an
    output changed since is no longer taken as made by upscale)."""

    def __init__(self, out_dir: Path, log: Callable[[str], None]):
        self.out_dir = out_dir
        self.log = log
        self.path = out_dir / MANIFEST
        self.entries: Dict[str, dict] = self._read(log)
        self.new: Dict[str, dict] = {}
        self.saved_at = time.monotonic()

    def _read(self, log=None) -> Dict[str, dict]:
        if not self.path.is_file():
            return {}
        try:
            data = json.loads(self.path.read_text(encoding="utf-8"))
            outputs = data["outputs"]
            if not isinstance(outputs, dict):
                raise ValueError("'outputs' is not an object")
            return {k: v for k, v in outputs.items() if isinstance(v, dict)}
        except (OSError, ValueError, KeyError, TypeError) as e:
            if log:
                log(f"warning: {self.path}: unreadable record of earlier outputs ({e}); a new one is started")
            return {}

    def _key(self, dst: Path) -> str:
        return dst.relative_to(self.out_dir).as_posix()

    def outputs(self) -> List[Path]:
        return [self.out_dir / k for k in self.entries]

    def entry(self, dst: Path) -> Optional[dict]:
        """The record of ``dst`` if the file is still the one recorded."""
        e = self.entries.get(self._key(dst))
        try:
            st = dst.stat()
        except OSError:
            return None
        if e is None or e.get("size") != st.st_size or e.get("mtime_ns") != st.st_mtime_ns:
            return None
        return e

    def add(self, dst: Path, src: Path, settings: dict) -> None:
        st, ist = dst.stat(), src.stat()
        e = dict(settings, input=str(src.resolve()), input_size=ist.st_size, input_mtime_ns=ist.st_mtime_ns,
                 size=st.st_size, mtime_ns=st.st_mtime_ns)
        self.entries[self._key(dst)] = self.new[self._key(dst)] = e

    def save(self, force: bool = True) -> None:
        """Merge the new entries into the file (under a lock on the folder: another run may
        be writing into it too) and write it atomically. A failure is logged: the outputs
        themselves are complete, a later run then takes them as not made by upscale."""
        if not self.new or (not force and time.monotonic() - self.saved_at < MANIFEST_SAVE_SECONDS):
            return
        try:
            with file_lock(self.out_dir):
                merged = self._read()
                merged.update(self.new)
                text = json.dumps({"version": 1, "outputs": merged}, indent=1, sort_keys=True)
                atomic_write(self.path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
        except OSError as e:
            self.log(f"warning: {self.path}: could not record the outputs made ({e})")
            return
        self.entries.update(merged)
        self.new.clear()
        self.saved_at = time.monotonic()


# ----------------------------------------------------------------------------- the batch

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


def _decide(job: _Job, settings: dict, manifest: _Manifest, overwrite: bool
            ) -> Tuple[str, Optional[str], Optional[str]]:
    """``("run" | "skip", kind, reason)`` for a job whose output may exist already."""
    if not job.dst.exists():
        return "run", None, None
    if overwrite:
        return "run", None, None
    entry = manifest.entry(job.dst)
    if entry is None:
        return ("skip", "not recorded as made by upscale",
                "exists, and is not recorded as made by distillsr upscale (or was changed since)")
    old = {k: entry.get(k) for k in _COMPARED}
    new = {k: settings.get(k) for k in _COMPARED}
    if old != new:
        return "run", None, f"was made with {_describe(entry)}, now {_describe(settings)}"
    try:
        ist = job.src.stat()
        same_input = (entry.get("input") == str(job.src.resolve()) and entry.get("input_size") == ist.st_size
                      and entry.get("input_mtime_ns") == ist.st_mtime_ns)
    except OSError:
        same_input = False
    if not same_input:
        return "run", None, f"its input {job.src} changed since it was made"
    return "skip", "made with the same settings", f"made already from this input with {_describe(settings)}"


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
    except Exception as e:  # out of memory, a model error ...: report, go on
        oom = isinstance(e, (torch.cuda.OutOfMemoryError, MemoryError))
        hint = "; try a smaller --tile" if oom else ""
        report.failed.append((str(job.src), f"{type(e).__name__}: {e}{hint}"))
        log(f"error: {job.src}: {type(e).__name__}: {e}{hint}")
    return False


def upscale_files(inputs: Iterable[PathArg], out_dir: PathArg, upscaler: Upscaler, *,
                  format: Optional[str] = None, suffix: str = "", overwrite: bool = False,
                  recursive: bool = False, quality: int = 95,
                  max_pixels: Optional[int] = imgio.DEFAULT_MAX_PIXELS, progress: Optional[bool] = None,
                  log: Callable[[str], None] = None) -> BatchReport:
    """Upscale files / folders / globs into ``out_dir`` keeping relative paths.

    An existing output is skipped when the folder's record says it was made from the same
    input with the same scale, model and settings, or when it is not recorded as made by
    upscale (a file of the user's); one made otherwise is made again. ``overwrite`` redoes
    all. Outputs of upscale met among the inputs are left out (:func:`collect_inputs`). Every
    failure is logged with the input's name and the batch goes on. ``progress`` None shows
    bars on a terminal only.
    """
    from tqdm import tqdm
    start = time.perf_counter()
    out_dir = _check_batch_options(format, suffix, out_dir)
    if log is None:
        def log(msg):
            tqdm.write(msg, file=sys.stderr)
    report = BatchReport()
    manifest = _Manifest(out_dir, log)
    own = _OwnOutputs(out_dir, suffix, manifest.outputs())
    items, problems = collect_inputs(inputs, recursive, own_outputs=own)
    report.left_out = own.left_out
    if own.left_out:
        log(f"note: left out {len(own.left_out)} file(s) under {out_dir} that are outputs of upscale "
            f"(the output folder inside an input folder, or named with the suffix or recorded as outputs)")
    for item, msg in problems:
        report.failed.append((item, msg))
        log(f"error: {item}: {msg}")
    jobs, refused = _plan_jobs(items, out_dir, format, suffix)
    identity = runner_identity(upscaler.runner)
    try:
        with _progress(len(jobs), progress) as (images_bar, tiles_bar):
            for job in jobs:
                try:
                    if job.src in refused:
                        report.failed.append((str(job.src), refused[job.src]))
                        log(f"error: {refused[job.src]}")
                        continue
                    settings = _settings(upscaler, job.fmt, quality, identity)
                    action, kind, why = _decide(job, settings, manifest, overwrite)
                    if action == "skip":
                        report.skipped.append((job.src, job.dst))
                        report.skip_reasons[job.dst] = why
                        report._skip_kinds[kind] += 1
                        log(f"skip: {job.dst}: {why}")
                        continue
                    if why:
                        report.redone[job.dst] = why
                        log(f"redo: {job.dst}: {why}")
                    if _run_job(job, upscaler, report, log, quality=quality, max_pixels=max_pixels,
                                bar=tiles_bar):
                        manifest.add(job.dst, job.src, settings)
                        manifest.save(force=False)
                finally:
                    images_bar.update(1)
    finally:
        manifest.save()
    report.seconds = time.perf_counter() - start
    return report
