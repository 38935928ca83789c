"""Inference strategies: whole image, tiles (the ASID release's test), x8 self-ensemble,
EDSR-style chop. Each takes a model (any callable NCHW [0, 1] -> NCHW) and runs
under ``torch.inference_mode``.
"""
from __future__ import annotations

from typing import Callable, List, Optional

import torch

__all__ = ["tile_starts", "tiled_forward", "self_ensemble", "make_forward", "BLENDS"]

BLENDS = ("mean", "feather")
Forward = Callable[[torch.Tensor], torch.Tensor]


def tile_starts(length: int, tile: int, overlap: int) -> List[int]:
    """Start offsets along one axis: ``0, stride, 2*stride, ...`` below ``length - tile``,
    then ``length - tile`` (the last tile flush with the border); stride = tile - overlap."""
    if tile < 1 or overlap < 0:
        raise ValueError(f"tile must be >= 1 and overlap >= 0, got tile {tile}, overlap {overlap}")
    if length <= tile:
        return [0]
    stride = tile - overlap
    if stride < 1:
        raise ValueError(f"tile {tile} must be larger than the overlap {overlap}")
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


@torch.inference_mode()
def tiled_forward(model: Forward, x: torch.Tensor, scale: int, tile: int, overlap: int,
                  blend: str = "mean") -> torch.Tensor:
    """Run ``model`` over overlapping LR tiles and assemble the x``scale`` output.

    This is the test of the ASID release (from SwinIR's): the tile side is
    ``min(tile, H, W)``; tile starts on each axis are ``0, tile-overlap, ...``
    plus a last tile flush with the border (see :func:`tile_starts`). (Only for
    an image side not larger than the overlap is the overlap cut to half a tile.)
    ``blend="mean"`` averages overlapping outputs (the release); ``"feather"``
    weights each tile with linear ramps over the overlap on the sides it shares
    with another tile, which hides seams.
    """
    if blend not in BLENDS:
        raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")
    if x.ndim != 4:
        raise ValueError(f"expected an N x C x H x W tensor, got shape {tuple(x.shape)}")
    n, _, h, w = x.shape
    t = min(int(tile), h, w)
    if t <= overlap:  # an image narrower than the overlap: keep tiles overlapping by half
        overlap = t // 2
    hs, ws = tile_starts(h, t, overlap), tile_starts(w, t, overlap)
    ts = t * scale
    out: Optional[torch.Tensor] = None
    wsum: Optional[torch.Tensor] = None
    for i in hs:
        for j in ws:
            y = model(x[..., i:i + t, j:j + t])
            if y.ndim != 4 or y.shape[0] != n or tuple(y.shape[-2:]) != (ts, ts):
                raise ValueError(f"model returned {tuple(y.shape)} for a {t}x{t} tile; "
                                 f"expected {ts}x{ts} (scale {scale})")
            if out is None:
                out = torch.zeros(n, y.shape[1], h * scale, w * scale, device=y.device, dtype=y.dtype)
                wsum = torch.zeros(1, 1, h * scale, w * scale, device=y.device, dtype=y.dtype)
            region = (Ellipsis, slice(i * scale, i * scale + ts), slice(j * scale, j * scale + ts))
            if blend == "mean":
                out[region] += y
                wsum[region] += 1
            else:
                r = overlap * scale
                wy = _ramp(ts, r, i > 0, i + t < h, y.device, y.dtype)
                wx = _ramp(ts, r, j > 0, j + t < w, y.device, y.dtype)
                wt = wy[:, None] * wx[None, :]
                out[region] += y * wt
                wsum[region] += wt
    return out / wsum


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


def _forward_chop():
    try:
        from .chop import forward_chop
    except ModuleNotFoundError as e:
        if e.name == f"{__package__}.chop":
            raise RuntimeError("chop inference needs distillsr.engine.chop (forward_chop), which "
                               "is not part of this build") from None
        raise
    return forward_chop


def make_forward(model: Forward, scale: int, *, tile: Optional[int] = None, overlap: int = 24,
                 blend: str = "mean", chop: bool = False, ensemble: bool = False) -> Forward:
    """The inference function for one strategy: whole image (default), ``tile``
    (with ``overlap``/``blend``) or ``chop``, optionally inside x8 ``ensemble``."""
    if tile is not None and chop:
        raise ValueError("choose tiled or chop inference, not both")
    if tile is not None:
        if tile < 1 or overlap < 0 or overlap >= tile:
            raise ValueError(f"tile must be >= 1 and larger than the overlap, got tile {tile}, "
                             f"overlap {overlap}")
        if blend not in BLENDS:
            raise ValueError(f"unknown blend {blend!r}; choose one of {', '.join(BLENDS)}")

        def base(x):
            return tiled_forward(model, x, scale, tile, overlap, blend)
    elif chop:
        forward_chop = _forward_chop()

        def base(x):
            return forward_chop(model, x, scale)
    else:
        base = model

    @torch.inference_mode()
    def run(x):
        return self_ensemble(base, x) if ensemble else base(x)
    return run
