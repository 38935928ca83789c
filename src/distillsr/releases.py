"""The authors' released checkpoints by name: the release table, the cache, pull / add / verify.

The table is data, ``weights/releases.json`` beside the model cards: for each name and
scale the source URL pinned to a commit, its sha256 (``null`` where it is not known in
advance), size, licence, the published scores, the scores measured here and the
evaluation that reproduces them.

:func:`pull` downloads a release into the cache (``DISTILLSR_CACHE``, default
``~/.cache/distillsr``)::

    <cache>/downloads/<name>_x<s>/<file>        the authors' file as downloaded
    <cache>/weights/<name>_x<s>.safetensors     converted once (distillsr.save_model)
    <cache>/weights/<name>_x<s>.json            its model card (read by distillsr.pretrained)
    <cache>/recorded_sha256.json                hashes recorded at first download

Downloads resume, are checked against their hash and renamed into place only then, and
run under a lock, so two processes pulling the same file do not corrupt it. A file whose
hash is not pinned by the table has it recorded at its first download; every later load
and download is checked against that record. Checkpoints are read without executing
anything (``distillsr.checkpoint.read_state_dict``). ``DISTILLSR_WEIGHTS_MIRROR=URL``
replaces ``https://github.com`` in every URL (for tests and offline sites).
"""
from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path, PurePosixPath
from typing import Callable, Dict, List, Optional, Union

from .checkpoint import CheckpointError, load_model
from .io import atomic_write, file_lock
from .pretrained import (PACKAGE_WEIGHTS_DIR, RELEASE_TABLE, PretrainedEntry, PretrainedError, list_pretrained,
                         save_pretrained, sha256_file)

__all__ = ["Release", "ReleaseError", "list_releases", "get_release", "find_release", "release_protocol",
           "cache_dir", "cache_weights_dir", "pull", "add", "verify", "better_release", "check_source",
           "CACHE_ENV", "MIRROR_ENV"]

CACHE_ENV = "DISTILLSR_CACHE"
MIRROR_ENV = "DISTILLSR_WEIGHTS_MIRROR"
GITHUB = "https://github.com"
_RECORD = "recorded_sha256.json"

PathLike = Union[str, os.PathLike]
Log = Callable[[str], None]


def _stderr(msg: str) -> None:
    print(msg, file=sys.stderr)


class ReleaseError(PretrainedError):
    """A release that is unknown, cannot be fetched, or whose file fails its checks."""


@dataclass(frozen=True)
class Release:
    """One row of the release table: one released checkpoint at one scale."""
    name: str
    arch: str
    scale: int
    repo: str
    commit: str
    path: str
    url: str
    sha256: Optional[str]
    size: Optional[int]
    licence: str
    published: Dict[str, Dict[str, float]] = field(default_factory=dict)
    published_source: str = ""
    measured: Dict[str, Dict[str, float]] = field(default_factory=dict)
    measured_on: str = ""
    eval: str = ""

    @property
    def filename(self) -> str:
        return PurePosixPath(self.path).name

    @property
    def published_psnr(self) -> Dict[str, float]:
        return {k: v["psnr"] for k, v in self.published.items()}

    @property
    def measured_psnr(self) -> Dict[str, float]:
        return {k: v["psnr"] for k, v in self.measured.items()}

    @property
    def set5(self) -> Optional[float]:
        return self.measured_psnr.get("Set5", self.published_psnr.get("Set5"))

    @property
    def protocol_text(self) -> str:
        return f"Y channel, border = scale; {release_protocol(self.arch)['about']} (eval --protocol release)"

    def source_url(self) -> str:
        """``url``, with ``https://github.com`` replaced by ``DISTILLSR_WEIGHTS_MIRROR`` when set."""
        from .data.download import DownloadError, check_url
        mirror = os.environ.get(MIRROR_ENV, "").rstrip("/")
        if not mirror or not self.url.startswith(GITHUB + "/"):
            return self.url
        try:
            check_url(mirror, MIRROR_ENV)
        except DownloadError as e:
            raise ReleaseError(str(e)) from None
        return mirror + self.url[len(GITHUB):]


@lru_cache(maxsize=1)
def _table() -> dict:
    return json.loads((PACKAGE_WEIGHTS_DIR / RELEASE_TABLE).read_text(encoding="utf-8"))


def list_releases() -> List[Release]:
    fields = set(Release.__dataclass_fields__)
    return [Release(**{k: v for k, v in row.items() if k in fields}) for row in _table()["releases"]]


def find_release(name: str, scale: Optional[int] = None) -> Optional[Release]:
    """The release ``name`` at x``scale`` (any scale when None), or None."""
    key = name.lower()
    return next((r for r in list_releases() if r.name == key and (scale is None or r.scale == scale)), None)


def get_release(name: str, scale: int) -> Release:
    found = find_release(name, scale)
    if found is not None:
        return found
    rows = list_releases()
    scales = [r.scale for r in rows if r.name == name.lower()]
    if scales:
        raise ReleaseError(f"{name} is released for x{', x'.join(map(str, scales))}, not x{scale}")
    names = sorted({r.name for r in rows})
    raise ReleaseError(f"no release named {name!r}; known: {', '.join(names)}")


def release_protocol(arch: str) -> Dict[str, object]:
    """How the release of ``arch`` evaluates: ``tile``, ``tile_overlap``, ``chop``, ``ssim``, ``about``."""
    protocols = _table()["protocols"]
    if arch not in protocols:
        raise ReleaseError(f"no release test protocol is known for {arch!r} (known: {', '.join(protocols)})")
    return dict(protocols[arch])


# ----------------------------------------------------------------------------- the cache

def cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "distillsr")


def cache_weights_dir() -> Path:
    return cache_dir() / "weights"


def _download_path(rel: Release) -> Path:
    return cache_dir() / "downloads" / f"{rel.name}_x{rel.scale}" / rel.filename


def _recorded() -> Dict[str, str]:
    path = cache_dir() / _RECORD
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as e:
        raise ReleaseError(f"{path}: unreadable record of sha256 hashes ({e}); delete it to record anew") from e


def _expected_sha256(rel: Release) -> Optional[str]:
    """The pinned hash, else the one recorded at the first download, else None."""
    return rel.sha256 or _recorded().get(rel.url)


def _record_sha256(rel: Release, digest: str, log: Log) -> None:
    with file_lock(cache_dir() / f".{_RECORD}.lock"):
        rec = _recorded()
        rec[rel.url] = digest
        text = json.dumps(rec, indent=1, sort_keys=True) + "\n"
        atomic_write(cache_dir() / _RECORD, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    log(f"{rel.name} x{rel.scale}: its sha256 is not pinned by distillsr; recorded {digest} at this first "
        f"download, and every later load is checked against it")


def _check_file(rel: Release, path: Path, log: Log) -> str:
    """Check ``path`` against the pinned or recorded hash (recording it if there is none)."""
    if rel.size is not None and path.stat().st_size != rel.size:
        raise ReleaseError(f"{path}: {path.stat().st_size} bytes, but {rel.name} x{rel.scale} is {rel.size} bytes "
                           f"({rel.url})")
    digest = sha256_file(path)
    want = _expected_sha256(rel)
    if want is None:
        _record_sha256(rel, digest, log)
    elif digest != want:
        how = "pinned by distillsr" if rel.sha256 else "recorded at its first download"
        raise ReleaseError(f"{path}: sha256 {digest} does not match the one {how} for {rel.name} "
                           f"x{rel.scale} ({want}, {rel.url}); the file was refused")
    return digest


def _cached_entry(rel: Release) -> Optional[PretrainedEntry]:
    return next((e for e in list_pretrained(cache_weights_dir())
                 if (e.name, e.scale) == (rel.name, rel.scale) and e.installed), None)


def _install(rel: Release, source: Path, digest: str, log: Log) -> PretrainedEntry:
    """Convert the authors' file once into the cache's safetensors form, with its card."""
    try:
        model = load_model(source)
    except CheckpointError as e:
        raise ReleaseError(f"{e} (expected the {rel.name} x{rel.scale} release)") from e
    if (model.arch_name, model.scale) != (rel.arch, rel.scale):
        raise ReleaseError(f"{source}: holds {model.arch_name} x{model.scale}, but {rel.name} x{rel.scale} "
                           f"is {rel.arch} x{rel.scale}")
    src = {"url": rel.url, "sha256": digest, "sha256_pinned": bool(rel.sha256), "licence": rel.licence,
           "file": str(source.relative_to(cache_dir())) if source.is_relative_to(cache_dir()) else str(source)}
    entry = save_pretrained(model, rel.name, cache_weights_dir(), training_data="DIV2K (the authors' training)",
                            notes="the authors' released checkpoint, converted to safetensors by distillsr",
                            source=src)
    log(f"{rel.name} x{rel.scale}: converted to {entry.file}")
    return entry


def pull(name: str, scale: int, *, force: bool = False, progress: Optional[bool] = None,
         log: Log = _stderr) -> PretrainedEntry:
    """Make the release ``name`` x``scale`` present in the cache; returns its entry.

    An entry already in the cache is reused (``force`` downloads and converts it again). A
    failed or offline download raises :class:`ReleaseError` naming the URL and how to add
    the file by hand.
    """
    from .data.download import DownloadError, download_file
    rel = get_release(name, scale)
    with file_lock(cache_dir() / "locks" / f"{rel.name}_x{rel.scale}.lock"):
        entry = None if force else _cached_entry(rel)
        if entry is not None:
            return entry
        dest = _download_path(rel)
        if force and dest.exists():
            dest.unlink()
        url = rel.source_url()
        try:
            download_file(url, dest, progress=sys.stderr.isatty() if progress is None else progress, log=log)
        except DownloadError as e:
            why = str(e)[len(url) + 2:] if str(e).startswith(url + ": ") else str(e)
            raise ReleaseError(
                f"could not download {rel.name} x{rel.scale} from {url}: {why}. To add it by hand, fetch that "
                f"file on another machine and run: distillsr weights add {rel.name} FILE --scale {rel.scale}") from None
        try:
            digest = _check_file(rel, dest, log)
        except ReleaseError:
            dest.unlink()
            raise
        return _install(rel, dest, digest, log)


def add(name: str, file: PathLike, scale: int, *, log: Log = _stderr) -> PretrainedEntry:
    """Add a release file fetched by hand: checked like a download, then converted."""
    rel = get_release(name, scale)
    file = Path(file)
    if not file.is_file():
        raise ReleaseError(f"{file}: no such file")
    with file_lock(cache_dir() / "locks" / f"{rel.name}_x{rel.scale}.lock"):
        digest = _check_file(rel, file, log)
        dest = _download_path(rel)
        atomic_write(dest, lambda tmp: shutil.copyfile(file, tmp))
        return _install(rel, dest, digest, log)


def check_source(entry: PretrainedEntry) -> None:
    """For a pulled release, check the downloaded file (when still there) against its recorded hash."""
    if not entry.source or entry.bundled:
        return
    rel = find_release(entry.name, entry.scale)
    src = entry.source.get("file")
    if rel is None or not src:
        return
    path = cache_dir() / str(src)
    if path.is_file():
        digest = sha256_file(path)
        want = _expected_sha256(rel) or entry.source.get("sha256")
        if digest != want:
            raise ReleaseError(f"{path}: sha256 {digest} does not match the {want} recorded for {rel.name} "
                               f"x{rel.scale}; `distillsr weights pull {rel.name} --scale {rel.scale} --force` "
                               f"fetches it anew")


def verify(log: Log = print) -> List[str]:
    """Check every weights file on this machine against its card and its release hash;
    returns the problems found (empty when all is well)."""
    problems = []
    for e in list_pretrained():
        what = f"{e.name} x{e.scale} ({e.file})"
        try:
            if not e.installed:
                raise PretrainedError(f"{e.file} is missing")
            digest = sha256_file(e.file)
            if digest != e.sha256:
                raise PretrainedError(f"sha256 {digest} does not match its card's {e.sha256}")
            check_source(e)
        except PretrainedError as err:
            problems.append(f"{what}: {err}")
            log(f"FAILED {what}: {err}")
        else:
            log(f"ok     {what}")
    return problems


def better_release(entry: PretrainedEntry) -> Optional[Release]:
    """The release with the best Set5 at ``entry``'s scale that is not present and beats it."""
    have = {(e.name, e.scale) for e in list_pretrained() if e.installed}
    best = None
    for r in list_releases():
        if r.scale != entry.scale or (r.name, r.scale) in have or r.set5 is None:
            continue
        if r.set5 > (entry.set5 or float("-inf")) and (best is None or r.set5 > best.set5):
            best = r
    return best
