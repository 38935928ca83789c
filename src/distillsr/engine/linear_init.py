"""Least-squares initialisation of a network's linear path (a head start for short runs).

ASID (like most SR networks) has a linear path from input to output:
``upsampler(head(x) + fuse(deep features))``. With ``fuse`` zeroed, the network is
exactly the linear map ``upsampler(head(x))``; if ``head`` copies RGB into its first
three channels, that map is a 3x3 sub-pixel filter over the LR image. The best such
filter for a training set is a linear least-squares problem, solved here in closed
form; training then starts from a network that already beats bicubic interpolation
and only has to learn the non-linear part. The deep body is left as initialised, and
``fuse`` receives gradients from the first step, so nothing is frozen.
"""
from __future__ import annotations

from typing import Iterable, Optional, Tuple

import numpy as np
import torch
import torch.nn as nn

__all__ = ["fit_subpixel_filter", "apply_linear_init", "linear_init_from_pairs", "linear_init_from_images",
           "fit_upsampler"]


def _neighbourhoods(lr: np.ndarray) -> np.ndarray:
    """H x W x C float -> (H*W) x 9C features: 3x3 zero-padded neighbourhood of each channel
    (ordered channel, dy, dx as a conv weight)."""
    h, w, c = lr.shape
    p = np.pad(lr, ((1, 1), (1, 1), (0, 0)))
    cols = [p[dy:dy + h, dx:dx + w, k] for k in range(c) for dy in range(3) for dx in range(3)]
    return np.stack(cols, axis=-1).reshape(-1, 9 * c)


def _subpixels(hr: np.ndarray, scale: int) -> np.ndarray:
    """sH x sW x 3 -> (H*W) x 3s^2 targets in PixelShuffle order (channel, row, col)."""
    sh, sw, _ = hr.shape
    h, w = sh // scale, sw // scale
    t = hr.reshape(h, scale, w, scale, 3).transpose(0, 2, 4, 1, 3)
    return t.reshape(h * w, 3 * scale * scale)


def _accumulate(xtx: np.ndarray, xty: np.ndarray, x: np.ndarray, y: np.ndarray,
                rng: np.random.Generator, samples: int) -> int:
    """Add (a random subset of ``samples``) rows of features x (with a bias column) and
    targets y to the normal equations; returns the number of rows added."""
    if samples and len(x) > samples:
        keep = rng.choice(len(x), size=samples, replace=False)
        x, y = x[keep], y[keep]
    x = np.concatenate([x, np.ones((len(x), 1))], axis=1)
    xtx += x.T @ x
    xty += x.T @ y
    return len(x)


def fit_subpixel_filter(pairs: Iterable[Tuple[np.ndarray, np.ndarray]], scale: int,
                        samples_per_image: int = 8000, seed: int = 0,
                        ridge: float = 1e-6) -> Tuple[np.ndarray, np.ndarray]:
    """Fit ``HR subpixels ~ W @ (3x3x3 LR neighbourhood) + b`` over (LR, HR) pairs.

    Images are float H x W x 3 in the model's pixel range; HR is s times LR.
    Returns the weight as a (3 s^2, 3, 3, 3) conv kernel and the (3 s^2,) bias.
    """
    rng = np.random.default_rng(seed)
    k = 28
    xtx = np.zeros((k, k))
    xty = np.zeros((k, 3 * scale * scale))
    n = 0
    for lr, hr in pairs:
        if hr.shape[0] != lr.shape[0] * scale or hr.shape[1] != lr.shape[1] * scale:
            raise ValueError(f"HR {hr.shape[:2]} is not x{scale} of LR {lr.shape[:2]}")
        n += _accumulate(xtx, xty, _neighbourhoods(lr.astype(np.float64)),
                         _subpixels(hr.astype(np.float64), scale), rng, samples_per_image)
    if n < k:
        raise ValueError("too few training pixels to fit the linear path")
    sol = np.linalg.solve(xtx + ridge * n * np.eye(k), xty)  # 28 x 3s^2
    weight = sol[:27].T.reshape(3 * scale * scale, 3, 3, 3)
    return weight, sol[27]


@torch.no_grad()
def apply_linear_init(model: nn.Module, weight: np.ndarray, bias: np.ndarray) -> nn.Module:
    """Make ``model`` compute the given sub-pixel filter (needs ``head``, ``fuse`` and
    ``upsampler[0]``, as ASID has): head copies RGB to channels 0-2, fuse is zeroed,
    the upsampler reads the filter from channels 0-2 only."""
    for name in ("head", "fuse", "upsampler"):
        if not hasattr(model, name):
            raise TypeError(f"{type(model).__name__} has no '{name}': linear init is for ASID-like networks")
    head, fuse, up = model.head, model.fuse, model.upsampler[0]
    if head.kernel_size != (3, 3) or up.kernel_size != (3, 3) or up.out_channels != weight.shape[0]:
        raise ValueError("the network's head/upsampler do not have the expected 3x3 shapes")
    head.weight[:3].zero_()
    head.bias[:3].zero_()
    for c in range(3):
        head.weight[c, c, 1, 1] = 1.0
    fuse.weight.zero_()
    fuse.bias.zero_()
    up.weight.zero_()
    up.weight[:, :3] = torch.as_tensor(weight, dtype=up.weight.dtype, device=up.weight.device)
    up.bias.copy_(torch.as_tensor(bias, dtype=up.bias.dtype, device=up.bias.device))
    return model


def linear_init_from_pairs(model: nn.Module, pairs: Iterable[Tuple[np.ndarray, np.ndarray]], scale: int,
                           seed: int = 0, samples_per_image: Optional[int] = 8000) -> nn.Module:
    """Fit on uint8 RGB (LR, HR) pairs and apply; values are scaled to the model's ``pixel_range``."""
    lo, hi = getattr(model, "pixel_range", (0.0, 1.0))
    scaled = ((lr / 255.0 * (hi - lo) + lo, hr / 255.0 * (hi - lo) + lo) for lr, hr in pairs)
    weight, bias = fit_subpixel_filter(scaled, scale, samples_per_image or 0, seed)
    return apply_linear_init(model, weight, bias)


def linear_init_from_images(model: nn.Module, hr_images: Iterable[np.ndarray], scale: int,
                            seed: int = 0, samples_per_image: Optional[int] = 8000) -> nn.Module:
    """Fit on uint8 HR images, their LR made with MATLAB bicubic as the benchmarks', and apply."""
    from ..data.imresize import imresize

    def pairs():
        for hr in hr_images:
            hr = np.ascontiguousarray(hr[: hr.shape[0] // scale * scale, : hr.shape[1] // scale * scale, :3])
            yield imresize(hr, 1.0 / scale), hr

    return linear_init_from_pairs(model, pairs(), scale, seed, samples_per_image)


@torch.no_grad()
def fit_upsampler(model: nn.Module, pairs: Iterable[Tuple[np.ndarray, np.ndarray]], scale: int,
                  samples_per_image: int = 4000, seed: int = 0, ridge: float = 1e-4) -> nn.Module:
    """Fit the upsampler conv (3x3, C -> 3 s^2, with bias) of an ASID-like network by least
    squares on the features its body computes from the training pairs (uint8 RGB LR/HR).

    For a new scale on a trained body (x3/x4 from x2, ``init_from`` + ``init_strict:
    false``): the network starts from the best upsampler for that body instead of a
    random one. Nothing else changes."""
    if not (hasattr(model, "features") and hasattr(model, "pad") and hasattr(model, "upsampler")):
        raise TypeError(f"{type(model).__name__}: fit_upsampler is for ASID-like networks (features, upsampler)")
    up = model.upsampler[0]
    if up.kernel_size != (3, 3) or up.out_channels != 3 * scale * scale:
        raise ValueError("the network's upsampler is not a 3x3 conv to 3 s^2 channels")
    lo, hi = getattr(model, "pixel_range", (0.0, 1.0))
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    rng = np.random.default_rng(seed)
    k = 9 * up.in_channels + 1
    xtx = np.zeros((k, k))
    xty = np.zeros((k, 3 * scale * scale))
    n = 0
    for lr, hr in pairs:
        h, w = lr.shape[:2]
        if hr.shape[0] != h * scale or hr.shape[1] != w * scale:
            raise ValueError(f"HR {hr.shape[:2]} is not x{scale} of LR {lr.shape[:2]}")
        x = torch.from_numpy(np.ascontiguousarray(lr[..., :3])).permute(2, 0, 1)[None].float()
        x = (x / 255.0 * (hi - lo) + lo).to(device)
        feats = model.features(model.pad(x))[0][0, :, :h, :w].permute(1, 2, 0).double().cpu().numpy()
        n += _accumulate(xtx, xty, _neighbourhoods(feats),
                         _subpixels(hr[..., :3].astype(np.float64) / 255.0 * (hi - lo) + lo, scale),
                         rng, samples_per_image)
    if n < k:
        raise ValueError(f"too few training pixels ({n}) to fit {k} upsampler inputs")
    sol = np.linalg.solve(xtx + ridge * n * np.eye(k), xty)
    up.weight.copy_(torch.as_tensor(sol[:-1].T.reshape(up.weight.shape), dtype=up.weight.dtype))
    up.bias.copy_(torch.as_tensor(sol[-1], dtype=up.bias.dtype))
    model.train(was_training)
    return model
