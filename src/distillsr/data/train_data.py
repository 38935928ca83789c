"""Training data: (LR, HR) patch pairs from DIV2K, a folder of HR photos, or paired folders.

Every random choice for the n-th sample of a run (which image, where the patch
is, which flips) is a pure function of ``(seed, n)``: the image order is a
seeded permutation per epoch and the patch/augmentation draws come from a
generator seeded with ``(seed, n)``. So the data stream does not depend on the
number of loader processes, a run resumed at iteration ``i`` sees exactly the
samples an uninterrupted run sees from ``i`` on (mid-epoch too), and ``k``
processes of a DistributedDataParallel run together see exactly the samples of
one process with the same global batch.

Sources (``DataConfig.kind``):
* ``div2k``: ``<root>/DIV2K_<split>_HR/*.png`` with ``<root>/DIV2K_<split>_LR_bicubic/X<s>/<name>x<s>.png``
  (LR made on the fly when that folder is absent);
* ``hr_folder``: any folder of HR images; LR = MATLAB-bicubic downscale of the whole
  (mod-cropped) image, made once per image and cached with ``cache: true``;
* ``paired``: ``root`` (HR) and ``lr_root`` (LR) with matching names (``name.png`` or ``namex<s>.png``).
"""
from __future__ import annotations

import os
import sys
import warnings
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, List, Optional, Sequence, Tuple

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from .benchmark import BenchmarkSet, ImageError, make_lr, write_png
from .benchmark import read_image as _read_image

__all__ = ["IMAGE_EXTS", "list_images", "read_rgb", "downscale", "PairSpec", "find_pairs",
           "PairStore", "PatchDataset", "IterationBatchSampler", "build_train_loader", "collate_patches",
           "load_benchmark", "extract_subimages", "DataError"]

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".ppm")


class DataError(ValueError):
    """Training or validation data that cannot be used (the message names the file)."""


# ----------------------------------------------------------------------------- images

def list_images(folder, recursive: bool = False) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise DataError(f"{folder}: no such folder")
    it = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in it if p.is_file() and p.suffix.lower() in IMAGE_EXTS and not p.name.startswith("."))


def read_rgb(path) -> np.ndarray:
    """Decode an image to HxWx3 uint8 RGB (greyscale replicated to three channels)."""
    try:
        img = _read_image(path)
    except ImageError as e:
        raise DataError(str(e)) from e
    return np.ascontiguousarray(np.repeat(img, 3, axis=2)) if img.shape[2] == 1 else img


def image_size(path) -> Tuple[int, int]:
    """(height, width) from the file header, without decoding the pixels."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            w, h = im.size
    except Exception as e:
        raise DataError(f"{path}: cannot read image ({e})") from e
    return h, w


def downscale(hr: np.ndarray, scale: int) -> np.ndarray:
    """MATLAB ``imresize(modcrop(hr, s), 1/s, 'bicubic')`` on uint8 (the benchmarks' LR)."""
    try:
        return make_lr(hr, scale)
    except ImageError as e:
        raise DataError(str(e)) from e


# ----------------------------------------------------------------------------- pairs

@dataclass(frozen=True)
class PairSpec:
    name: str
    hr: Path
    lr: Optional[Path]  # None: made from HR with MATLAB bicubic


def _find_lr(lr_dir: Path, hr: Path, scale: int) -> Optional[Path]:
    for stem in (f"{hr.stem}x{scale}", hr.stem):
        for ext in (hr.suffix, *IMAGE_EXTS):
            p = lr_dir / f"{stem}{ext}"
            if p.is_file():
                return p
    return None


def find_pairs(kind: str, root, scale: int, lr_root: str = "", split: str = "train",
               recursive: bool = False) -> List[PairSpec]:
    """The (HR, LR) files of a training source; LR ``None`` means 'make it on the fly'."""
    root = Path(root)
    if kind == "div2k":
        hr_dir = root / f"DIV2K_{split}_HR"
        if not hr_dir.is_dir():
            raise DataError(f"{hr_dir}: no such folder (expected the DIV2K layout under {root}; "
                            f"get it with: distillsr data download div2k --to {root})")
        lr_dir = root / f"DIV2K_{split}_LR_bicubic" / f"X{scale}"
        hrs = list_images(hr_dir)
        if not lr_dir.is_dir():
            warnings.warn(f"{lr_dir} not found: making the x{scale} LR images on the fly (MATLAB bicubic)")
            return [PairSpec(p.stem, p, None) for p in hrs]
        out = []
        for p in hrs:
            lr = _find_lr(lr_dir, p, scale)
            if lr is None:
                raise DataError(f"{p}: no LR image for it in {lr_dir} (expected {p.stem}x{scale}.png)")
            out.append(PairSpec(p.stem, p, lr))
        return out
    if kind == "hr_folder":
        return [PairSpec(p.stem, p, None) for p in list_images(root, recursive)]
    if kind == "paired":
        lr_dir = Path(lr_root)
        if not lr_dir.is_dir():
            raise DataError(f"{lr_dir}: no such folder (data.lr_root)")
        out = []
        for p in list_images(root, recursive):
            sub = lr_dir / p.parent.relative_to(root)
            lr = _find_lr(sub, p, scale)
            if lr is None:
                raise DataError(f"{p}: no LR image with a matching name in {sub}")
            out.append(PairSpec(str(p.relative_to(root).with_suffix("")), p, lr))
        return out
    raise DataError(f"unknown data kind {kind!r} (div2k, hr_folder, paired)")


class PairStore:
    """Loads (LR, HR) uint8 pairs, HR cropped to exactly ``scale`` x the LR size.

    ``prepare(min_lr_side)`` checks every file's header, leaves out (and logs,
    naming them) files that are unreadable or too small, and, with
    ``cache``, decodes everything once (making the LR where needed) so that
    loading a patch costs only a crop.
    """

    def __init__(self, specs: Sequence[PairSpec], scale: int, cache: bool = True):
        self.specs = list(specs)
        self.scale = int(scale)
        self.cache = cache
        self._data: Optional[List[Tuple[np.ndarray, np.ndarray]]] = None

    def __len__(self) -> int:
        return len(self.specs)

    def _expected_lr_size(self, spec: PairSpec) -> Tuple[int, int]:
        h, w = image_size(spec.hr)
        if spec.lr is None:
            return h // self.scale, w // self.scale
        lh, lw = image_size(spec.lr)
        if lh * self.scale > h or lw * self.scale > w or h - lh * self.scale >= self.scale * 2 or \
                w - lw * self.scale >= self.scale * 2:
            raise DataError(f"{spec.lr}: LR size {lw}x{lh} does not fit HR {spec.hr.name} {w}x{h} at x{self.scale}")
        return lh, lw

    def load(self, i: int) -> Tuple[np.ndarray, np.ndarray]:
        if self._data is not None:
            return self._data[i]
        return self._load(self.specs[i])

    def _load(self, spec: PairSpec) -> Tuple[np.ndarray, np.ndarray]:
        hr = read_rgb(spec.hr)
        s = self.scale
        if spec.lr is None:
            lr = downscale(hr, s)
        else:
            lr = read_rgb(spec.lr)
        lh, lw = lr.shape[:2]
        if hr.shape[0] < lh * s or hr.shape[1] < lw * s:
            raise DataError(f"{spec.lr}: LR size {lw}x{lh} does not fit HR {spec.hr} "
                            f"{hr.shape[1]}x{hr.shape[0]} at x{s}")
        return lr, np.ascontiguousarray(hr[:lh * s, :lw * s])

    def prepare(self, min_lr_side: int, workers: int = 0, log=print) -> "PairStore":
        kept, dropped = [], []
        for spec in self.specs:
            try:
                lh, lw = self._expected_lr_size(spec)
            except DataError as e:
                dropped.append(str(e))
                continue
            if min(lh, lw) < min_lr_side:
                dropped.append(f"{spec.hr}: LR would be {lw}x{lh}, smaller than the {min_lr_side}px patch")
                continue
            kept.append(spec)
        if self.cache and kept:
            n_threads = max(1, min(8, workers or (os.cpu_count() or 1)))
            log(f"data: decoding {len(kept)} images into memory"
                + (" and making their LR (MATLAB bicubic)" if any(s.lr is None for s in kept) else ""))
            with ThreadPoolExecutor(n_threads) as pool:
                results = list(pool.map(self._try_load, kept))
            data, specs = [], []
            for spec, res in zip(kept, results):
                if isinstance(res, DataError):
                    dropped.append(str(res))
                else:
                    specs.append(spec)
                    data.append(res)
            kept, self._data = specs, data
        for msg in dropped:
            log(f"data: left out {msg}")
        if not kept:
            raise DataError("no usable training images" + (f" ({len(dropped)} left out, first: {dropped[0]})"
                                                          if dropped else ""))
        self.specs = kept
        return self

    def _try_load(self, spec: PairSpec):
        try:
            return self._load(spec)
        except DataError as e:
            return e

    def nbytes(self) -> int:
        return sum(a.nbytes + b.nbytes for a, b in self._data) if self._data else 0


# ----------------------------------------------------------------------------- patches

class PatchDataset(Dataset):
    """Sample ``n`` of a run -> (LR patch, HR patch), uint8 CHW numpy arrays (batched by ``collate_patches``).

    Image of sample ``n``: epoch ``e = n // L`` (``L = len(store) * repeat``)
    uses the permutation of ``range(L)`` seeded by ``(seed, e)``; the patch
    position and flips come from a generator seeded by ``(seed, n)``.
    """

    def __init__(self, store: PairStore, patch_size: int, seed: int, flip: bool = True,
                 rot90: bool = True, repeat: int = 1):
        self.store = store
        self.patch = int(patch_size)
        self.scale = store.scale
        self.seed = int(seed)
        self.flip = flip
        self.rot90 = rot90
        self.repeat = int(repeat)
        self._perm_epoch = -1
        self._perm = None

    @property
    def epoch_length(self) -> int:
        return len(self.store) * self.repeat

    def image_index(self, n: int) -> int:
        epoch, pos = divmod(int(n), self.epoch_length)
        if epoch != self._perm_epoch:
            rng = np.random.default_rng([self.seed, 0x0DA7A, epoch])
            self._perm = rng.permutation(self.epoch_length)
            self._perm_epoch = epoch
        return int(self._perm[pos]) % len(self.store)

    def __len__(self) -> int:  # the stream is indexed by sample number, without end
        return sys.maxsize

    def __getitem__(self, n: int):
        idx = self.image_index(n)
        lr, hr = self.store.load(idx)
        rng = np.random.default_rng([self.seed, int(n)])
        p, s = self.patch, self.scale
        lh, lw = lr.shape[:2]
        if lh < p or lw < p:
            raise DataError(f"{self.store.specs[idx].hr}: LR {lw}x{lh} smaller than the {p}px patch")
        y = int(rng.integers(0, lh - p + 1))
        x = int(rng.integers(0, lw - p + 1))
        hflip, vflip, transpose = (rng.random(3) < 0.5).tolist()  # always three draws
        lr_p = lr[y:y + p, x:x + p]
        hr_p = hr[y * s:(y + p) * s, x * s:(x + p) * s]
        # numpy views, one copy at the end (torch ops on these sizes would start thread pools)
        if self.flip and hflip:
            lr_p, hr_p = lr_p[:, ::-1], hr_p[:, ::-1]
        if self.flip and vflip:
            lr_p, hr_p = lr_p[::-1], hr_p[::-1]
        if self.rot90 and transpose:  # with the flips this gives all 8 dihedral transforms
            lr_p, hr_p = lr_p.transpose(1, 0, 2), hr_p.transpose(1, 0, 2)
        return np.ascontiguousarray(lr_p.transpose(2, 0, 1)), np.ascontiguousarray(hr_p.transpose(2, 0, 1))


class IterationBatchSampler(Sampler):
    """Yields, for iterations ``start .. end-1``, this rank's sample numbers.

    Iteration ``i`` covers samples ``i*B .. i*B+B-1`` (``B`` = global batch);
    rank ``r`` of ``k`` takes the ``r``-th consecutive ``B/k`` of them.
    """

    def __init__(self, global_batch: int, start: int, end: int, rank: int = 0, world_size: int = 1):
        if global_batch % world_size:
            raise DataError(f"data.batch_size {global_batch} is not divisible by the {world_size} processes")
        self.global_batch = global_batch
        self.per_rank = global_batch // world_size
        self.start, self.end, self.rank = int(start), int(end), int(rank)

    def __iter__(self) -> Iterator[List[int]]:
        for it in range(self.start, self.end):
            base = it * self.global_batch + self.rank * self.per_rank
            yield list(range(base, base + self.per_rank))

    def __len__(self) -> int:
        return max(0, self.end - self.start)


def collate_patches(batch):
    """Stack (LR, HR) uint8 arrays into two NCHW uint8 tensors.

    Stacked with numpy, single-threaded: torch's stack of a few MB starts its
    thread pool, which costs far more than the copy on a busy machine."""
    return (torch.from_numpy(np.stack([b[0] for b in batch])),
            torch.from_numpy(np.stack([b[1] for b in batch])))


def _worker_init(_):
    import signal
    torch.set_num_threads(1)
    # Ctrl-C is handled by the training process, which stops cleanly at the end of an iteration
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def build_train_loader(dataset: PatchDataset, global_batch: int, start: int, end: int, rank: int = 0,
                       world_size: int = 1, num_workers: int = 0, pin_memory: bool = False) -> DataLoader:
    sampler = IterationBatchSampler(global_batch, start, end, rank, world_size)
    kw = {}
    if num_workers > 0:
        kw = dict(worker_init_fn=_worker_init, prefetch_factor=4, persistent_workers=False)
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers, pin_memory=pin_memory,
                      collate_fn=collate_patches, **kw)


# ----------------------------------------------------------------------------- validation sets

def load_benchmark(folder, scale: int, max_images: int = 0) -> List[Tuple[str, np.ndarray, np.ndarray]]:
    """(name, LR, HR) uint8 arrays of a benchmark set: ``<folder>/HR`` + ``<folder>/LR_bicubic/X<s>``
    (read with :class:`distillsr.data.BenchmarkSet`: missing LR made with MATLAB bicubic, HR cropped
    to ``scale`` x the LR size, greyscale images kept with one channel). A folder without ``HR/``
    is read as a folder of HR images."""
    folder = Path(folder)
    out = []
    try:
        if (folder / "HR").is_dir():
            bset = BenchmarkSet(folder.parent, folder.name, scale)
            n = len(bset) if not max_images else min(max_images, len(bset))
            for i in range(n):
                item = bset.load(i)
                out.append((item.name, item.lr, item.hr))
        else:
            for p in list_images(folder)[:max_images or None]:
                hr = _read_image(p)
                lr = make_lr(hr, scale)
                out.append((p.stem, lr, np.ascontiguousarray(hr[:lr.shape[0] * scale, :lr.shape[1] * scale])))
    except (ImageError, FileNotFoundError) as e:
        raise DataError(f"validation set: {e}") from e
    if not out:
        raise DataError(f"{folder}: no images")
    return out


# ----------------------------------------------------------------------------- sub-images

def _starts(n: int, size: int, step: int) -> List[int]:
    if n <= size:
        return [0]
    s = list(range(0, n - size + 1, step))
    if s[-1] != n - size:
        s.append(n - size)
    return s


def extract_subimages(hr_dir, out_dir, size: int = 480, step: int = 240, lr_dir=None,
                      scale: int = 1, recursive: bool = False, log=print) -> int:
    """Cut every HR image (and its LR, if ``lr_dir``) into overlapping tiles.

    Tiles go to ``<out_dir>/HR/<name>_sNNN.png`` (and ``<out_dir>/LR/`` with
    tiles of ``size/scale`` at the matching places); decoding small tiles is
    much faster than decoding 2K images for every patch. Train on them with
    ``data.kind: paired`` (or ``hr_folder`` without LR). Returns the tile count.
    """
    if lr_dir is not None and (size % scale or step % scale):
        raise DataError(f"size {size} and step {step} must be multiples of the scale {scale}")
    out_dir = Path(out_dir)
    count = 0
    for p in list_images(hr_dir, recursive):
        hr = read_rgb(p)
        lr = None
        if lr_dir is not None:
            lr_path = _find_lr(Path(lr_dir), p, scale)
            if lr_path is None:
                raise DataError(f"{p}: no LR image for it in {lr_dir}")
            lr = read_rgb(lr_path)
            hr = hr[:lr.shape[0] * scale, :lr.shape[1] * scale]
        k = 0
        for y in _starts(hr.shape[0], size, step):
            for x in _starts(hr.shape[1], size, step):
                if lr is not None:
                    y, x = y - y % scale, x - x % scale
                name = f"{p.stem}_s{k:03d}.png"
                write_png(out_dir / "HR" / name, hr[y:y + size, x:x + size])
                if lr is not None:
                    ls = size // scale
                    write_png(out_dir / "LR" / name, lr[y // scale:y // scale + ls, x // scale:x // scale + ls])
                k += 1
        count += k
    log(f"wrote {count} tiles to {out_dir}")
    return count
