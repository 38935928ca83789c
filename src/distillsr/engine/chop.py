"""EDSR-style "chop" inference, the test path behind FDIWN's published numbers.

The LR image is cut into four overlapping quadrants of (h//2 + shave) x (w//2 + shave)
pixels, anchored at its four corners; each quadrant is super-resolved on its own
(recursively, the same way, while a quadrant has ``min_size`` pixels or more), and the
output is assembled from the quadrants' non-overlapping parts: the top-left
(h//2) x (w//2) of the top-left result, and so on. With FDIWN's release settings
(shave 10, min_size 160,000) this reproduces the published tables; whole-image inference
scores slightly differently because FDIWN's attention uses whole-image statistics.

Differences from the EDSR original, none of which changes a result it could compute: a
quadrant never exceeds the image (tiny inputs are run as they are, where the original
slices out of bounds), recursion stops when a quadrant would not be smaller than its
input, and quadrants are run one at a time whatever the device count.
"""
from __future__ import annotations

from typing import Callable

import torch

__all__ = ["forward_chop"]


def forward_chop(model: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, scale: int,
                 shave: int = 10, min_size: int = 160000) -> torch.Tensor:
    """Super-resolve the NCHW batch ``x`` with ``model`` by overlapping quadrants.

    ``model`` maps an N x C x h x w tensor to N x C' x (scale*h) x (scale*w); the pixel
    range is whatever ``model`` expects (chop only slices and pastes).
    """
    if x.dim() != 4:
        raise ValueError(f"forward_chop needs an N x C x H x W tensor, got shape {tuple(x.shape)}")
    if not isinstance(scale, int) or scale < 1:
        raise ValueError(f"scale must be a positive int, got {scale!r}")
    if shave < 0 or min_size < 1:
        raise ValueError(f"need shave >= 0 and min_size >= 1, got shave={shave}, min_size={min_size}")
    h, w = x.shape[-2:]
    half_h, half_w = h // 2, w // 2
    # quadrant size; it must reach past the middle so that the four parts cover the image
    qh = min(h, max(half_h + shave, h - half_h))
    qw = min(w, max(half_w + shave, w - half_w))
    quadrants = [x[..., top:top + qh, left:left + qw] for top in (0, h - qh) for left in (0, w - qw)]
    recurse = qh * qw >= min_size and (qh, qw) != (h, w)
    outs = [forward_chop(model, q, scale, shave, min_size) if recurse else model(q) for q in quadrants]

    s = scale
    expected = (s * qh, s * qw)
    if tuple(outs[0].shape[-2:]) != expected:
        raise ValueError(f"model output {tuple(outs[0].shape[-2:])} for a {qh}x{qw} input is not x{s}")
    out = outs[0].new_empty(*outs[0].shape[:2], s * h, s * w)
    top, left = s * half_h, s * half_w          # where the lower / right parts start in the output
    off_h, off_w = s * (qh - (h - half_h)), s * (qw - (w - half_w))  # and in the lower / right quadrants
    out[..., :top, :left] = outs[0][..., :top, :left]
    out[..., :top, left:] = outs[1][..., :top, off_w:]
    out[..., top:, :left] = outs[2][..., off_h:, :left]
    out[..., top:, left:] = outs[3][..., off_h:, off_w:]
    return out
