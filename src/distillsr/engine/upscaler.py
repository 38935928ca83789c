"""One image through the network: :class:`Upscaler` upscales a float image array (greyscale is
run as RGB and averaged back, big images go through in overlapping tiles, one row of tiles at a
time, optional x8 self-ensemble) and one file (:meth:`Upscaler.upscale_file`).

Alpha: the alpha channel is upscaled apart with bicubic; the colour is run through the network
premultiplied by alpha and divided by the upscaled alpha afterwards, so that the colour stored
under fully transparent pixels (often noise or black) does not bleed into visible edges as a
fringe. Opaque pixels are unchanged by this: an image whose alpha is 1 everywhere gives the
same colour as the image without its alpha channel."""
from __future__ import annotations

import os
from typing import Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import io as imgio
from ..io import ImageWriteError
from .backends import Runner
from .infer import BLENDS, check_tiles, iter_tile_rows, self_ensemble, tile_count, tile_layout
from .tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, choose_tile

__all__ = ["Upscaler"]

ALPHA_BAND_BYTES = 64 << 20  # float output of one band of the alpha channel's bicubic resize
ALPHA_HALO = 2                # LR rows a bicubic output row reaches beyond its own (4 taps)
# bicubic weights sum to 1 only within float32 rounding (x3 gives 0.9999994 on a constant 1):
# upscaled alpha this close to 1 is opaque, so opaque colour is divided by exactly 1
OPAQUE_EPS = 1e-5


class _Counting:
    """Wraps a runner to advance a progress bar by one per call (one call = one tile)."""

    def __init__(self, runner: Runner, bar):
        self.runner, self.bar, self.scale = runner, bar, runner.scale

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        y = self.runner(x)
        self.bar.update(1)
        return y


class Upscaler:
    """Upscales float image arrays with one network; see the module docstring.

    ``tile``: ``"auto"`` (from free memory), ``None``/``0`` (always the whole image) or an
    int (LR pixels); tiles are clamped to each side of the image on its own (a 20 x 192 strip
    at tile 64 runs as 20 x 64 tiles), and are run one row of tiles at a time
    (``engine.infer.iter_tile_rows``) so that only that row's blend buffers are held.
    ``tile_overlap`` and ``blend`` (``"feather"`` or ``"mean"``) are those of
    ``tiled_forward``; ``memory_budget`` (bytes) replaces half the free memory for ``"auto"``.
    With ``self_ensemble`` each tile (or the whole image) is the mean of the 8 flips and
    rotations. The model is used as given (put it in eval mode on ``device``).
    """

    def __init__(self, runner: Runner, device: Union[str, torch.device, None] = None,
                 tile: Union[str, int, None] = "auto", tile_overlap: int = DEFAULT_OVERLAP,
                 blend: str = DEFAULT_BLEND, self_ensemble: bool = False,
                 memory_budget: Optional[int] = None):
        if not isinstance(getattr(runner, "scale", None), int):
            raise ValueError("the model has no integer 'scale' attribute")
        if tile not in ("auto", None) and (not isinstance(tile, int) or tile < 0):
            raise ValueError(f"tile must be 'auto', 0/None (whole image) or a positive int, got {tile!r}")
        check_tiles(tile if isinstance(tile, int) and tile else 2 * tile_overlap + 1, tile_overlap,
                    overlaps_per_tile=2)
        if blend not in BLENDS:
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
    def plan(self, height: int, width: int) -> Optional[Tuple[int, int]]:
        """The tile ``(tile_h, tile_w)`` in LR pixels for an image, or None for the whole image:
        the tile (given, or chosen from free memory for ``"auto"``) clamped to each side."""
        tile = self.tile
        if tile == "auto":
            tile = choose_tile(self.runner, height, width, self.device, self.overlap, self.memory_budget)
        if tile is None or (height <= tile and width <= tile):
            return None
        return tile_layout(height, width, tile, self.overlap, rect=True)[0]

    def tile_count(self, height: int, width: int) -> int:
        """Network calls for an image (8 per tile with self-ensemble)."""
        size = self.plan(height, width)
        n = 1 if size is None else tile_count(height, width, max(size), self.overlap, rect=True)
        return n * (8 if self.self_ensemble else 1)

    # -- inference
    def _tile_fn(self, bar=None):
        runner = self.runner if bar is None else _Counting(self.runner, bar)
        if not self.self_ensemble:
            return runner
        return lambda x: self_ensemble(runner, x)

    def _colour_rows(self, image: np.ndarray, cc: int):
        """``rows(a, b)``: the colour channels of image rows a:b as a 1 x 3 x (b-a) x W float
        tensor on the device (grey repeated as RGB), premultiplied by alpha when the image has
        it, converted only when asked for."""
        def rows(a: int, b: int) -> torch.Tensor:
            band = np.ascontiguousarray(imgio.to_float(image[a:b, :, :cc]))
            x = torch.from_numpy(band).to(self.device).permute(2, 0, 1).unsqueeze(0)
            if image.shape[2] > cc:
                alpha = np.ascontiguousarray(imgio.to_float(image[a:b, :, cc]))
                x = x * torch.from_numpy(alpha).to(self.device)
            return x.expand(-1, 3, -1, -1) if cc == 1 else x
        return rows

    @staticmethod
    def _unpremultiply(y: torch.Tensor, alpha: torch.Tensor) -> torch.Tensor:
        """Colour premultiplied by alpha -> straight colour: ``y / alpha`` where the upscaled
        alpha (clipped to [0, 1]) is above 0, 0 under fully transparent pixels; alpha within
        ``OPAQUE_EPS`` of 1 counts as 1."""
        a = alpha.clamp(0, 1)
        a = torch.where(a > 1 - OPAQUE_EPS, torch.ones_like(a), a)
        visible = a > 0
        return torch.where(visible, y / torch.where(visible, a, torch.ones_like(a)), torch.zeros_like(y))

    def upscale_array(self, image: np.ndarray, out_dtype=np.float32, bar=None) -> np.ndarray:
        """H x W x C array (C = 1 grey, 2 grey+alpha, 3 RGB, 4 RGBA; float in [0, 1], or uint8 /
        uint16, converted tile row by tile row) -> H*s x W*s x C array of ``out_dtype`` (uint8,
        uint16, or float32 clipped to [0, 1]).

        ``bar``: a tqdm-like progress bar, reset to the number of tiles and advanced by them.
        """
        if image.ndim != 3 or image.shape[2] not in (1, 2, 3, 4):
            raise ValueError(f"expected an H x W x C image with C in 1..4, got shape {image.shape}")
        h, w, c = image.shape
        s = self.scale
        cc = c - int(c in (2, 4))
        size = self.plan(h, w)
        self.last_tile = None if size is None else max(size)
        if bar is not None:
            bar.reset(total=self.tile_count(h, w))
        out = np.empty((h * s, w * s, c), dtype=out_dtype)
        rows = self._colour_rows(image, cc)
        tile_fn = self._tile_fn(bar)
        with torch.inference_mode():
            if size is None:
                parts = [(0, h, tile_fn(rows(0, h)))]
            else:
                ov = tile_layout(h, w, max(size), self.overlap, rect=True)[1]
                parts = iter_tile_rows(tile_fn, rows, h, w, s, size, ov, self.blend)
            for r0, r1, y in parts:
                if cc == 1:
                    y = y.mean(1, keepdim=True)
                if c > cc:
                    y = self._unpremultiply(y, self._alpha_rows(image[:, :, cc:], r0, r1))
                out[r0 * s:r1 * s, :, :cc] = imgio.from_float(y[0].permute(1, 2, 0), out_dtype, inplace=True)
                del y
            if c > cc:
                self._upscale_alpha(image[:, :, cc:], out[:, :, cc:])
        return out

    def _upscale_alpha(self, alpha: np.ndarray, out: np.ndarray) -> None:
        """Bicubic x``scale`` of the alpha channel into ``out``, in bands of rows, each with
        ``ALPHA_HALO`` rows of context on either side (what bicubic reads), so the result is
        the whole-image resize."""
        h, w = alpha.shape[:2]
        s = self.scale
        step = max(1, ALPHA_BAND_BYTES // (4 * s * s * w))
        for r0 in range(0, h, step):
            r1 = min(h, r0 + step)
            y = self._alpha_rows(alpha, r0, r1)
            out[r0 * s:r1 * s] = imgio.from_float(y[0].permute(1, 2, 0), out.dtype, inplace=True)

    def _alpha_rows(self, alpha: np.ndarray, r0: int, r1: int) -> torch.Tensor:
        """The bicubic x``scale`` of alpha rows r0:r1 (LR) as a 1 x 1 x (r1-r0)*s x W*s float
        tensor on the device, read with ``ALPHA_HALO`` rows of context on either side: equal to
        those rows of the whole-image resize."""
        h, s = alpha.shape[0], self.scale
        a, b = max(0, r0 - ALPHA_HALO), min(h, r1 + ALPHA_HALO)
        band = torch.from_numpy(np.ascontiguousarray(imgio.to_float(alpha[a:b])))
        band = band.to(self.device).permute(2, 0, 1).unsqueeze(0)
        y = F.interpolate(band, scale_factor=s, mode="bicubic", align_corners=False)
        return y[:, :, (r0 - a) * s:(r1 - a) * s]

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
