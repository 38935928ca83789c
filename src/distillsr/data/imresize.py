"""MATLAB-compatible bicubic ``imresize`` in numpy and torch.

The rules (see docs/protocol.md of the project) are those of MATLAB's
``imresize(I, scale, 'bicubic')``:

* cubic convolution kernel with a = -0.5, support 4;
* when shrinking (scale < 1) the kernel is stretched by 1/scale and scaled by
  ``scale`` (antialiasing);
* output pixel x (1-based) samples input coordinate
  ``u = x/scale + 0.5*(1 - 1/scale)`` from the input pixels
  ``floor(u - width/2) + (0 .. ceil(width) + 1)``; weights are normalised to sum 1;
* out-of-range indices are clamped to the edge (replicated borders);
* separable: the dimension with the smaller scale first, rows (height) first
  when equal;
* on uint8 data every 1-D pass is rounded half away from zero and clipped to
  0..255 before the next pass.

On uint8 images this reproduces MATLAB bit for bit (the benchmark LR files are
the test). Float images are resized without any rounding or clipping.

``imresize`` works on numpy arrays (H x W or H x W x C); ``imresize_torch`` on
tensors (H x W, C x H x W or N x C x H x W), batched, on any device.
"""
from __future__ import annotations

import math
from functools import lru_cache
from typing import Optional, Sequence, Tuple, Union

import numpy as np

__all__ = ["imresize", "imresize_torch", "resize_weights", "output_size"]

Number = Union[int, float]


def _cubic(x: np.ndarray) -> np.ndarray:
    # the same expression MATLAB evaluates, term by term
    absx = np.abs(x)
    absx2 = absx ** 2
    absx3 = absx ** 3
    return ((1.5 * absx3 - 2.5 * absx2 + 1) * (absx <= 1)
            + (-0.5 * absx3 + 2.5 * absx2 - 4 * absx + 2) * ((1 < absx) & (absx <= 2)))


@lru_cache(maxsize=256)
def resize_weights(in_len: int, out_len: int, scale: float,
                   antialias: bool = True) -> Tuple[np.ndarray, np.ndarray]:
    """Taps of one 1-D bicubic resize: ``(indices, weights)``, both (out_len, P).

    ``out[i] = sum_k weights[i, k] * in[indices[i, k]]`` (0-based indices, already
    clamped to the edge). The arrays are read-only (they are cached).
    """
    if in_len < 1 or out_len < 1:
        raise ValueError(f"cannot resize a length of {in_len} to {out_len}")
    if not scale > 0:
        raise ValueError(f"scale must be positive, got {scale}")
    if scale < 1 and antialias:
        width = 4.0 / scale

        def kernel(t):
            return scale * _cubic(scale * t)
    else:
        width = 4.0
        kernel = _cubic
    x = np.arange(1, out_len + 1, dtype=np.float64)
    u = x / scale + 0.5 * (1 - 1 / scale)
    left = np.floor(u - width / 2)
    taps = int(math.ceil(width)) + 2
    idx = left[:, None] + np.arange(taps, dtype=np.float64)[None, :]
    w = kernel(u[:, None] - idx)
    total = w[:, 0].copy()
    for k in range(1, taps):  # summed left to right
        total += w[:, k]
    w = w / total[:, None]
    idx = (np.clip(idx, 1, in_len) - 1).astype(np.int64)
    keep = np.any(w != 0, axis=0)  # drop taps that are zero for every output
    idx, w = np.ascontiguousarray(idx[:, keep]), np.ascontiguousarray(w[:, keep])
    idx.setflags(write=False)
    w.setflags(write=False)
    return idx, w


def output_size(in_len: int, scale: float) -> int:
    """MATLAB's ``ceil(scale * in_len)``, robust to 1/s not being exact in binary."""
    v = in_len * scale
    r = round(v)
    return int(r) if abs(v - r) < 1e-9 * max(1.0, abs(v)) else int(math.ceil(v))


def _plan(in_hw: Tuple[int, int], scale, size) -> Tuple[Tuple[int, int], Tuple[float, float], Tuple[int, ...]]:
    """Output size, per-dimension scale and the order of the two passes."""
    if (scale is None) == (size is None):
        raise ValueError("give exactly one of scale and size")
    if size is not None:
        out = (int(size[0]), int(size[1]))
        if min(out) < 1:
            raise ValueError(f"output size must be positive, got {out}")
        scales = (out[0] / in_hw[0], out[1] / in_hw[1])
    else:
        sc = (scale, scale) if np.isscalar(scale) else tuple(scale)
        if len(sc) != 2 or not all(float(s) > 0 for s in sc):
            raise ValueError(f"scale must be positive (one number or two), got {scale!r}")
        scales = (float(sc[0]), float(sc[1]))
        out = (output_size(in_hw[0], scales[0]), output_size(in_hw[1], scales[1]))
        if min(out) < 1:
            raise ValueError(f"scale {scale} shrinks {in_hw[0]}x{in_hw[1]} to nothing")
    order = (0, 1) if scales[0] <= scales[1] else (1, 0)  # smaller scale first, rows on ties
    return out, scales, order


def _round_u8(v: np.ndarray) -> np.ndarray:
    # round half away from zero (MATLAB), then saturate to 0..255
    r = np.floor(v)
    r += (v - r) >= 0.5
    return np.clip(r, 0, 255, out=r)


def imresize(img: np.ndarray, scale: Optional[Union[Number, Sequence[Number]]] = None, *,
             size: Optional[Sequence[int]] = None, antialias: bool = True) -> np.ndarray:
    """MATLAB ``imresize(img, scale, 'bicubic')`` for an H x W or H x W x C array.

    Give ``scale`` (e.g. ``1/4`` to shrink, ``4`` to enlarge; output size is
    ``ceil(scale * size)``) or ``size=(out_h, out_w)``. uint8 input gives
    bit-exact MATLAB uint8 output; float input is resized in float64 and
    returned in its own dtype, unrounded and unclipped.
    """
    img = np.asarray(img)
    if img.ndim not in (2, 3):
        raise ValueError(f"imresize expects an H x W or H x W x C array, got shape {img.shape}")
    if img.dtype == np.uint8:
        quantise, out_dtype = True, np.uint8
    elif np.issubdtype(img.dtype, np.floating):
        quantise, out_dtype = False, img.dtype
    else:
        raise TypeError(f"imresize supports uint8 and float arrays, not {img.dtype}")
    out_hw, scales, order = _plan(img.shape[:2], scale, size)
    x = img.astype(np.float64)
    for dim in order:
        idx, w = resize_weights(x.shape[dim], out_hw[dim], scales[dim], antialias)
        wshape = (-1, 1, 1) if dim == 0 else (1, -1, 1)
        wshape = wshape[:x.ndim]
        acc = np.take(x, idx[:, 0], axis=dim) * w[:, 0].reshape(wshape)
        for k in range(1, idx.shape[1]):  # accumulate tap by tap, like MATLAB
            acc += np.take(x, idx[:, k], axis=dim) * w[:, k].reshape(wshape)
        x = _round_u8(acc) if quantise else acc
    return x.astype(out_dtype)


# ---------------------------------------------------------------- torch

def _torch_taps(in_len, out_len, scale, antialias, device, dtype):
    import torch
    idx, w = resize_weights(in_len, out_len, scale, antialias)
    return (torch.from_numpy(np.array(idx)).to(device),
            torch.from_numpy(np.array(w)).to(device=device, dtype=dtype))


_MATRIX_CACHE: dict = {}


def _torch_matrix(in_len, out_len, scale, antialias, device, dtype):
    """Dense (out_len, in_len) resize matrix (taps on clamped indices summed)."""
    import torch
    key = (in_len, out_len, scale, antialias, str(device), dtype)
    m = _MATRIX_CACHE.get(key)
    if m is None:
        idx, w = resize_weights(in_len, out_len, scale, antialias)
        dense = np.zeros((out_len, in_len), dtype=np.float64)
        np.add.at(dense, (np.repeat(np.arange(out_len), idx.shape[1]), idx.ravel()), w.ravel())
        m = torch.from_numpy(dense).to(device=device, dtype=dtype)
        if len(_MATRIX_CACHE) > 128:
            _MATRIX_CACHE.clear()
        _MATRIX_CACHE[key] = m
    return m


def imresize_torch(x, scale: Optional[Union[Number, Sequence[Number]]] = None, *,
                   size: Optional[Sequence[int]] = None, antialias: bool = True,
                   round_uint8: Optional[bool] = None):
    """MATLAB bicubic resize of a tensor (H x W, C x H x W or N x C x H x W).

    * uint8 tensors, or float tensors with ``round_uint8=True`` (values on the
      0..255 scale): computed in float64 with MATLAB's per-pass rounding and
      clipping -- bit-identical to :func:`imresize` on uint8 data. The result
      has the input's dtype.
    * float tensors (default): a plain float resize in the input's dtype, done
      as two small matrix products -- the fast path for making LR patches on
      the fly in training. No rounding, no clipping.
    """
    import torch
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"imresize_torch expects a tensor, got {type(x).__name__}")
    if x.ndim not in (2, 3, 4):
        raise ValueError(f"expected H x W, C x H x W or N x C x H x W, got shape {tuple(x.shape)}")
    is_u8 = x.dtype == torch.uint8
    if not is_u8 and not x.is_floating_point():
        raise TypeError(f"imresize_torch supports uint8 and float tensors, not {x.dtype}")
    if round_uint8 is None:
        round_uint8 = is_u8
    if is_u8 and not round_uint8:
        raise ValueError("uint8 tensors are always resized with per-pass rounding")
    out_hw, scales, order = _plan(tuple(x.shape[-2:]), scale, size)
    in_dtype = x.dtype
    if round_uint8:
        # work on (..., H, W) with the resized axis moved to -2, where gathering is row copies
        y = x.to(torch.float64)
        for dim in order:
            if dim == 1:
                y = y.transpose(-1, -2).contiguous()
            idx, w = _torch_taps(y.shape[-2], out_hw[dim], scales[dim], antialias, y.device, y.dtype)
            acc = y[..., idx[:, 0], :] * w[:, 0, None]
            for k in range(1, idx.shape[1]):  # tap by tap, separate mul and add (no FMA), like numpy
                acc += y[..., idx[:, k], :] * w[:, k, None]
            r = torch.floor(acc)
            r += (acc - r) >= 0.5
            y = r.clamp_(0, 255)
            if dim == 1:
                y = y.transpose(-1, -2)
        return y.contiguous().to(in_dtype)
    y = x
    for dim in order:
        axis = y.ndim - 2 + dim
        m = _torch_matrix(y.shape[axis], out_hw[dim], scales[dim], antialias, y.device, y.dtype)
        y = torch.matmul(m, y) if dim == 0 else torch.matmul(y, m.t())
    return y
