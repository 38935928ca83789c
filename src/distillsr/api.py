"""``distillsr.upscale``: one call from an image in memory to its upscaled version."""
from __future__ import annotations

import os
from pathlib import Path
from typing import Dict, Tuple, Union

import numpy as np
import torch

from . import io as imgio
from .engine.upscale import DEFAULT_BLEND, DEFAULT_OVERLAP, Upscaler, load_runner, select_device

__all__ = ["upscale"]

ModelArg = Union[str, os.PathLike, torch.nn.Module, None]
_CACHE: Dict[Tuple[str, int, str], torch.nn.Module] = {}


_CHECKPOINT_SUFFIXES = (".safetensors", ".pth", ".pt", ".ckpt", ".bin", ".onnx")


def _looks_like_a_path(text: str) -> bool:
    """A string meant as a checkpoint file rather than a weights name (names have no / nor suffix)."""
    return "/" in text or os.sep in text or text.lower().endswith(_CHECKPOINT_SUFFIXES)


def _runner(model: ModelArg, scale: int, device: torch.device):
    if isinstance(model, torch.nn.Module):
        return load_runner(model, scale, device=device)
    if isinstance(model, os.PathLike) or (isinstance(model, str) and Path(model).is_file()):
        return load_runner(scale=scale, weights=model, device=device)
    if isinstance(model, str) and _looks_like_a_path(model):
        from .checkpoint import CheckpointError
        raise CheckpointError(f"{model}: no such checkpoint file")
    if model is None:  # the best weights present for this scale (never the network)
        from .pretrained import choose_default
        model = choose_default(scale).name
    key = (str(model).lower(), scale, str(device))
    if key not in _CACHE:  # pretrained weights are loaded (and checked) once per process
        _CACHE[key] = load_runner(str(model), scale, device=device)
    return _CACHE[key]


def upscale(image, scale: int = 4, model: ModelArg = None, *, device: Union[str, torch.device] = "auto",
            tile: Union[str, int, None] = "auto", tile_overlap: int = DEFAULT_OVERLAP,
            blend: str = DEFAULT_BLEND, self_ensemble: bool = False):
    """Upscale ``image`` x``scale`` and return the same kind of object.

    ``image``:
      * a PIL image (any mode; palette images come back RGB/RGBA, 1-bit ones L; I;16 stays
        I;16; the ICC profile is carried in ``info``),
      * a numpy array H x W or H x W x C (C = 1, 2 = grey+alpha, 3, 4 = RGBA), uint8, uint16
        or float in [0, 1] (float results are clipped to [0, 1]),
      * a torch tensor C x H x W or N x C x H x W, float in [0, 1] or uint8, returned on its
        device with its dtype.
    Float input outside [0, 1] (a 0..255 float image, say) is refused with a ValueError.
    ``model``: None (the best weights present for the scale, as ``distillsr upscale`` chooses
    them), a pretrained or release name (``distillsr models``; a release is pulled on first
    use), a checkpoint file, or a network (any ``SRNet``, e.g. from ``distillsr.load_model``). ``tile``: ``"auto"`` (whole image
    when it fits in memory), an int (LR pixels) or 0 (always whole). Alpha is upscaled
    bicubically and colour premultiplied by it (no fringes at transparent edges); greyscale is run as RGB and averaged back.
    """
    dev = select_device(device)
    up = Upscaler(_runner(model, scale, dev), dev, tile=tile, tile_overlap=tile_overlap, blend=blend,
                  self_ensemble=self_ensemble)
    if isinstance(image, torch.Tensor):
        return _upscale_tensor(up, image)
    if isinstance(image, np.ndarray):
        return _upscale_numpy(up, image)
    from PIL import Image
    if isinstance(image, Image.Image):
        arr, info = imgio.pil_to_array(image)
        out = up.upscale_array(imgio.to_float(arr), info.dtype)
        result = imgio.array_to_pil(out)
        if info.icc_profile:
            result.info["icc_profile"] = info.icc_profile
        return result
    raise TypeError(f"image must be a PIL image, a numpy array or a torch tensor, not {type(image).__name__}")


def _check_unit_range(lo: float, hi: float, has_nan: bool) -> None:
    """Refuse float pixels outside [0, 1]: a 0..255 float image would come back white."""
    if has_nan:
        raise ValueError("the float image holds NaN values; float images must hold values in [0, 1]")
    if lo < 0 or hi > 1:
        if hi > 1.5:
            hint = "divide a 0..255 image by 255 (or pass it as uint8)"
        elif lo < -0.5:
            hint = "map a [-1, 1] image to [0, 1] with (x + 1) / 2"
        else:
            hint = "clip it to [0, 1] first"
        raise ValueError(f"float image values must lie in [0, 1], but they run from {lo:g} to {hi:g}; {hint}")


def _upscale_numpy(up: Upscaler, arr: np.ndarray) -> np.ndarray:
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (1, 2, 3, 4)):
        raise ValueError(f"expected an H x W or H x W x C array with C in 1..4, got shape {arr.shape}")
    if np.issubdtype(arr.dtype, np.floating) and arr.size:
        _check_unit_range(float(np.min(arr)), float(np.max(arr)), bool(np.isnan(arr).any()))
    out_dtype = arr.dtype if arr.dtype in (np.uint8, np.uint16) else np.float32
    x = arr[:, :, None] if arr.ndim == 2 else arr
    y = up.upscale_array(imgio.to_float(x), out_dtype)
    if np.issubdtype(arr.dtype, np.floating):
        y = y.astype(arr.dtype, copy=False)
    return y[:, :, 0] if arr.ndim == 2 else y


def _upscale_tensor(up: Upscaler, t: torch.Tensor) -> torch.Tensor:
    if t.dim() not in (3, 4) or t.shape[-3] not in (1, 2, 3, 4):
        raise ValueError(f"expected a C x H x W or N x C x H x W tensor with C in 1..4, got {tuple(t.shape)}")
    if not (t.is_floating_point() or t.dtype == torch.uint8):
        raise TypeError(f"tensor dtype must be floating point (in [0, 1]) or uint8, not {t.dtype}")
    if t.is_floating_point() and t.numel():
        _check_unit_range(float(t.min()), float(t.max()), bool(t.isnan().any()))
    batch = t if t.dim() == 4 else t.unsqueeze(0)
    outs = []
    for img in batch:
        x = img.detach().to("cpu").permute(1, 2, 0).numpy()
        x = imgio.to_float(x)
        y = up.upscale_array(x, np.uint8 if t.dtype == torch.uint8 else np.float32)
        outs.append(torch.from_numpy(y).permute(2, 0, 1))
    out = torch.stack(outs).to(device=t.device, dtype=t.dtype)
    return out if t.dim() == 4 else out[0]
