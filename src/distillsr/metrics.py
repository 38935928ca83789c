"""PSNR and SSIM on the Y channel, as the papers' MATLAB scripts compute them.

The conventions (docs/protocol.md):

* SR and HR are uint8 images (H x W x 3 RGB, or H x W / H x W x 1 grey).
* Y of MATLAB's ``rgb2ycbcr`` on double data in [0, 1], cast to float32 and
  multiplied by 255 (values 16..235).
* Greyscale test images: ``grey="replicate"`` (default) copies the grey channel
  to R, G and B first (what the ASID script does); ``grey="raw"`` takes the grey
  value itself as Y (how the classic bicubic rows were computed). With ``raw``,
  a three-channel SR of a greyscale HR is reduced to grey with Y's own luma
  weights without offset, ``(65.481 R + 128.553 G + 24.966 B) / 219``, which is
  the grey value itself when R = G = B.
* ``crop`` pixels (= the scale) are cut from every border.
* PSNR = 10 log10(255^2 / MSE), float64.
* SSIM ``wang`` (default; Wang et al.'s ``ssim_index``, used for RFDN/FDIWN):
  11x11 Gaussian window, sigma 1.5, 'valid' filtering, K1 = 0.01, K2 = 0.03,
  L = 255, mean of the map. SSIM ``matlab`` (MATLAB's built-in ``ssim``, used
  by the ASID release): the same on [0, 1] data with L = 1, but filtering with
  replicated borders, so the map has the image's size.
"""
from __future__ import annotations

import math
from typing import Dict, Iterable, Tuple

import numpy as np

__all__ = ["SSIM_VARIANTS", "GREY_CONVENTIONS", "rgb_to_y", "y_channel", "psnr", "ssim",
           "psnr_ssim", "mean_scores", "quantise", "to_uint8"]

SSIM_VARIANTS = ("wang", "matlab")
GREY_CONVENTIONS = ("replicate", "raw")

# MATLAB rgb2ycbcr on double data: T / 255 and offset / 255
_Y_COEF = (65.481 / 255, 128.553 / 255, 24.966 / 255)
_Y_OFFSET = 16 / 255


def _check_name(value: str, allowed: Tuple[str, ...], what: str) -> str:
    if value not in allowed:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(allowed)}")
    return value


def _as_hwc(img: np.ndarray, what: str) -> np.ndarray:
    img = np.asarray(img)
    if img.dtype != np.uint8:
        raise TypeError(f"{what}: expected a uint8 image, got {img.dtype} (use to_uint8 first)")
    if img.ndim == 2:
        img = img[:, :, None]
    if img.ndim != 3 or img.shape[2] not in (1, 3):
        raise ValueError(f"{what}: expected H x W, H x W x 1 or H x W x 3, got shape {img.shape}")
    return img


_PEAKS = {np.dtype(np.uint8): 255.0, np.dtype(np.uint16): 65535.0}


def quantise(img, dtype=np.uint8, inplace: bool = False) -> np.ndarray:
    """Float image in [0, 1] -> ``dtype`` (uint8, or uint16 for 16-bit files): clip to [0, 1],
    multiply by the peak (255 / 65535), round half up (``floor(v + 0.5)``), as the protocol
    quantises outputs. The one quantiser of the package: evaluation, validation during training
    and written images all go through it.

    numpy or torch input, layout kept; a torch tensor is quantised on its device and the result
    is a numpy array. The arithmetic is float64 for float64 input and float32 for any other
    (float32, half, bfloat16, integers and lists as float64), so the same float32 numbers give
    the same bytes from torch (CPU or GPU) and numpy. ``inplace``: a float32 / float64 tensor may
    be overwritten (saves a copy of a large image).
    """
    dtype = np.dtype(dtype)
    if dtype not in _PEAKS:
        raise TypeError(f"quantise: to uint8 or uint16, not {dtype}")
    peak = _PEAKS[dtype]
    import torch
    if isinstance(img, torch.Tensor):
        t = img.detach()
        if t.dtype not in (torch.float32, torch.float64):
            t = t.float()  # a new tensor: free to overwrite
        elif not inplace:
            t = t.clone()
        t = t.clamp_(0, 1).mul_(peak).add_(0.5).floor_()
        # torch has no general uint16: go through int32 on the device, narrow on the host
        t = t.to(torch.uint8 if dtype == np.uint8 else torch.int32)
        return t.to("cpu").numpy().astype(dtype, copy=False)
    a = np.asarray(img)
    work = np.dtype(a.dtype if a.dtype in (np.float32, np.float64) else (
        np.float32 if np.issubdtype(a.dtype, np.floating) else np.float64))
    a = np.clip(a.astype(work, copy=False), 0, 1)
    return np.floor(a * work.type(peak) + work.type(0.5)).astype(dtype)


def to_uint8(img) -> np.ndarray:
    """[0, 1] float image (numpy or torch, H x W x C or C x H x W as given) -> uint8:
    clip, x255, round half up (see :func:`quantise`). Layout is kept; torch tensors become numpy."""
    return quantise(img, np.uint8)


def rgb_to_y(img: np.ndarray) -> np.ndarray:
    """Y (16..235 scale) of a uint8 RGB image, float64 holding float32 values."""
    img = _as_hwc(img, "rgb_to_y")
    if img.shape[2] != 3:
        raise ValueError(f"rgb_to_y needs 3 channels, got {img.shape[2]}")
    rgb = img.astype(np.float64) / 255.0
    y = _Y_COEF[0] * rgb[..., 0] + _Y_COEF[1] * rgb[..., 1] + _Y_COEF[2] * rgb[..., 2] + _Y_OFFSET
    return (y.astype(np.float32) * np.float32(255)).astype(np.float64)


def y_channel(img: np.ndarray, grey: str = "replicate", *, grey_image: bool = None) -> np.ndarray:
    """The image used for scoring (H x W float64, 0..255 scale).

    ``grey_image`` says whether the test image is greyscale (default: whether
    ``img`` has one channel); it matters only for ``grey="raw"``, where a grey
    image is scored on its grey value instead of Y.
    """
    _check_name(grey, GREY_CONVENTIONS, "grey convention")
    img = _as_hwc(img, "y_channel")
    if grey_image is None:
        grey_image = img.shape[2] == 1
    if grey == "raw" and grey_image:
        if img.shape[2] == 1:
            return img[:, :, 0].astype(np.float64)
        rgb = img.astype(np.float64)
        return (65.481 * rgb[..., 0] + 128.553 * rgb[..., 1] + 24.966 * rgb[..., 2]) / 219.0
    if img.shape[2] == 1:
        img = np.repeat(img, 3, axis=2)
    return rgb_to_y(img)


def _prepare(a, b, crop: int, what: str) -> Tuple[np.ndarray, np.ndarray]:
    """Two images to score: 2-D arrays as they are; uint8 H x W x C images as their Y
    (``y_channel``, grey convention 'replicate'); then ``crop`` border pixels cut."""
    a, b = np.asarray(a), np.asarray(b)
    if a.ndim == 3 or b.ndim == 3:
        a, b = y_channel(a), y_channel(b)
    a = a.astype(np.float64, copy=False)
    b = b.astype(np.float64, copy=False)
    if a.shape != b.shape or a.ndim != 2:
        raise ValueError(f"{what}: expected two same-sized images, got shapes {a.shape} and {b.shape}")
    if crop:
        if crop < 0 or 2 * crop >= min(a.shape):
            raise ValueError(f"{what}: border crop {crop} does not fit an image of {a.shape[1]}x{a.shape[0]}")
        a, b = a[crop:-crop, crop:-crop], b[crop:-crop, crop:-crop]
    return a, b


def psnr(a: np.ndarray, b: np.ndarray, peak: float = 255.0, *, crop: int = 0) -> float:
    """PSNR in dB, float64; ``inf`` when identical.

    ``a``, ``b``: 2-D arrays (e.g. Y channels, 0..``peak``) scored as they are, or
    uint8 H x W x 3 images scored on Y. ``crop``: border pixels cut first.
    """
    a, b = _prepare(a, b, crop, "psnr")
    mse = np.mean((a - b) ** 2)
    if mse == 0:
        return math.inf
    return float(10.0 * np.log10(peak * peak / mse))


def _gaussian(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x * x) / (2 * sigma * sigma))
    return g / g.sum()  # the 2-D window is the outer product, summing to 1


def _filter_valid(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """Separable correlation with a symmetric 1-D kernel on both axes, 'valid'."""
    n = len(g)
    h, w = img.shape
    rows = g[0] * img[0:h - n + 1]
    for k in range(1, n):
        rows = rows + g[k] * img[k:h - n + 1 + k]
    out = g[0] * rows[:, 0:w - n + 1]
    for k in range(1, n):
        out = out + g[k] * rows[:, k:w - n + 1 + k]
    return out


def ssim(a: np.ndarray, b: np.ndarray, variant: str = "wang", peak: float = 255.0, *,
         crop: int = 0) -> float:
    """Mean SSIM (float64) of two images: 2-D arrays on the 0..``peak`` scale, or
    uint8 H x W x 3 images (scored on Y); ``crop`` border pixels cut first.

    ``wang``: 'valid' Gaussian filtering, constants from L = peak. ``matlab``:
    the images are divided by ``peak`` (L = 1) and filtered with replicated
    borders. Both: 11x11 window, sigma 1.5, K1 = 0.01, K2 = 0.03.
    """
    _check_name(variant, SSIM_VARIANTS, "SSIM variant")
    a, b = _prepare(a, b, crop, "ssim")
    g = _gaussian()
    if variant == "matlab":
        a, b, L = a / peak, b / peak, 1.0
        pad = len(g) // 2
        a = np.pad(a, pad, mode="edge")
        b = np.pad(b, pad, mode="edge")
    else:
        L = float(peak)
    if min(a.shape) < len(g):
        raise ValueError(f"ssim: image of {a.shape[1]}x{a.shape[0]} is smaller than the "
                         f"{len(g)}x{len(g)} window")
    c1 = (0.01 * L) ** 2
    c2 = (0.03 * L) ** 2
    mu_a = _filter_valid(a, g)
    mu_b = _filter_valid(b, g)
    mu_aa, mu_bb, mu_ab = mu_a * mu_a, mu_b * mu_b, mu_a * mu_b
    var_a = _filter_valid(a * a, g) - mu_aa
    var_b = _filter_valid(b * b, g) - mu_bb
    cov = _filter_valid(a * b, g) - mu_ab
    smap = ((2 * mu_ab + c1) * (2 * cov + c2)) / ((mu_aa + mu_bb + c1) * (var_a + var_b + c2))
    return float(smap.mean())


def psnr_ssim(sr: np.ndarray, hr: np.ndarray, crop: int, *, ssim_variant: str = "wang",
              grey: str = "replicate") -> Tuple[float, float]:
    """PSNR and SSIM of a uint8 SR image against its uint8 HR, on Y, ``crop``
    border pixels cut (the papers use crop = scale). Whether the test image is
    greyscale is taken from ``hr`` (one channel)."""
    _check_name(ssim_variant, SSIM_VARIANTS, "SSIM variant")
    hr = _as_hwc(hr, "hr")
    sr = _as_hwc(sr, "sr")
    if sr.shape[:2] != hr.shape[:2]:
        raise ValueError(f"SR is {sr.shape[1]}x{sr.shape[0]} but HR is {hr.shape[1]}x{hr.shape[0]}")
    crop = int(crop)
    if crop < 0 or 2 * crop >= min(hr.shape[:2]):
        raise ValueError(f"border crop {crop} does not fit an image of {hr.shape[1]}x{hr.shape[0]}")
    grey_image = hr.shape[2] == 1
    y_sr = y_channel(sr, grey, grey_image=grey_image)
    y_hr = y_channel(hr, grey, grey_image=grey_image)
    return psnr(y_sr, y_hr, crop=crop), ssim(y_sr, y_hr, ssim_variant, crop=crop)


def mean_scores(scores: Iterable[Tuple[float, float]]) -> Dict[str, float]:
    """Mean PSNR and SSIM over images (float64); NaN when there are none."""
    arr = np.asarray(list(scores), dtype=np.float64).reshape(-1, 2)
    if len(arr) == 0:
        return {"psnr": math.nan, "ssim": math.nan}
    return {"psnr": float(arr[:, 0].mean()), "ssim": float(arr[:, 1].mean())}
