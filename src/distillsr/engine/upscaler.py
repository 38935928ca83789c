"""One image through the network: :class:`Upscaler` upscales a float image array (greyscale is
run as RGB and averaged back, alpha is upscaled apart with bicubic and re-attached, big
images go through in horizontal bands of overlapping tiles, optional x8 self-ensemble) and
one file (:meth:`Upscaler.upscale_file`)."""
from __future__ import annotations

import os
from typing import List, Optional, Tuple, Union

import numpy as np
import torch
import torch.nn.functional as F

from .. import io as imgio
from ..io import ImageWriteError
from .backends import Runner
from .tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, choose_tile

__all__ = ["Upscaler", "BAND_BYTES"]

BAND_BYTES = 256 << 20       # float output of one band of tiles (bounds the blend buffers)


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
