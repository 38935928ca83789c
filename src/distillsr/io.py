"""Reading and writing images as users have them.

``read_image(path)`` returns ``(array, info)``: a float32 ``H x W x C`` array in [0, 1]
(C = 1 grey, 2 grey + alpha, 3 RGB, 4 RGBA) with the EXIF orientation applied, and an
:class:`ImageInfo` with what is needed to write the result back the same way (bit depth,
alpha, ICC profile, EXIF). ``write_image(path, array, ...)`` writes PNG, JPEG, WebP or TIFF
atomically: into a temporary file beside the target, renamed over it only when complete.

What is supported:

* 8-bit: every mode Pillow reads. Palette images become RGB, or RGBA when the palette has
  transparency; 1-bit images become 8-bit grey; CMYK / YCbCr / LAB become RGB (their ICC
  profile is then dropped, as it describes the old colour space).
* 16-bit greyscale PNG and TIFF (Pillow mode ``I;16``) stay 16-bit.
* 16-bit RGB, RGBA and grey + alpha PNG and TIFF stay 16-bit. Pillow cannot hold these (it
  reduces them to 8 bits), so they are read with ``pypng`` (PNG) and ``tifffile`` (TIFF),
  the ``images16`` extra (``pip install "distillsr[images16]"``); without it such a file
  gives an error naming the extra rather than a silently reduced image. 16-bit PNGs are
  written by a small PNG encoder here, 16-bit colour TIFFs by ``tifffile``.
* JPEG and WebP hold 8 bits only: 16-bit data are rounded to 8 bits when written to them.
  JPEG cannot hold alpha: writing an image with alpha to JPEG is an error.
* EXIF (other than the orientation, which is applied) is carried from JPEG, PNG and WebP
  into JPEG, PNG and WebP outputs; not from or into TIFF.
* Multi-frame files (GIF, APNG, multi-page TIFF): the first frame only.
"""
from __future__ import annotations

import errno
import hashlib
import os
import re
import struct
import tempfile
import time
import warnings
import zlib
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple, Union

import numpy as np
from PIL import Image

__all__ = ["ImageInfo", "ImageReadError", "ImageTooLargeError", "ImageWriteError", "read_image", "read_image_native", "write_image",
           "pil_to_array", "array_to_pil", "to_float", "from_float", "FORMATS",
           "INPUT_EXTENSIONS", "VIDEO_EXTENSIONS", "DEFAULT_MAX_PIXELS", "format_for_path", "atomic_write",
           "FileWriteError", "remove_stale_temp_files", "file_lock", "try_file_lock", "sniff_format",
           "check_pixels"]

PathLike = Union[str, os.PathLike]

# output format name -> (Pillow format, file extension)
FORMATS = {"png": ("PNG", ".png"), "jpg": ("JPEG", ".jpg"), "jpeg": ("JPEG", ".jpg"),
           "webp": ("WEBP", ".webp"), "tiff": ("TIFF", ".tif"), "tif": ("TIFF", ".tif")}
# every image file name ending that is read as an input (upscale, eval, degrade, training data)
INPUT_EXTENSIONS = frozenset({".png", ".jpg", ".jpeg", ".webp", ".tif", ".tiff", ".bmp", ".ppm", ".pgm"})
# every video file name ending that upscale reads (engine.video), with the FFmpeg muxer its
# output is written with (the output keeps the input's container)
VIDEO_EXTENSIONS = {".mp4": "mp4", ".m4v": "mp4", ".mov": "mov", ".mkv": "matroska", ".webm": "webm",
                    ".avi": "avi", ".ts": "mpegts", ".mts": "mpegts"}
# inputs above this many pixels are refused unless the caller raises the limit (0 = no limit)
DEFAULT_MAX_PIXELS = 50_000_000

_ORIENTATION_TAG = 0x0112
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_MODES_DROPPING_ICC = {"CMYK", "LAB", "YCbCr", "HSV"}


class ImageReadError(ValueError):
    """An input that cannot be read (names the file and the problem)."""


class ImageTooLargeError(ImageReadError):
    """An input with more pixels than the limit (found from its header, before decoding)."""


class ImageWriteError(ValueError):
    """An image that cannot be written in the requested format."""


@dataclass
class ImageInfo:
    """How an image was stored: enough to write a result back the same way."""
    width: int
    height: int
    channels: int                  # 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA
    bit_depth: int = 8             # 8 or 16
    source_mode: str = ""          # Pillow mode (or e.g. "RGB;16") of the file
    format: Optional[str] = None   # Pillow format name of the file, e.g. "PNG"
    icc_profile: Optional[bytes] = None
    exif: Optional[bytes] = None   # without the orientation tag (already applied)
    orientation: int = 1           # the EXIF orientation that was applied

    @property
    def has_alpha(self) -> bool:
        return self.channels in (2, 4)

    @property
    def colour_channels(self) -> int:
        return self.channels - int(self.has_alpha)

    @property
    def dtype(self):
        return np.uint16 if self.bit_depth == 16 else np.uint8


# ----------------------------------------------------------------------------- conversions

def to_float(arr: np.ndarray) -> np.ndarray:
    """uint8 / uint16 array -> float32 in [0, 1]; float arrays are returned as float32."""
    if arr.dtype in (np.uint8, np.uint16):
        out = arr.astype(np.float32)
        out /= np.float32(255 if arr.dtype == np.uint8 else 65535)
        return out
    if np.issubdtype(arr.dtype, np.floating):
        return arr.astype(np.float32, copy=False)
    raise TypeError(f"unsupported array dtype {arr.dtype} (use uint8, uint16 or float)")


def from_float(arr, dtype, inplace: bool = False) -> np.ndarray:
    """Float array (numpy or torch) in about [0, 1] -> ``dtype`` array: clipped, and for uint8 /
    uint16 quantised by :func:`distillsr.metrics.quantise` (x peak, round half up).

    ``inplace`` lets a torch tensor be overwritten on the way (saves two copies of it).
    """
    dtype = np.dtype(dtype)
    if not np.issubdtype(dtype, np.floating):
        from .metrics import quantise
        return quantise(arr, dtype, inplace=inplace)
    if hasattr(arr, "detach"):  # a torch tensor: clip on its device
        t = arr.detach() if inplace else arr.detach().clone()
        return t.clamp_(0, 1).to("cpu").numpy().astype(dtype, copy=False)
    return np.clip(np.asarray(arr, dtype=dtype), 0, 1)


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """Rotate / flip an H x W x C array as EXIF orientation ``orientation`` says (1..8)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.transpose(1, 0, 2)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr.transpose(1, 0, 2)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _exif_without_orientation(im: Image.Image) -> Tuple[Optional[bytes], int]:
    try:
        exif = im.getexif()
    except Exception:  # malformed EXIF must not make the image unreadable
        return None, 1
    orientation = exif.get(_ORIENTATION_TAG, 1)
    if not isinstance(orientation, int) or not 1 <= orientation <= 8:
        orientation = 1
    if _ORIENTATION_TAG in exif:
        del exif[_ORIENTATION_TAG]
    try:
        data = exif.tobytes() if len(exif) else None
    except Exception:
        data = None
    return data, orientation


def pil_to_array(im: Image.Image) -> Tuple[np.ndarray, ImageInfo]:
    """A Pillow image -> (uint8 or uint16 H x W x C array, info); orientation not applied."""
    mode = im.mode
    icc = im.info.get("icc_profile") or None
    if mode == "1":
        im = im.convert("L")
    elif mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "La":
        im = im.convert("LA")
    elif mode == "RGBX":
        im = im.convert("RGB")
    elif mode == "RGBa":
        im = im.convert("RGBA")
    elif mode in _MODES_DROPPING_ICC:
        im = im.convert("RGB")
        icc = None
    if im.mode in ("L", "LA", "RGB", "RGBA"):
        arr = np.asarray(im, dtype=np.uint8)
        depth = 8
    elif im.mode.startswith("I;16"):
        arr = np.asarray(im).astype(np.uint16)
        depth = 16
    elif im.mode == "I":
        arr = np.asarray(im)
        if arr.size and (arr.min() < 0 or arr.max() > 65535):
            raise ImageReadError(f"32-bit integer image with values outside 0..65535 (mode {mode}) "
                                 "is not supported")
        arr = arr.astype(np.uint16)
        depth = 16
    else:
        raise ImageReadError(f"unsupported image mode {mode!r}")
    if arr.ndim == 2:
        arr = arr[:, :, None]
    h, w, c = arr.shape
    return arr, ImageInfo(w, h, c, depth, mode, im.format, icc)


def array_to_pil(arr: np.ndarray) -> Image.Image:
    """uint8 H x W x C (C = 1..4) or uint16 H x W x 1 array -> Pillow image."""
    c = arr.shape[2]
    if arr.dtype == np.uint16:
        if c != 1:
            raise ImageWriteError("Pillow cannot hold 16-bit images with more than one channel")
        return Image.fromarray(np.ascontiguousarray(arr[:, :, 0]), mode=None)
    if arr.dtype != np.uint8:
        raise ImageWriteError(f"cannot make an image from a {arr.dtype} array")
    return Image.fromarray(np.ascontiguousarray(arr[:, :, 0] if c == 1 else arr))


# ----------------------------------------------------------------------------- reading

def _png_header(path: Path) -> Optional[Tuple[int, int]]:
    """(bit depth, colour type) from a PNG's IHDR, or None when not a PNG."""
    with open(path, "rb") as f:
        head = f.read(33)
    if len(head) < 26 or head[:8] != _PNG_SIGNATURE or head[12:16] != b"IHDR":
        return None
    return head[24], head[25]


def sniff_format(head: bytes) -> Optional[str]:
    """The Pillow format name of an input from its first bytes (at least 12), whatever its name
    says: PNG, JPEG, WEBP, TIFF, BMP or PPM (PPM / PGM); None for anything else."""
    if head.startswith(_PNG_SIGNATURE):
        return "PNG"
    if head.startswith(b"\xff\xd8\xff"):
        return "JPEG"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "WEBP"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "TIFF"
    if head[:2] == b"BM":
        return "BMP"
    if len(head) > 2 and head[:1] == b"P" and head[1:2] in b"123456" and head[2:3].isspace():
        return "PPM"
    return None


def _is_tiff(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(12)
    return sniff_format(head) == "TIFF"


def _needs_optional(module: str, what: str, path: Path):
    try:
        return __import__(module)
    except ModuleNotFoundError:
        raise ImageReadError(f"{path}: {what} needs the '{module}' package, which is not installed "
                             "(pip install \"distillsr[images16]\")") from None


def check_pixels(path, w: int, h: int, max_pixels: Optional[int]) -> None:
    """Raise :class:`ImageTooLargeError` (naming ``path``) when a ``w`` x ``h`` image has more
    than ``max_pixels`` pixels (None or 0: no limit)."""
    if max_pixels and w * h > max_pixels:
        raise ImageTooLargeError(f"{path}: {w}x{h} = {w * h:,} pixels is more than the limit of "
                             f"{max_pixels:,} (a decompression bomb?); raise the limit "
                             "(--max-pixels / max_pixels=) if you trust this file")


def _read_png16(path: Path, im: Image.Image) -> Tuple[np.ndarray, ImageInfo]:
    png = _needs_optional("png", "a 16-bit colour or grey+alpha PNG", path)
    try:
        w, h, rows, meta = png.Reader(filename=str(path)).asDirect()
        planes = meta["planes"]
        arr = np.empty((h, w, planes), np.uint16)
        for y, row in enumerate(rows):
            arr[y] = np.asarray(row, dtype=np.uint16).reshape(w, planes)
    except Exception as e:  # pypng's own errors, zlib errors, short reads
        raise ImageReadError(f"{path}: truncated or corrupt PNG ({type(e).__name__}: {e})") from e
    if meta["bitdepth"] != 16:  # pypng rescales sBIT-reduced data; keep 16-bit semantics
        arr = (arr.astype(np.uint32) * 65535 // ((1 << meta["bitdepth"]) - 1)).astype(np.uint16)
    mode = {1: "I;16", 2: "LA;16", 3: "RGB;16", 4: "RGBA;16"}[planes]
    return arr, ImageInfo(w, h, planes, 16, mode, "PNG", im.info.get("icc_profile") or None)


def _read_tiff16(path: Path, max_pixels: Optional[int]) -> Tuple[np.ndarray, ImageInfo, int]:
    tifffile = _needs_optional("tifffile", "a 16-bit colour or grey+alpha TIFF", path)
    try:
        with tifffile.TiffFile(str(path)) as tf:
            page = tf.pages[0]
            check_pixels(path, int(page.imagewidth), int(page.imagelength), max_pixels)  # before decoding
            arr = page.asarray()
            axes = page.axes
            tags = page.tags
            icc = tags["InterColorProfile"].value if "InterColorProfile" in tags else None
            orientation = int(tags["Orientation"].value) if "Orientation" in tags else 1
            photometric = int(page.photometric)
    except ImageReadError:
        raise
    except Exception as e:  # tifffile raises many kinds
        raise ImageReadError(f"{path}: cannot read TIFF ({e})") from e
    if axes.startswith("S"):  # planar configuration "separate"
        arr = np.moveaxis(arr, 0, -1)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4) or photometric not in (1, 2):
        raise ImageReadError(f"{path}: unsupported TIFF layout (axes {axes}, shape {arr.shape}, "
                             f"photometric {photometric})")
    if arr.dtype == np.uint8:
        depth = 8
    elif arr.dtype == np.uint16:
        depth = 16
    else:
        raise ImageReadError(f"{path}: unsupported TIFF sample type {arr.dtype} (8 or 16 bit unsigned only)")
    h, w, c = arr.shape
    mode = {1: "L", 2: "LA", 3: "RGB", 4: "RGBA"}[c] + (";16" if depth == 16 else "")
    return arr, ImageInfo(w, h, c, depth, mode, "TIFF", bytes(icc) if icc else None), orientation


def _tiff_is_deep_colour(im: Image.Image) -> bool:
    """True for a TIFF that Pillow would reduce from 16 to 8 bits."""
    bits = getattr(im, "tag_v2", {}).get(258)
    if bits is None:
        return False
    bits = bits if isinstance(bits, tuple) else (bits,)
    return any(b > 8 for b in bits) and not im.mode.startswith("I")


def read_image(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
               ) -> Tuple[np.ndarray, ImageInfo]:
    """Read an image file -> (float32 H x W x C array in [0, 1], :class:`ImageInfo`).

    The EXIF orientation is applied. ``max_pixels`` (None or 0: no limit) guards against
    decompression bombs. Raises :class:`ImageReadError` naming the file and the problem.
    """
    arr, info = read_image_native(path, max_pixels)
    return to_float(arr), info


def read_image_native(path: PathLike, max_pixels: Optional[int] = DEFAULT_MAX_PIXELS
                      ) -> Tuple[np.ndarray, ImageInfo]:
    """Like :func:`read_image` but the array keeps its stored dtype (uint8 or uint16)."""
    path = Path(path)
    if not path.is_file():
        raise ImageReadError(f"{path}: no such file")
    if path.stat().st_size == 0:
        raise ImageReadError(f"{path}: empty file (0 bytes)")
    saved_limit = Image.MAX_IMAGE_PIXELS
    try:
        Image.MAX_IMAGE_PIXELS = None  # our own limit below, with a clearer message
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            return _read(path, max_pixels)
    finally:
        Image.MAX_IMAGE_PIXELS = saved_limit


def _read(path: Path, max_pixels: Optional[int]) -> Tuple[np.ndarray, ImageInfo]:
    try:
        im = Image.open(path)
    except Exception as e:
        if _is_tiff(path):  # e.g. a 16-bit RGB TIFF layout Pillow does not know
            arr, info, orientation = _read_tiff16(path, max_pixels)
            return _oriented(arr, info, orientation)
        raise ImageReadError(f"{path}: not a readable image ({type(e).__name__}: {e})") from e
    with im:
        check_pixels(path, im.width, im.height, max_pixels)
        png = _png_header(path)
        if png is not None and png[0] == 16 and png[1] in (2, 4, 6):
            arr, info = _read_png16(path, im)
            exif, orientation = _exif_without_orientation(im)
            info.exif = exif
            return _oriented(arr, info, orientation)
        if im.format == "TIFF" and _tiff_is_deep_colour(im):
            arr, info, orientation = _read_tiff16(path, max_pixels)
            return _oriented(arr, info, orientation)
        try:
            im.load()
        except Exception as e:  # truncated data, bad compression stream ...
            raise ImageReadError(f"{path}: truncated or corrupt {im.format or 'image'} file ({e})") from e
        exif, orientation = _exif_without_orientation(im)
        if im.format == "TIFF":  # its "EXIF" is the TIFF's own tags (sizes, strips): not carried
            exif = None
        fmt = im.format
        arr, info = pil_to_array(im)
    info.format, info.exif = fmt, exif
    return _oriented(arr, info, orientation)


def _oriented(arr: np.ndarray, info: ImageInfo, orientation: int) -> Tuple[np.ndarray, ImageInfo]:
    arr = _apply_orientation(arr, orientation)
    h, w = arr.shape[:2]
    return np.ascontiguousarray(arr), replace(info, width=w, height=h, orientation=orientation)


# ----------------------------------------------------------------------------- writing

def format_for_path(path: PathLike) -> str:
    """Pillow format name from a file name's extension (png, jpg/jpeg, webp, tif/tiff)."""
    ext = Path(path).suffix.lower().lstrip(".")
    if ext not in FORMATS:
        raise ImageWriteError(f"{path}: unknown output format {ext!r}; use one of png, jpg, webp, tiff")
    return FORMATS[ext][0]


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


class FileWriteError(OSError):
    """A file that could not be written because of where it goes: a full disk, a read-only
    folder. The message names the file; nothing was replaced and no partial file is left."""

    def __init__(self, path: PathLike, code: int, detail: str = "",
                 outcome: str = "nothing was replaced and no partial file was left"):
        self.path = Path(path)
        why = os.strerror(code).lower()
        msg = f"{path}: cannot write it: {why}" + (f" ({detail})" if detail else "")
        super().__init__(code, f"{msg}; {outcome}")

    def __str__(self) -> str:
        return self.args[1]


# errors of the place a file goes rather than of its contents
_PLACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG)


def place_error(e: BaseException, folder: Path) -> Optional[int]:
    """The errno when ``e`` (from any writer: Pillow, torch, safetensors...) comes from a full
    or read-only file system, else None."""
    if isinstance(e, OSError) and e.errno in _PLACE_ERRNOS:
        return e.errno
    text = str(e)
    if "No space left on device" in text or "os error 28" in text:
        return errno.ENOSPC
    if "Read-only file system" in text or "os error 30" in text:
        return errno.EROFS
    try:  # writers that hide the OS error (torch's zip writer): look at the disk itself
        if os.statvfs(folder).f_bavail == 0:
            return errno.ENOSPC
    except (OSError, AttributeError):
        pass
    return None


# the temp files atomic_write makes: ".<name>.<pid>.<8 random chars>.part" (and, from older
# versions, ".<name>.<8 random chars>.part"); the writer holds an flock on it while writing
_TEMP_RE = re.compile(r"^\.(?P<name>.+?)\.(?:(?P<pid>\d+)\.)?(?P<rand>[a-z0-9_]{8})\.part$")
# a temp file untouched for this long is stale even when its writer's pid is in use (pid reuse)
STALE_TEMP_SECONDS = 3600


def atomic_write(path: PathLike, write_fn) -> Path:
    """Call ``write_fn(tmp_path)`` and rename the result onto ``path`` only if it succeeds.

    The temporary file lives beside ``path`` (same file system, so the rename is atomic) and
    is removed on any error or interruption: no half-written output is ever left behind. Its
    name carries the writer's pid, and the writer holds a lock on it while writing, so that
    a process killed mid-write (SIGKILL, power loss) leaves a file that
    :func:`remove_stale_temp_files` can tell from one still being written. A full or
    read-only file system raises :class:`FileWriteError` naming the file.
    """
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".part", dir=path.parent)
    except OSError as e:
        code = place_error(e, path.parent)
        if code is None:
            raise
        raise FileWriteError(path, code, str(path.parent)) from e
    try:
        _lock_nb(fd)
        try:
            write_fn(tmp)
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it 0600; give it a normal file's mode
            os.replace(tmp, path)
        except BaseException as e:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
            code = place_error(e, path.parent) if isinstance(e, Exception) else None
            if code is not None and not isinstance(e, FileWriteError):
                raise FileWriteError(path, code) from e
            raise
    finally:
        os.close(fd)
    return path


def _lock_nb(fd: int) -> bool:
    """Try to take an exclusive flock on ``fd`` without waiting; True when taken."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - no flock on this platform
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except OSError:
        return False


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError, OSError):
        return True
    return True


def remove_stale_temp_files(folder: PathLike) -> List[Path]:
    """Remove the temp files that :func:`atomic_write` left in ``folder`` when its process was
    killed mid-write; returns those removed.

    Only files of atomic_write's own naming are considered, and only stale ones: no process
    holds the writer's lock on it, and its writer's pid is no running process or it has
    not changed for :data:`STALE_TEMP_SECONDS` (older unlocked names without a pid: only
    the latter). A file another process is writing at this moment is never removed.
    """
    folder = Path(folder)
    removed: List[Path] = []
    try:
        entries = list(os.scandir(folder))
    except OSError:
        return removed
    now = time.time()
    for entry in entries:
        m = _TEMP_RE.match(entry.name)
        if m is None or not entry.is_file(follow_symlinks=False):
            continue
        try:
            fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
        except OSError:
            continue
        try:
            if not _lock_nb(fd):
                continue  # its writer is alive and writing
            st = os.fstat(fd)
            old = now - st.st_mtime > STALE_TEMP_SECONDS
            pid = m.group("pid")
            if not (old or (pid is not None and not _pid_alive(int(pid)))):
                continue
            try:
                if os.stat(entry.path, follow_symlinks=False).st_ino == st.st_ino:
                    os.unlink(entry.path)
                    removed.append(Path(entry.path))
            except OSError:
                pass
        finally:
            os.close(fd)
    return removed


def file_hash(path: PathLike, algo: str = "sha256", chunk: int = 1 << 20) -> str:
    """Hex digest of a file's bytes (``hashlib`` algorithm name), read in chunks."""
    h = hashlib.new(algo)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def sha256_file(path: PathLike) -> str:
    return file_hash(path, "sha256")


def atomic_write_text(path: PathLike, text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` through :func:`atomic_write`."""
    return atomic_write(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))


@contextmanager
def file_lock(path: PathLike) -> Iterator[None]:
    """Hold an exclusive lock between processes on ``path`` for the block: a folder, or a
    lock file (created if missing, and left in place: removing it would race)."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    try:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no flock on this platform
            yield
            return
        fcntl.flock(fd, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


class HeldLock:
    """An exclusive lock taken by :func:`try_file_lock`; :meth:`release` gives it back (so does
    the end of the process, however it ends)."""

    def __init__(self, fd: int, path: Path):
        self._fd, self.path = fd, path

    def release(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor drops the flock
            self._fd = None

    def __del__(self):
        self.release()


def try_file_lock(path: PathLike) -> Optional[HeldLock]:
    """Take the lock of :func:`file_lock` on ``path`` (a folder or a lock file) without
    waiting: a :class:`HeldLock`, or None when another process holds it."""
    path = Path(path)
    if not path.is_dir():
        path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_RDONLY) if path.is_dir() else os.open(path, os.O_RDWR | os.O_CREAT, 0o666)
    if _lock_nb(fd):
        return HeldLock(fd, path)
    os.close(fd)
    return None


def write_image(path: PathLike, image: np.ndarray, *, bit_depth: Optional[int] = None,
                format: Optional[str] = None, quality: int = 95, icc_profile: Optional[bytes] = None,
                exif: Optional[bytes] = None) -> Path:
    """Write an H x W x C array (C = 1..4; 2 and 4 carry alpha) atomically.

    ``image`` is uint8, uint16, or float in [0, 1] (then ``bit_depth`` 8 or 16 chooses the
    stored depth; default 8). ``format`` is a Pillow format name or png/jpg/webp/tiff; by
    default it comes from the extension. ``quality`` (1-100) is used by JPEG and WebP
    (WebP at 100 is lossless).
    """
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 2, 3, 4):
        raise ImageWriteError(f"{path}: expected an H x W x C array with C in 1..4, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating):
        arr = from_float(arr, np.uint16 if bit_depth == 16 else np.uint8)
    elif arr.dtype not in (np.uint8, np.uint16):
        raise ImageWriteError(f"{path}: unsupported array dtype {arr.dtype}")
    elif bit_depth == 8 and arr.dtype == np.uint16:
        arr = _to8(arr)
    elif bit_depth == 16 and arr.dtype == np.uint8:
        arr = arr.astype(np.uint16) * 257
    fmt = FORMATS[format.lower()][0] if format and format.lower() in FORMATS else (
        format.upper() if format else format_for_path(path))
    if fmt not in ("PNG", "JPEG", "WEBP", "TIFF"):
        raise ImageWriteError(f"{path}: unsupported output format {fmt!r}")
    if fmt == "JPEG" and arr.shape[2] in (2, 4):
        raise ImageWriteError(f"{path}: JPEG cannot store an alpha channel; write PNG, WebP or TIFF")
    if not 1 <= int(quality) <= 100:
        raise ImageWriteError(f"quality must be in 1..100, got {quality}")
    return atomic_write(path, lambda tmp: _encode(tmp, arr, fmt, int(quality), icc_profile, exif))


def _to8(arr: np.ndarray) -> np.ndarray:
    return ((arr.astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)


def _encode(tmp: str, arr: np.ndarray, fmt: str, quality: int, icc: Optional[bytes],
            exif: Optional[bytes]) -> None:
    extra = {}
    if icc:
        extra["icc_profile"] = icc
    if exif and fmt != "TIFF":  # EXIF tags would mix with the TIFF's own tags
        extra["exif"] = exif
    c = arr.shape[2]
    if arr.dtype == np.uint16 and fmt in ("JPEG", "WEBP"):
        arr = _to8(arr)  # these formats hold 8 bits only
    if arr.dtype == np.uint16 and c > 1:
        if fmt == "PNG":
            return _write_png16(tmp, arr, icc, exif)
        return _write_tiff16(tmp, arr, icc)
    im = array_to_pil(arr)
    if fmt == "JPEG":
        im.save(tmp, "JPEG", quality=quality, subsampling=0 if quality >= 90 else 2, **extra)
    elif fmt == "WEBP":
        if im.mode in ("L", "LA"):
            im = im.convert("RGBA" if im.mode == "LA" else "RGB")
        im.save(tmp, "WEBP", quality=quality, lossless=quality >= 100, exact=quality >= 100, **extra)
    elif fmt == "TIFF":
        im.save(tmp, "TIFF", compression="tiff_adobe_deflate", **extra)
    else:
        im.save(tmp, "PNG", **extra)


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)


def _write_png16(tmp: str, arr: np.ndarray, icc: Optional[bytes], exif: Optional[bytes]) -> None:
    """A 16-bit PNG (grey+alpha, RGB or RGBA), rows "Up"-filtered, streamed in slices."""
    h, w, c = arr.shape
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[c]
    with open(tmp, "wb") as f:
        f.write(_PNG_SIGNATURE)
        f.write(_png_chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 16, colour_type, 0, 0, 0)))
        if icc:
            f.write(_png_chunk(b"iCCP", b"ICC profile\x00\x00" + zlib.compress(icc)))
        if exif:
            f.write(_png_chunk(b"eXIf", exif[6:] if exif.startswith(b"Exif\x00\x00") else exif))
        comp = zlib.compressobj(6)
        prev = np.zeros(w * c * 2, np.uint8)
        step = max(1, (1 << 22) // (w * c * 2))  # about 4 MB of rows at a time
        for y0 in range(0, h, step):
            rows = np.ascontiguousarray(arr[y0:y0 + step], dtype=">u2").view(np.uint8).reshape(-1, w * c * 2)
            up = np.empty((rows.shape[0], rows.shape[1] + 1), np.uint8)
            up[:, 0] = 2  # filter type "Up": byte minus the byte above, modulo 256
            up[0, 1:] = rows[0] - prev
            up[1:, 1:] = rows[1:] - rows[:-1]
            prev = rows[-1].copy()
            data = comp.compress(up.tobytes())
            if data:
                f.write(_png_chunk(b"IDAT", data))
        f.write(_png_chunk(b"IDAT", comp.flush()))
        f.write(_png_chunk(b"IEND", b""))


def _write_tiff16(tmp: str, arr: np.ndarray, icc: Optional[bytes]) -> None:
    try:
        import tifffile
    except ModuleNotFoundError:
        raise ImageWriteError("writing a 16-bit colour TIFF needs the 'tifffile' package "
                              "(pip install \"distillsr[images16]\")") from None
    c = arr.shape[2]
    kwargs = {"photometric": "minisblack" if c <= 2 else "rgb", "compression": "zlib"}
    if c in (2, 4):
        kwargs["extrasamples"] = ["unassalpha"]
    if icc:
        kwargs["iccprofile"] = icc
    tifffile.imwrite(tmp, np.ascontiguousarray(arr), **kwargs)
