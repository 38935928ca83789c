"""Inference strategies: whole image, tiles (the ASID release's test), x8 self-ensemble,
EDSR-style chop. Each takes a model (any callable NCHW [0, 1] -> NCHW) and runs
under ``torch.inference_mode``.
"""
from __future__ import annotations

from typing import Callable, Iterator, List, Optional, Tuple

import torch

__all__ = ["tile_starts", "tile_layout", "tile_count", "iter_tile_rows", "tiled_forward", "self_ensemble",
           "make_forward", "BLENDS"]

BLENDS = ("mean", "feather")
Forward = Callable[[torch.Tensor], torch.Tensor]


def check_tiles(tile: int, overlap: int, *, overlaps_per_tile: int = 1) -> None:
    """The one check of tile settings: ``tile >= 1``, ``overlap >= 0`` and ``tile`` larger than
    ``overlaps_per_tile`` overlaps (2 where both sides of a tile are blended); ValueError otherwise."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile {tile}, overlap {overlap}")
    if tile <= overlaps_per_tile * overlap:
        what = "the overlap" if overlaps_per_tile == 1 else f"{overlaps_per_tile} times the overlap"
        raise ValueError(f"tile {tile} must be larger than {what} {overlap}")


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets along one axis: ``0, stride, 2*stride, ...`` below ``length - tile``,
    then ``length - tile`` (the last tile flush with the border); stride = tile - overlap."""
    if length <= tile:
        check_tiles(tile, 0)
        return [0]
    check_tiles(tile, overlap)
    stride = tile - overlap
    return list(range(0, length - tile, stride)) + [length - tile]


def _ramp(n_out: int, ramp: int, left: bool, right: bool, device, dtype) -> torch.Tensor:
    """1-D weights of one tile: linear ramps (k+1)/(ramp+1) on sides shared with a neighbour."""
    w = torch.ones(n_out, device=device, dtype=dtype)
    r = min(ramp, n_out // 2)
    if r > 0:
        up = torch.arange(1, r + 1, device=device, dtype=dtype) / (r + 1)
        if left:
            w[:r] = up
        if right:
            w[n_out - r:] = up.flip(0)
    return w


def _axis_overlap(tile: int, overlap: int) -> int:
    """The overlap used along an axis whose tiles are ``tile`` long: cut to half a tile when
    the tile is not longer than the overlap."""
    return overlap if tile > overlap else tile // 2


def tile_layout(height: int, width: int, tile: int, overlap: int, rect: bool = False
                ) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """``((tile_h, tile_w), (overlap_h, overlap_w))`` of :func:`tiled_forward` for an image.

    The release's rule (``rect=False``): square tiles of side ``min(tile, H, W)``, so a thin
    image gets small tiles. ``rect=True``: each side clamped to its own axis,
    ``(min(tile, H), min(tile, W))``, so a 20 x 192 strip at tile 64 runs as 20 x 64 tiles.
    """
    if rect:
        th, tw = min(int(tile), height), min(int(tile), width)
        return (th, tw), (_axis_overlap(th, overlap), _axis_overlap(tw, overlap))
    t = min(int(tile), height, width)
    ov = _axis_overlap(t, overlap)
    return (t, t), (ov, ov)


def tile_count(height: int, width: int, tile: int, overlap: int, rect: bool = False) -> int:
    """Forward calls :func:`tiled_forward` makes for a ``height`` x ``width`` input."""
    (th, tw), (oh, ow) = tile_layout(height, width, tile, overlap, rect)
    return len(tile_starts(height, th, oh)) * len(tile_starts(width, tw, ow))


def iter_tile_rows(model: Forward, rows: Callable[[int, int], torch.Tensor], height: int, width: int,
                   scale: int, tile: Tuple[int, int], overlap: Tuple[int, int], blend: str = "mean"
                   ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """Run ``model`` over overlapping tiles one row of tiles at a time, and yield the output
    as soon as it is final: ``(r0, r1, out)`` for LR rows ``r0:r1`` (in order, covering the
    image), ``out`` N x C x (r1-r0)*scale x width*scale.

    ``rows(a, b)`` gives the input's LR rows ``a:b`` (N x C x (b-a) x width); ``tile`` and
    ``overlap`` are ``(height, width)`` pairs. Tile starts on each axis follow
    :func:`tile_starts`; ``blend`` as in :func:`tiled_forward`. Only one row of tiles of
    blend buffers is held, and the result is the same, value for value, as blending all the
    tiles of the image at once (each output pixel sums the same tiles in the same order).
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    (th, tw), (oh, ow) = tile, overlap
    hs, ws = tile_starts(height, th, oh), tile_starts(width, tw, ow)
    s = scale
    acc: Optional[torch.Tensor] = None   # weighted sums of LR rows base:end
    wsum: Optional[torch.Tensor] = None
    base = 0
    for k, i in enumerate(hs):
        x = rows(i, i + th)
        for j in ws:
            y = model(x[..., j:j + tw])
            if y.ndim != 4 or y.shape[0] != x.shape[0] or tuple(y.shape[-2:]) != (th * s, tw * s):
                raise ValueError(f"model returned {tuple(y.shape)} for a {th}x{tw} tile; "
                                 f"expected {th * s}x{tw * s} (scale {scale})")
            need = (i + th - base) * s
            if acc is None or acc.shape[-2] < need:  # the buffer grows to this tile row's end
                grown = torch.zeros(y.shape[0], y.shape[1], need, width * s, device=y.device, dtype=y.dtype)
                grown_w = torch.zeros(1, 1, need, width * s, device=y.device, dtype=y.dtype)
                if acc is not None:
                    grown[:, :, :acc.shape[-2]] = acc
                    grown_w[:, :, :wsum.shape[-2]] = wsum
                acc, wsum = grown, grown_w
            region = (Ellipsis, slice((i - base) * s, (i - base + th) * s), slice(j * s, (j + tw) * s))
            if blend == "mean":
                acc[region] += y
                wsum[region] += 1
            else:
                wy = _ramp(th * s, oh * s, i > 0, i + th < height, y.device, y.dtype)
                wx = _ramp(tw * s, ow * s, j > 0, j + tw < width, y.device, y.dtype)
                wt = wy[:, None] * wx[None, :]
                acc[region] += y * wt
                wsum[region] += wt
            del y
        done = hs[k + 1] if k + 1 < len(hs) else height  # rows no later tile touches
        cut = (done - base) * s
        yield base, done, acc[:, :, :cut] / wsum[:, :, :cut]
        acc, wsum = acc[:, :, cut:], wsum[:, :, cut:]
        base = done


@torch.inference_mode()
def tiled_forward(model: Forward, x: torch.Tensor, scale: int, tile: int, overlap: int,
                  blend: str = "mean", rect: bool = False) -> torch.Tensor:
    """Run ``model`` over overlapping LR tiles and assemble the x``scale`` output.

    This is the test of the ASID release (from SwinIR's): the tile side is
    ``min(tile, H, W)``; tile starts on each axis are ``0, tile-overlap, ...``
    plus a last tile flush with the border (see :func:`tile_starts`). (Only for
    an image side not larger than the overlap is the overlap cut to half a tile.)
    ``rect=True`` clamps the tile to each side instead (:func:`tile_layout`; not the
    release's rule). ``blend="mean"`` averages overlapping outputs (the release);
    ``"feather"`` weights each tile with linear ramps over the overlap on the sides it
    shares with another tile, which hides seams.
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    if x.ndim != 4:
        raise ValueError(f"expected an N x C x H x W tensor, got shape {tuple(x.shape)}")
    h, w = x.shape[-2:]
    size, ov = tile_layout(h, w, tile, overlap, rect)
    out: Optional[torch.Tensor] = None
    for r0, r1, y in iter_tile_rows(model, lambda a, b: x[..., a:b, :], h, w, scale, size, ov, blend):
        if out is None:
            out = torch.empty(y.shape[0], y.shape[1], h * scale, w * scale, device=y.device, dtype=y.dtype)
        out[:, :, r0 * scale:r1 * scale] = y
    return out


_TRANSFORMS = [(tr & 1, tr & 2, tr & 4) for tr in range(8)]


@torch.inference_mode()
def self_ensemble(model: Forward, x: torch.Tensor) -> torch.Tensor:
    """x8 geometric self-ensemble: the mean of the model's outputs on the 8 flips /
    transpositions of ``x``, each transformed back."""
    acc: Optional[torch.Tensor] = None
    for flip_w, flip_h, transpose in _TRANSFORMS:
        xi = x
        if flip_w:
            xi = xi.flip(-1)
        if flip_h:
            xi = xi.flip(-2)
        if transpose:
            xi = xi.transpose(-1, -2)
        y = model(xi.contiguous())
        if transpose:
            y = y.transpose(-1, -2)
        if flip_h:
            y = y.flip(-2)
        if flip_w:
            y = y.flip(-1)
        acc = y.clone() if acc is None else acc + y
    return acc / len(_TRANSFORMS)


def make_forward(model: Forward, scale: int, *, tile: Optional[int] = None, overlap: int = 24,
                 blend: str = "mean", chop: bool = False, ensemble: bool = False) -> Forward:
    """The inference function for one strategy: whole image (default), ``tile``
    (with ``overlap``/``blend``) or ``chop``, optionally inside x8 ``ensemble``."""
    if tile is not None and chop:
        raise ValueError("choose tiled or chop inference, not both")
    if tile is not None:
        check_tiles(tile, overlap)
        if blend not in BLENDS:
            raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")

        def base(x):
            return tiled_forward(model, x, scale, tile, overlap, blend)
    elif chop:
        from .chop import forward_chop

        def base(x):
            return forward_chop(model, x, scale)
    else:
        base = model

    @torch.inference_mode()
    def run(x):
        return self_ensemble(base, x) if ensemble else base(x)
    return run
