"""Which files a batch reads and writes: :func:`collect_inputs` expands files, folders and
globs (leaving out outputs of upscale found among them), :func:`output_path` names each
output, and the output options are checked (:func:`check_suffix`, :func:`check_output_dir`)."""
from __future__ import annotations

import glob
import os
from pathlib import Path
from typing import Iterable, List, Optional, Tuple, Union

from .. import io as imgio

__all__ = ["collect_inputs", "output_path", "check_suffix", "check_output_dir", "OwnOutputs"]

PathArg = Union[str, os.PathLike]


def check_suffix(suffix: str) -> str:
    """The suffix added to output names: refused when it could leave the output folder."""
    if any(sep in suffix for sep in ("/", "\\", os.sep, os.altsep) if sep) or ".." in suffix:
        raise ValueError(f"--suffix {suffix!r}: a suffix is added to file names and may not contain "
                         "a path separator or '..'")
    return suffix


def check_output_dir(out_dir: PathArg) -> Path:
    """The output folder: refused when it, or a folder above it, is an existing file, or when
    it (or, not made yet, the nearest folder above it) cannot be written, e.g. on a read-only
    file system."""
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output folder {out} is an existing file; -o takes a folder")
    for above in [out, *out.parents]:
        if above.exists():
            if not above.is_dir():
                raise ValueError(f"output folder {out}: {above} is an existing file, not a folder")
            if not os.access(above, os.W_OK | os.X_OK):
                how = "a read-only file system" if _read_only_fs(above) else "no write permission"
                which = "it" if above == out else f"{above}, where it would be made"
                raise ValueError(f"output folder {out} cannot be written ({which}: {how})")
            break
    return out


def _read_only_fs(folder: Path) -> bool:
    try:
        return bool(os.statvfs(folder).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):
        return False


# ----------------------------------------------------------------------------- inputs

def _inside(path: Path, folder: Path) -> bool:
    return folder == path or folder in path.parents


class OwnOutputs:
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
                   own_outputs: Optional[OwnOutputs] = None, extensions: Optional[Iterable[str]] = None
                   ) -> Tuple[List[Tuple[Path, Path]], List[Tuple[str, str]]]:
    """Expand files, folders and glob patterns.

    Returns ``(items, problems)``: items are ``(file, relative path)`` where the relative path
    is what the output keeps (a folder's files relative to that folder, a glob's matches
    relative to the pattern's fixed leading folders, a named file by its name); problems are
    ``(input, message)`` for inputs that match nothing. With ``out_dir``, files that folders
    and globs find in the output tree are left out when the tree lies inside the folder walked,
    or when their name ends with ``suffix`` (outputs of an earlier run); named files never are.
    Folders and globs yield the files whose extension is in ``extensions`` (default: the
    image formats, ``distillsr.io.INPUT_EXTENSIONS``).
    """
    exts = frozenset(extensions) if extensions is not None else imgio.INPUT_EXTENSIONS
    kind = "images" if exts <= imgio.INPUT_EXTENSIONS else "images or videos"
    own = own_outputs or OwnOutputs(out_dir, suffix)
    items: List[Tuple[Path, Path]] = []
    problems: List[Tuple[str, str]] = []
    seen = set()

    def add(path: Path, rel: Path):
        key = path.resolve()
        if key not in seen:
            seen.add(key)
            items.append((path, rel))

    def is_image(p: Path) -> bool:
        return p.is_file() and p.suffix.lower() in exts and not p.name.startswith(".")

    for item in inputs:
        item = str(item)
        p = Path(item)
        if p.is_dir():
            found = sorted(f for f in (p.rglob("*") if recursive else p.glob("*")) if is_image(f))
            files = [f for f in found if not own(f, p)]
            if not found:
                problems.append((item, f"folder holds no {kind} (" + ", ".join(sorted(exts))
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
                problems.append((item, f"pattern matches no {kind}"))
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
