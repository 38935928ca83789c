"""Resumable dataset downloads: DIV2K and the common SR benchmark archive.

``download_file`` keeps partial data in ``<file>.part`` and continues it with an
HTTP ``Range`` request (after a dropped connection, a retry, or a rerun of the
command); the finished file is checked (size, sha256 or md5 where known) before
it takes its final name. ``download_dataset`` fetches the files of a dataset,
extracts them (safely: no path may leave the target folder) and, for the
benchmark layout, makes any missing ``LR_bicubic/X<s>`` image with MATLAB
bicubic from its HR image.

The base URL of every dataset can be replaced by a mirror (``mirror=`` or the
environment variable ``DISTILLSR_MIRROR``): files are then fetched as
``<mirror>/<file name>``.
"""
from __future__ import annotations

import os
import re
import shutil
import socket
import tarfile
import time
import urllib.error
import urllib.request
import zipfile
from dataclasses import dataclass
from http.client import HTTPException
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

from ..io import file_hash, file_lock

__all__ = ["Remote", "DatasetSpec", "DATASETS", "DownloadError", "check_url", "download_file", "verify_file",
           "extract_archive", "make_benchmark_lr", "download_dataset", "MIRROR_ENV"]

MIRROR_ENV = "DISTILLSR_MIRROR"
_CHUNK = 1 << 20
_TORCHSR = "md5 as recorded by github.com/Coloquinte/torchSR (torchsr/datasets)"


class DownloadError(RuntimeError):
    """A download, check or extraction that failed (the message says which file and why)."""


@dataclass(frozen=True)
class Remote:
    filename: str
    size: Optional[int] = None      # bytes, where known
    sha256: Optional[str] = None    # where known
    md5: Optional[str] = None       # where known
    checksum_source: str = ""


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    base_url: str
    files: Dict[str, Remote]
    default_parts: Callable[[Sequence[int]], List[str]]
    description: str = ""
    benchmark_root: str = ""        # folder (inside the target) holding <set>/HR folders, for LR making


def _div2k_files() -> Dict[str, Remote]:
    md5 = {
        "train_hr": ("DIV2K_train_HR.zip", "bdc2d9338d4e574fe81bf7d158758658"),
        "valid_hr": ("DIV2K_valid_HR.zip", "9fcdda83005c5e5997799b69f955ff88"),
        "train_lr_x2": ("DIV2K_train_LR_bicubic_X2.zip", "9a637d2ef4db0d0a81182be37fb00692"),
        "train_lr_x3": ("DIV2K_train_LR_bicubic_X3.zip", "ad80b9fe40c049a07a8a6c51bfab3b6d"),
        "train_lr_x4": ("DIV2K_train_LR_bicubic_X4.zip", "76c43ec4155851901ebbe8339846d93d"),
        "valid_lr_x2": ("DIV2K_valid_LR_bicubic_X2.zip", "1512c9a3f7bde2a1a21a73044e46b9cb"),
        "valid_lr_x3": ("DIV2K_valid_LR_bicubic_X3.zip", "18b1d310f9f88c13618c287927b29898"),
        "valid_lr_x4": ("DIV2K_valid_LR_bicubic_X4.zip", "21962de700c8d368c6ff83314480eff0"),
    }
    return {k: Remote(f, md5=m, checksum_source=_TORCHSR) for k, (f, m) in md5.items()}


DATASETS: Dict[str, DatasetSpec] = {
    "div2k": DatasetSpec(
        "div2k", "https://data.vision.ee.ethz.ch/cvl/DIV2K/", _div2k_files(),
        lambda scales: ["train_hr", "valid_hr"] + [f"{p}_lr_x{s}" for p in ("train", "valid") for s in scales],
        "DIV2K (Agustsson & Timofte, NTIRE 2017): 800 training + 100 validation 2K images, with the "
        "official MATLAB-bicubic LR; extracts to DIV2K_{train,valid}_HR and "
        "DIV2K_{train,valid}_LR_bicubic/X<s>"),
    "benchmark": DatasetSpec(
        "benchmark", "https://cv.snu.ac.kr/research/EDSR/",
        {"benchmark": Remote("benchmark.tar", md5="4ace41d33c2384b97e6b320cd0afd6ba", checksum_source=_TORCHSR)},
        lambda scales: ["benchmark"],
        "Set5, Set14, B100, Urban100 in the <set>/HR + <set>/LR_bicubic/X<s> layout (the archive "
        "linked by EDSR-PyTorch); extracts to benchmark/<set>/",
        benchmark_root="benchmark"),
}


# ----------------------------------------------------------------------------- one file

def verify_file(path, size: Optional[int] = None, sha256: Optional[str] = None, md5: Optional[str] = None) -> None:
    """Raise DownloadError unless ``path`` has the given size / checksums (those given)."""
    path = Path(path)
    actual = path.stat().st_size
    if size is not None and actual != size:
        raise DownloadError(f"{path.name}: size {actual} bytes, expected {size}")
    if sha256 and file_hash(path, "sha256") != sha256.lower():
        raise DownloadError(f"{path.name}: sha256 {file_hash(path, 'sha256')} does not match the expected {sha256}")
    if md5 and file_hash(path, "md5") != md5.lower():
        raise DownloadError(f"{path.name}: md5 {file_hash(path, 'md5')} does not match the expected {md5}")


_CONTENT_RANGE = re.compile(r"bytes\s+(\d+)-(\d+)/(\d+|\*)")


def _fetch_once(url: str, part: Path, timeout: float, progress: bool) -> Optional[int]:
    """Append the rest of ``url`` to ``part``; returns the total size when the server says it."""
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": "distillsr-downloader"}
    if have:
        headers["Range"] = f"bytes={have}-"
    req = urllib.request.Request(url, headers=headers)
    try:
        resp = urllib.request.urlopen(req, timeout=timeout)
    except urllib.error.HTTPError as e:
        if e.code == 416 and have:  # nothing left to send: the part is complete (checked by the caller)
            return have
        raise
    with resp:
        total = None
        if have and resp.status == 206:
            m = _CONTENT_RANGE.match(resp.headers.get("Content-Range", ""))
            if not m or int(m.group(1)) != have:
                raise DownloadError(f"{url}: server answered the range request with "
                                    f"{resp.headers.get('Content-Range')!r}")
            total = int(m.group(3)) if m.group(3) != "*" else None
            mode = "ab"
        else:  # 200: the server sends everything from the start
            have, mode = 0, "wb"
            n = resp.headers.get("Content-Length")
            total = int(n) if n is not None else None
        bar = None
        if progress:
            from tqdm import tqdm
            bar = tqdm(total=total, initial=have, unit="B", unit_scale=True, unit_divisor=1024,
                       desc=part.name[:-5], leave=False)
        try:
            with open(part, mode) as f:
                while True:
                    chunk = resp.read(_CHUNK)
                    if not chunk:
                        break
                    f.write(chunk)
                    if bar is not None:
                        bar.update(len(chunk))
        finally:
            if bar is not None:
                bar.close()
    return total


def check_url(url: str, what: str = "URL") -> str:
    """``url`` if it is an http(s), ftp or file URL; DownloadError naming ``what`` otherwise."""
    if not re.match(r"^(https?|ftp|file)://[^\s]+$", url or ""):
        raise DownloadError(f"{what} {url!r} is not a URL (expected http://, https://, ftp:// or file://...)")
    return url


def download_file(url: str, dest, size: Optional[int] = None, sha256: Optional[str] = None,
                  md5: Optional[str] = None, retries: int = 3, timeout: float = 60.0, progress: bool = True,
                  log: Callable[[str], None] = print) -> Path:
    """Download ``url`` to ``dest``, resuming ``dest.part`` if present; verify; rename into place.

    An existing ``dest`` that passes the checks is kept. After a dropped
    connection the transfer is resumed up to ``retries`` times (1, 2, 4 ... s
    apart); a later call resumes it too. A complete file that fails its checks
    is deleted (so the next call starts over) and DownloadError is raised.
    """
    check_url(url)
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with file_lock(dest.parent):  # one writer of dest.part at a time (a lock on the folder)
        return _download_locked(url, dest, size, sha256, md5, retries, timeout, progress, log)


def _download_locked(url: str, dest: Path, size, sha256, md5, retries: int, timeout: float, progress: bool,
                     log: Callable[[str], None]) -> Path:
    dest.parent.mkdir(parents=True, exist_ok=True)
    if dest.exists():
        verify_file(dest, size, sha256, md5)
        log(f"{dest.name}: already there and checked")
        return dest
    part = dest.with_name(dest.name + ".part")
    attempt = 0
    while True:
        try:
            if part.exists():
                log(f"{dest.name}: resuming at {part.stat().st_size} bytes")
            total = _fetch_once(url, part, timeout, progress)
            got = part.stat().st_size if part.exists() else 0
            if total is not None and got < total:
                raise DownloadError(f"{url}: connection closed at {got} of {total} bytes")
            break
        except (urllib.error.URLError, HTTPException, OSError, DownloadError) as e:
            if isinstance(e, urllib.error.HTTPError) and e.code not in (408, 429, 500, 502, 503, 504):
                raise DownloadError(f"{url}: HTTP {e.code} {e.reason}") from e
            if isinstance(e, urllib.error.URLError) and isinstance(e.reason, socket.gaierror):
                raise DownloadError(f"{url}: the host name does not resolve, is this machine offline? "
                                    f"({e.reason})") from e
            got = part.stat().st_size if part.exists() else 0
            if attempt >= retries:
                raise DownloadError(f"{url}: transfer failed after {attempt + 1} attempt(s) with {got} bytes "
                                    f"kept in {part.name}; run again to resume ({e})") from e
            attempt += 1
            log(f"{dest.name}: {e}; retrying ({attempt}/{retries}) from byte {got}")
            time.sleep(min(2 ** (attempt - 1), 30))
    try:
        verify_file(part, size, sha256, md5)
    except DownloadError as e:
        part.unlink()
        raise DownloadError(f"{e} (download from {url}; the file was deleted, run again to download it anew)") \
            from None
    os.replace(part, dest)
    log(f"{dest.name}: downloaded" + (" and checked" if (size or sha256 or md5) else " (no checksum known)"))
    return dest


# ----------------------------------------------------------------------------- archives

def _inside(root: Path, name: str) -> Path:
    target = (root / name).resolve()
    if target != root and root not in target.parents:
        raise DownloadError(f"archive member {name!r} would be written outside {root}")
    return target


def _move_merge(src: Path, dst: Path) -> None:
    if src.is_dir() and dst.is_dir():
        for child in list(src.iterdir()):
            _move_merge(child, dst / child.name)
        src.rmdir()
    else:
        if dst.is_dir():
            shutil.rmtree(dst)
        os.replace(src, dst)


def extract_archive(archive, to_dir, log: Callable[[str], None] = print) -> List[Path]:
    """Extract a zip or tar into ``to_dir`` (merging folders); returns the top-level entries.

    Members are first extracted into a temp folder inside ``to_dir`` and then
    moved into place, so an interrupted extraction leaves no half-written
    files in the dataset folders; a marker file records completed extractions.
    """
    archive, to_dir = Path(archive), Path(to_dir).resolve()
    marker = to_dir / f".{archive.name}.extracted"
    if marker.exists():
        log(f"{archive.name}: already extracted")
        return [to_dir / n for n in marker.read_text().split("\n") if n]
    tmp = to_dir / f".extract-{archive.name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    try:
        if zipfile.is_zipfile(archive):
            with zipfile.ZipFile(archive) as z:
                for info in z.infolist():
                    _inside(tmp.resolve(), info.filename)
                z.extractall(tmp)
        elif tarfile.is_tarfile(archive):
            with tarfile.open(archive) as t:
                for m in t.getmembers():
                    _inside(tmp.resolve(), m.name)
                    if m.issym() or m.islnk() or m.isdev():
                        raise DownloadError(f"{archive.name}: member {m.name!r} is a link or device; refusing")
                t.extractall(tmp)
        else:
            raise DownloadError(f"{archive}: neither a zip nor a tar archive")
        tops = sorted(p.name for p in tmp.iterdir())
        for name in tops:
            _move_merge(tmp / name, to_dir / name)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    marker.write_text("\n".join(tops) + "\n")
    log(f"{archive.name}: extracted {', '.join(tops)}")
    return [to_dir / n for n in tops]


def make_benchmark_lr(root, scales: Sequence[int] = (2, 3, 4), log: Callable[[str], None] = print) -> int:
    """For every ``<root>/<set>/HR``, write the missing ``LR_bicubic/X<s>/<name>x<s>.png``
    (MATLAB bicubic of the mod-cropped HR, :func:`distillsr.data.degrade_folder`).

    Returns how many LR images were made. Greyscale HR images get greyscale LR.
    """
    from .benchmark import degrade_folder, find_sets
    root = Path(root)
    try:
        sets = find_sets(root)
    except FileNotFoundError:
        sets = []
    if not sets:
        raise DownloadError(f"{root}: no <set>/HR folders to make LR images for")
    made = 0
    for name in sets:
        stats = degrade_folder(root / name / "HR", root / name, scales,
                               on_error=lambda p, e: log(f"{p}: {e}; skipped"))
        made += stats["written"]
        log(f"{name}: LR images present for x{', x'.join(map(str, scales))}"
            + (f" ({stats['written']} made with MATLAB bicubic)" if stats["written"] else ""))
    return made


# ----------------------------------------------------------------------------- datasets

def download_dataset(name: str, to, parts: Optional[Sequence[str]] = None, scales: Sequence[int] = (2, 3, 4),
                     mirror: Optional[str] = None, extract: bool = True, make_lr: bool = True,
                     keep_archives: bool = True, retries: int = 3, progress: bool = True,
                     log: Callable[[str], None] = print) -> Path:
    """Download (resumably), check, extract a dataset of :data:`DATASETS` into ``to``; returns ``to``."""
    if name not in DATASETS:
        raise DownloadError(f"unknown dataset {name!r}; known: {', '.join(DATASETS)}")
    spec = DATASETS[name]
    parts = list(parts) if parts else spec.default_parts(scales)
    unknown = [p for p in parts if p not in spec.files]
    if unknown:
        raise DownloadError(f"{name}: unknown part(s) {', '.join(unknown)}; known: {', '.join(spec.files)}")
    base = mirror or os.environ.get(MIRROR_ENV) or spec.base_url
    check_url(base, "mirror" if base != spec.base_url else "base URL")
    to = Path(to)
    archives = to / "archives"
    for part in parts:
        r = spec.files[part]
        url = base.rstrip("/") + "/" + r.filename
        if extract and (to / f".{r.filename}.extracted").exists() and not (archives / r.filename).exists():
            log(f"{r.filename}: already downloaded and extracted")
            continue
        path = download_file(url, archives / r.filename, r.size, r.sha256, r.md5, retries=retries,
                             progress=progress, log=log)
        if extract:
            extract_archive(path, to, log=log)
            if not keep_archives:
                path.unlink()
    if extract and make_lr and spec.benchmark_root:
        make_benchmark_lr(to / spec.benchmark_root, scales, log=log)
    return to
