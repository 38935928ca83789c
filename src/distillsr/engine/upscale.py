"""Upscaling real images of any size: device and tile choice, alpha, batches of files.

The pieces, each usable from Python:

* :func:`load_runner` builds what runs the network (the ``backend``; ``torch`` here,
  others register with :func:`register_backend`).
* :class:`Upscaler` upscales one float image array: greyscale is run as RGB and averaged
  back, alpha is upscaled apart (bicubic) and re-attached, big images are processed in
  horizontal bands of overlapping tiles (``distillsr.engine.infer.tiled_forward``) so
  that memory stays bounded, optional x8 self-ensemble.
* :func:`choose_tile` picks the tile from the memory the device has free (``tile="auto"``),
  or ``None`` (the whole image at once) when that fits.
* :func:`upscale_files` runs a batch of files and folders into an output folder and
  returns a :class:`BatchReport`; a bad input is reported and the batch goes on.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import time
import weakref
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import io as imgio
from ..io import ImageReadError, ImageWriteError

__all__ = ["Upscaler", "select_device", "available_memory", "estimate_memory", "choose_tile",
           "load_runner", "register_backend", "BACKENDS", "collect_inputs", "upscale_files",
           "BatchReport", "MemoryEstimate", "DEFAULT_OVERLAP", "DEFAULT_BLEND"]

DEFAULT_OVERLAP = 24         # LR pixels shared by neighbouring tiles (as the ASID release)
DEFAULT_BLEND = "feather"    # how overlapping tile outputs are combined (see engine.infer)
MIN_AUTO_TILE = 64
MAX_AUTO_TILE = 2048
MEMORY_FRACTION = 0.5        # share of the free memory that tile="auto" plans to use
BAND_BYTES = 256 << 20       # float output of one band of tiles (bounds the blend buffers)

Runner = Callable[[torch.Tensor], torch.Tensor]


# ----------------------------------------------------------------------------- backends

BACKENDS: Dict[str, Callable[..., Runner]] = {}


def register_backend(name: str):
    """Decorator for ``factory(model, scale, weights, device, weights_dir) -> runner``.

    A runner is called on an N x 3 x h x w float tensor in [0, 1] on the device and returns
    the N x 3 x h*s x w*s result; it has an int attribute ``scale``. It may define
    ``memory_estimate(device) -> MemoryEstimate`` for ``tile="auto"``; torch modules are
    measured by a probe run.
    """
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


@register_backend("torch")
def _torch_backend(model: Union[str, torch.nn.Module, None] = None, scale: Optional[int] = None,
                   weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                   weights_dir=None) -> torch.nn.Module:
    from ..checkpoint import load_model
    from ..pretrained import load_pretrained
    if isinstance(model, torch.nn.Module):
        net = model
    elif weights is not None:
        net = load_model(weights, device)
    else:
        net = load_pretrained(model, 4 if scale is None else scale, device, weights_dir)
    if scale is not None and getattr(net, "scale", None) != scale:
        src = weights or getattr(net, "arch_name", type(net).__name__)
        raise ValueError(f"{src}: the model upscales x{getattr(net, 'scale', '?')}, not x{scale}")
    from ..kernels import prepare_for_inference
    return prepare_for_inference(net.to(device))  # eval mode, fused CPU kernels


@register_backend("onnxruntime")
def _onnxruntime_backend(**kwargs):
    """The network exported to ONNX and run by onnxruntime (``engine.onnx_backend``,
    imported only when asked for)."""
    from .onnx_backend import onnxruntime_backend
    return onnxruntime_backend(**kwargs)


def load_runner(model: Union[str, torch.nn.Module, None] = None, scale: Optional[int] = None, *,
                weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                backend: str = "torch", weights_dir=None) -> Runner:
    """Build the network runner: a pretrained name, a checkpoint file or a module."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](model=model, scale=scale, weights=weights, device=device,
                             weights_dir=weights_dir)


# ----------------------------------------------------------------------------- device, memory

def select_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    return dev


def available_memory(device: Union[str, torch.device]) -> int:
    """Bytes that can still be allocated on ``device`` (host RAM for CPU, cgroup-aware)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    candidates = []
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    candidates.append(int(line.split()[1]) * 1024)
    except OSError:
        pass
    try:  # a container's own limit (cgroup v2)
        limit = Path("/sys/fs/cgroup/memory.max").read_text().strip()
        if limit != "max":
            used = int(Path("/sys/fs/cgroup/memory.current").read_text())
            candidates.append(max(0, int(limit) - used))
    except (OSError, ValueError):
        pass
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            candidates.append(4 << 30)
    return int(min(candidates))


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one forward pass: ``fixed + per_pixel * (LR pixels)`` bytes."""
    per_pixel: float
    fixed: float = 0.0

    def bytes_for(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors alive at once during the ops run under it (CPU measurement).

    Counts every new storage an op creates until its last tensor is freed; views and
    in-place results (which share an input's storage) are not new memory.
    """

    def __init__(self):
        super().__init__()
        self.refs: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        n = self.refs.get(key, 0) - 1
        if n > 0:
            self.refs[key] = n
        elif key in self.refs:
            del self.refs[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs:
                continue
            if key in self.refs:
                self.refs[key] += 1
            else:
                self.refs[key] = 1
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key, storage.nbytes())
        return out


def _peak_bytes(runner: Runner, x: torch.Tensor) -> int:
    with torch.inference_mode():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            base = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            y = runner(x)
            del y
            return int(torch.cuda.max_memory_allocated(x.device) - base)
        tracker = _LiveBytes()
        with tracker:
            y = runner(x)
            del y
        return tracker.peak


_ESTIMATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def estimate_memory(runner: Runner, device: Union[str, torch.device], probe: Sequence[int] = (48, 64)
                    ) -> MemoryEstimate:
    """Peak memory of a forward pass as a linear function of the LR pixel count.

    Measured once per runner and device with two probe inputs (CUDA: the allocator's peak;
    CPU: the tensors alive at once, see :class:`_LiveBytes`), then cached. A runner may
    provide its own ``memory_estimate(device)``.
    """
    device = torch.device(device)
    if hasattr(runner, "memory_estimate"):
        return runner.memory_estimate(device)
    cache = _ESTIMATES.setdefault(runner, {}) if _weakrefable(runner) else {}
    if str(device) not in cache:
        a, b = probe
        pa = _peak_bytes(runner, torch.rand(1, 3, a, a, device=device))
        pb = _peak_bytes(runner, torch.rand(1, 3, b, b, device=device))
        per_pixel = max((pb - pa) / (b * b - a * a), pb / (b * b), 1.0)
        cache[str(device)] = MemoryEstimate(per_pixel, max(0.0, pb - per_pixel * b * b))
    return cache[str(device)]


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False


def choose_tile(runner: Runner, height: int, width: int, device: Union[str, torch.device],
                overlap: int = DEFAULT_OVERLAP, budget: Optional[int] = None,
                safety: float = 1.5) -> Optional[int]:
    """Tile size (LR pixels) for ``tile="auto"``; ``None`` when the whole image fits.

    ``budget`` is the memory the forward pass may use (default: half of what the device
    has free); the measured estimate is multiplied by ``safety`` for allocator overheads.
    """
    est = estimate_memory(runner, device)
    if budget is None:
        budget = int(MEMORY_FRACTION * available_memory(device))
    if safety * est.bytes_for(height * width) <= budget:
        return None
    side = math.sqrt(max(budget / safety - est.fixed, 0.0) / est.per_pixel)
    lo = max(MIN_AUTO_TILE, 2 * overlap + 8)
    return int(min(MAX_AUTO_TILE, max(lo, side)) // 8 * 8)


# ----------------------------------------------------------------------------- one image

class _Counting:
    """Wraps a runner to advance a progress bar by one per call (one call = one tile)."""

    def __init__(self, runner: Runner, bar):
        self.runner, self.bar, self.scale = runner, bar, runner.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runner(x)
        self.bar.update(1)
        return y


def _tiles_per_pass(h: int, w: int, tile: Optional[int], overlap: int) -> int:
    """Forward calls ``tiled_forward`` makes for an h x w input (1 for the whole image)."""
    if tile is None:
        return 1
    from .infer import tile_starts
    t = min(tile, h, w)
    ov = overlap if t > overlap else t // 2
    return len(tile_starts(h, t, ov)) * len(tile_starts(w, t, ov))


class Upscaler:
    """Upscales float image arrays with one network; see the module docstring.

    ``tile``: ``"auto"`` (from free memory), ``None``/``0`` (always the whole image) or an
    int (LR pixels); ``tile_overlap`` and ``blend`` (``"feather"`` or ``"mean"``) are passed
    to ``tiled_forward``; ``memory_budget`` (bytes) replaces half the free memory for
    ``"auto"``. The model is used as given (put it in eval mode on ``device``).
    """

    def __init__(self, runner: Runner, device: Union[str, torch.device, None] = None,
                 tile: Union[str, int, None] = "auto", tile_overlap: int = DEFAULT_OVERLAP,
                 blend: str = DEFAULT_BLEND, self_ensemble: bool = False,
                 memory_budget: Optional[int] = None):
        if not isinstance(getattr(runner, "scale", None), int):
            raise ValueError("the model has no integer 'scale' attribute")
        if tile not in ("auto", None) and (not isinstance(tile, int) or tile < 0):
            raise ValueError(f"tile must be 'auto', 0/None (whole image) or a positive int, got {tile!r}")
        if isinstance(tile, int) and tile and tile <= 2 * tile_overlap:
            raise ValueError(f"tile {tile} must be larger than twice the overlap {tile_overlap}")
        if tile_overlap < 0:
            raise ValueError(f"tile overlap must be >= 0, got {tile_overlap}")
        if blend not in ("mean", "feather"):
            raise ValueError(f"blend must be 'mean' or 'feather', got {blend!r}")
        self.runner = runner
        if device is None:
            param = next(iter(runner.parameters()), None) if isinstance(runner, torch.nn.Module) else None
            device = param.device if param is not None else "cpu"
        self.device = torch.device(device)
        self.tile = tile or None
        self.overlap = tile_overlap
        self.blend = blend
        self.self_ensemble = bool(self_ensemble)
        self.memory_budget = memory_budget
        self.last_tile: Optional[int] = None  # what the last image used (None: whole image)

    @property
    def scale(self) -> int:
        return self.runner.scale

    # -- planning
    def plan(self, height: int, width: int) -> Tuple[Optional[int], List[Tuple[int, int]], int]:
        """(tile or None, LR row bands [(r0, r1)], halo rows around each band)."""
        tile = self.tile
        if tile == "auto":
            tile = choose_tile(self.runner, height, width, self.device, self.overlap, self.memory_budget)
        if tile is None or (height <= tile and width <= tile):
            return None, [(0, height)], 0
        s = self.scale
        halo = max(self.overlap, 4)
        # bytes of float output per LR row: the result, the blend accumulators, the ensemble sum
        row_bytes = 3 * 4 * s * s * width * 3
        rows = max(tile, int(BAND_BYTES // row_bytes))
        n = max(1, height // rows)  # equal bands, each at least `rows` (>= tile) high
        edges = [round(k * height / n) for k in range(n + 1)]
        return tile, list(zip(edges[:-1], edges[1:])), halo

    # -- inference
    def _forward_fn(self, tile: Optional[int], bar=None):
        runner = self.runner if bar is None else _Counting(self.runner, bar)
        if tile is None and not self.self_ensemble:
            return runner
        from .infer import make_forward
        return make_forward(runner, self.scale, tile=tile, overlap=self.overlap, blend=self.blend,
                            ensemble=self.self_ensemble)

    def upscale_array(self, image: np.ndarray, out_dtype=np.float32, bar=None) -> np.ndarray:
        """H x W x C array (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; float in [0, 1], or uint8 /
        uint16, converted band by band) -> H*s x W*s x C array of ``out_dtype`` (uint8, uint16,
        or float32 clipped to [0, 1]).

        ``bar``: a tqdm-like progress bar, reset to the number of tiles and advanced by them.
        """
        if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
            raise ValueError(f"expected an H x W x C image with C in 1..4, got shape {image.shape}")
        h, w, c = image.shape
        s = self.scale
        has_alpha = c in (2, 4)
        cc = c - int(has_alpha)
        tile, bands, halo = self.plan(h, w)
        self.last_tile = tile
        forward = self._forward_fn(tile, bar)
        if bar is not None:
            passes = 8 if self.self_ensemble else 1
            bar.reset(total=passes * sum(_tiles_per_pass(min(h, r1 + halo) - max(0, r0 - halo), w, tile,
                                                         self.overlap) for r0, r1 in bands))
        out = np.empty((h * s, w * s, c), dtype=out_dtype)
        for r0, r1 in bands:
            a, b = max(0, r0 - halo), min(h, r1 + halo)
            band = torch.from_numpy(np.ascontiguousarray(imgio.to_float(image[a:b]))).to(self.device)
            band = band.permute(2, 0, 1).unsqueeze(0)
            x = band[:, :cc]
            if cc == 1:
                x = x.expand(-1, 3, -1, -1)
            with torch.inference_mode():
                y = forward(x)
                y = y[:, :, (r0 - a) * s:(r1 - a) * s]
                if cc == 1:
                    y = y.mean(1, keepdim=True)
                out[r0 * s:r1 * s, :, :cc] = imgio.from_float(y[0].permute(1, 2, 0), out_dtype, inplace=True)
                del y
                if has_alpha:
                    al = F.interpolate(band[:, cc:], scale_factor=s, mode="bicubic", align_corners=False)
                    al = al[:, :, (r0 - a) * s:(r1 - a) * s]
                    out[r0 * s:r1 * s, :, cc:] = imgio.from_float(al[0].permute(1, 2, 0), out_dtype, inplace=True)
        return out

    # -- files
    def upscale_file(self, src: Union[str, os.PathLike], dst: Union[str, os.PathLike], *,
                     format: Optional[str] = None, quality: int = 95,
                     max_pixels: Optional[int] = imgio.DEFAULT_MAX_PIXELS, bar=None) -> imgio.ImageInfo:
        """Read ``src``, upscale, write ``dst`` atomically in the input's bit depth, with its
        ICC profile and EXIF (orientation applied). Returns the input's info."""
        fmt = imgio.FORMATS[format.lower()][0] if format else imgio.format_for_path(dst)
        image, info = imgio.read_image_native(src, max_pixels)  # uint8/16: a quarter/half of float32
        if fmt == "JPEG" and info.has_alpha:
            raise ImageWriteError(f"{src}: has an alpha channel, which JPEG cannot store; "
                                  "use --format png, webp or tiff")
        out = self.upscale_array(image, info.dtype, bar)
        del image
        imgio.write_image(dst, out, format=fmt, quality=quality, icc_profile=info.icc_profile,
                          exif=info.exif)
        return info


# ----------------------------------------------------------------------------- batches

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
