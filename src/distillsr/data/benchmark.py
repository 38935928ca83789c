"""Benchmark test sets in the common layout, and making LR images from HR.

Layout (Set5, Set14, B100, Urban100, Manga109 or any folder like them)::

    <root>/<Set>/HR/<name>.png
    <root>/<Set>/LR_bicubic/X<s>/<name>x<s>.png

When an LR file (or the whole ``LR_bicubic/X<s>`` folder) is missing, the LR
image is made from the mod-cropped HR with MATLAB-compatible bicubic
``imresize`` -- the same bits MATLAB would have written.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, List, Optional, Sequence, Union

import numpy as np

from ..io import INPUT_EXTENSIONS, atomic_write
from .imresize import imresize

__all__ = ["IMAGE_EXTENSIONS", "STANDARD_SETS", "ImageError", "read_image", "write_png", "modcrop",
           "make_lr", "BenchmarkItem", "BenchmarkSet", "find_sets", "lr_path", "degrade_folder"]

PathLike = Union[str, os.PathLike]
IMAGE_EXTENSIONS = tuple(sorted(INPUT_EXTENSIONS))  # the one table, distillsr.io
STANDARD_SETS = ("Set5", "Set14", "B100", "Urban100", "Manga109")


class ImageError(ValueError):
    """An image file that cannot be used (unreadable, unsupported mode, wrong size)."""


def read_image(path: PathLike) -> np.ndarray:
    """Read an 8-bit image as uint8 H x W x 3 (colour) or H x W x 1 (greyscale).

    Greyscale files (PIL modes L, LA, 1) keep one channel; palette images become
    RGB; alpha is dropped. 16-bit and float images are refused.
    """
    from PIL import Image
    path = Path(path)
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode in ("L", "LA", "1"):
                return np.asarray(im.convert("L"))[:, :, None].copy()
            if mode in ("RGB", "RGBA", "RGBX", "CMYK", "YCbCr", "P", "PA"):
                return np.asarray(im.convert("RGB")).copy()
    except FileNotFoundError:
        raise ImageError(f"{path}: no such file") from None
    except Exception as e:  # PIL raises many types for truncated / corrupt files
        raise ImageError(f"{path}: cannot read image ({type(e).__name__}: {e})") from e
    raise ImageError(f"{path}: unsupported image mode {mode!r} (8-bit RGB or greyscale expected)")


def write_png(path: PathLike, img: np.ndarray) -> Path:
    """Write a uint8 H x W x {1,3} (or H x W) image as PNG atomically (:func:`distillsr.io.atomic_write`)."""
    from PIL import Image
    path = Path(path)
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"{path}: write_png needs uint8 data, got {img.dtype}")
    if img.ndim == 3 and img.shape[2] == 1:
        img = img[:, :, 0]
    return atomic_write(path, lambda tmp: Image.fromarray(img).save(tmp, format="PNG"))


def modcrop(img: np.ndarray, scale: int) -> np.ndarray:
    """Keep the top-left ``H - H % scale`` rows and ``W - W % scale`` columns."""
    h, w = img.shape[:2]
    return img[:h - h % scale, :w - w % scale]


def make_lr(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(modcrop(hr, s), 1/s, 'bicubic')`` on uint8 data."""
    if min(hr.shape[:2]) < scale:
        raise ImageError(f"image of {hr.shape[1]}x{hr.shape[0]} is too small for x{scale}")
    return imresize(modcrop(hr, scale), 1.0 / scale)


def lr_path(set_dir: PathLike, name: str, scale: int) -> Path:
    return Path(set_dir) / "LR_bicubic" / f"X{scale}" / f"{name}x{scale}.png"


def _list_images(folder: Path) -> List[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS and not p.name.startswith("."))


@dataclass
class BenchmarkItem:
    """One test image: HR cropped to ``LR size * scale``, and its LR."""
    name: str
    hr: np.ndarray          # uint8 H x W x C, C = 1 (grey) or 3
    lr: np.ndarray          # uint8 h x w x C
    lr_generated: bool      # True when made from HR because the LR file was missing

    @property
    def is_grey(self) -> bool:
        return self.hr.shape[2] == 1


class BenchmarkSet:
    """The images of ``<root>/<name>`` at one scale, in name order.

    Iterating reads each pair lazily; ``load(i)`` raises :class:`ImageError`
    naming the file for unreadable or inconsistent images, so a caller can
    report it and go on.
    """

    def __init__(self, root: PathLike, name: str, scale: int):
        self.root = Path(root)
        self.name = name
        self.scale = int(scale)
        if self.scale < 1:
            raise ValueError(f"scale must be a positive integer, got {scale}")
        self.dir = self.root / name
        self.hr_dir = self.dir / "HR"
        if not self.hr_dir.is_dir():
            raise FileNotFoundError(f"{self.hr_dir}: no such folder (expected <root>/{name}/HR/*.png)")
        self.hr_paths = _list_images(self.hr_dir)
        if not self.hr_paths:
            raise FileNotFoundError(f"{self.hr_dir}: no images")
        self.lr_dir = self.dir / "LR_bicubic" / f"X{self.scale}"

    def __len__(self) -> int:
        return len(self.hr_paths)

    @property
    def names(self) -> List[str]:
        return [p.stem for p in self.hr_paths]

    def missing_lr(self) -> List[str]:
        """Names whose LR file is absent (they are generated from HR)."""
        return [p.stem for p in self.hr_paths if not lr_path(self.dir, p.stem, self.scale).is_file()]

    def load(self, i: int) -> BenchmarkItem:
        hr_file = self.hr_paths[i]
        name = hr_file.stem
        hr = read_image(hr_file)
        lr_file = lr_path(self.dir, name, self.scale)
        generated = not lr_file.is_file()
        if generated:
            lr = make_lr(hr, self.scale)
        else:
            lr = read_image(lr_file)
        h, w = lr.shape[0] * self.scale, lr.shape[1] * self.scale
        if hr.shape[0] < h or hr.shape[1] < w:
            raise ImageError(f"{lr_file}: LR is {lr.shape[1]}x{lr.shape[0]}, x{self.scale} = {w}x{h}, "
                             f"larger than HR {hr_file.name} ({hr.shape[1]}x{hr.shape[0]})")
        return BenchmarkItem(name, np.ascontiguousarray(hr[:h, :w]), lr, generated)

    def __iter__(self) -> Iterator[BenchmarkItem]:
        for i in range(len(self)):
            yield self.load(i)


def find_sets(root: PathLike) -> List[str]:
    """Sets under ``root`` (folders with an ``HR`` folder): the standard ones first, in
    the usual table order, then the others alphabetically."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{root}: no such folder")
    found = sorted(d.name for d in root.iterdir() if (d / "HR").is_dir())
    std = [s for s in STANDARD_SETS if s in found]
    return std + [s for s in found if s not in std]


def degrade_folder(hr_dir: PathLike, out_dir: PathLike, scales: Sequence[int], *,
                   overwrite: bool = False,
                   on_error: Optional[Callable[[Path, Exception], None]] = None,
                   progress: bool = False) -> dict:
    """Write ``out_dir/LR_bicubic/X<s>/<name>x<s>.png`` = MATLAB bicubic LR of every
    image in ``hr_dir`` (mod-cropped first), for each scale.

    Existing outputs are kept unless ``overwrite``. A bad input is passed to
    ``on_error(path, exc)`` and the others go on (without ``on_error`` it raises).
    Returns counts: ``{"written": n, "kept": n, "failed": [paths]}``.
    """
    hr_dir, out_dir = Path(hr_dir), Path(out_dir)
    if not hr_dir.is_dir():
        raise FileNotFoundError(f"{hr_dir}: no such folder")
    scales = [int(s) for s in scales]
    if not scales or any(s < 2 for s in scales):
        raise ValueError(f"scales must be integers >= 2, got {scales}")
    paths = _list_images(hr_dir)
    if not paths:
        raise FileNotFoundError(f"{hr_dir}: no images ({', '.join(IMAGE_EXTENSIONS)})")
    stats = {"written": 0, "kept": 0, "failed": []}
    it = paths
    if progress:
        from tqdm import tqdm
        it = tqdm(paths, desc="degrade", unit="img")
    for p in it:
        todo = [s for s in scales if overwrite or not lr_path(out_dir, p.stem, s).is_file()]
        stats["kept"] += len(scales) - len(todo)
        if not todo:
            continue
        try:
            hr = read_image(p)
            for s in todo:
                write_png(lr_path(out_dir, p.stem, s), make_lr(hr, s))
                stats["written"] += 1
        except (ImageError, OSError) as e:
            if on_error is None:
                raise
            stats["failed"].append(str(p))
            on_error(p, e)
    return stats
