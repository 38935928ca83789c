"""What runs the network for ``distillsr upscale``: the backend registry and :func:`load_runner`.

A *runner* is called on an N x 3 x h x w float tensor in [0, 1] on its device and returns the
N x 3 x h*s x w*s result; it has an int attribute ``scale``. Backends are factories
``factory(model, scale, weights, device, weights_dir) -> runner`` registered by name with
:func:`register_backend`; ``torch`` is built in, ``onnxruntime`` is imported when asked for
(and chosen by itself for a ``.onnx`` weights file). The model name ``bicubic`` is
:class:`Bicubic`, MATLAB's bicubic resize, which needs no network.
"""
from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Callable, Dict, Optional, Tuple, Union

import numpy as np
import torch

__all__ = ["Runner", "BACKENDS", "register_backend", "load_runner", "Bicubic", "BICUBIC", "is_onnx_file",
           "weights_digest", "runner_identity"]

BICUBIC = "bicubic"

Runner = Callable[[torch.Tensor], torch.Tensor]

BACKENDS: Dict[str, Callable[..., Runner]] = {}


def register_backend(name: str):
    """Decorator for ``factory(model, scale, weights, device, weights_dir) -> runner``.

    A runner is called on an N x 3 x h x w float tensor in [0, 1] on the device and returns
    the N x 3 x h*s x w*s result; it has an int attribute ``scale``. It may define
    ``memory_estimate(device) -> MemoryEstimate`` for ``tile="auto"``; torch modules are
    measured by a probe run.
    """
    def deco(fn):
        BACKENDS[name] = fn
        return fn
    return deco


@register_backend("torch")
def _torch_backend(model: Union[str, torch.nn.Module, None] = None, scale: Optional[int] = None,
                   weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                   weights_dir=None) -> torch.nn.Module:
    from ..checkpoint import load_model
    from ..pretrained import load_pretrained
    if isinstance(model, torch.nn.Module):
        net = model
    elif weights is not None:
        net = load_model(weights, device)
    else:
        net = load_pretrained(model, 4 if scale is None else scale, device, weights_dir)
    if scale is not None and getattr(net, "scale", None) != scale:
        src = weights or getattr(net, "arch_name", type(net).__name__)
        raise ValueError(f"{src}: the model upscales x{getattr(net, 'scale', '?')}, not x{scale}")
    from ..kernels import prepare_for_inference
    return prepare_for_inference(net.to(device))  # eval mode, fused CPU kernels


@register_backend("onnxruntime")
def _onnxruntime_backend(**kwargs):
    """The network exported to ONNX and run by onnxruntime (``engine.onnx_backend``,
    imported only when asked for)."""
    from .onnx_backend import onnxruntime_backend
    return onnxruntime_backend(**kwargs)


class Bicubic(torch.nn.Module):
    """MATLAB's ``imresize(I, s, 'bicubic')`` enlargement as a runner (``--model bicubic``):
    the taps of ``distillsr.data.imresize``, rows first, in the input's float type. As MATLAB
    does for images of integer type, the first pass is clipped to [0, 1] before the second;
    MATLAB's rounding of that pass to 8 bits is not done, so 8-bit results are within one
    level of ``imresize`` on uint8 data."""

    arch_name = BICUBIC

    def __init__(self, scale: int):
        super().__init__()
        if not isinstance(scale, int) or scale < 1:
            raise ValueError(f"bicubic: scale must be a positive integer, got {scale!r}")
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from ..data.imresize import resize_weights
        for axis in (-2, -1):  # equal scales: rows first, as MATLAB
            n = x.shape[axis]
            idx, w = resize_weights(n, n * self.scale, float(self.scale))
            idx = torch.from_numpy(np.array(idx)).to(x.device)
            w = torch.from_numpy(np.array(w)).to(device=x.device, dtype=x.dtype)
            shape = (-1, 1) if axis == -2 else (-1,)
            acc = x.index_select(axis, idx[:, 0]) * w[:, 0].reshape(shape)
            for k in range(1, idx.shape[1]):
                acc += x.index_select(axis, idx[:, k]) * w[:, k].reshape(shape)
            x = acc.clamp_(0, 1) if axis == -2 else acc
        return x


def is_onnx_file(weights: Union[str, os.PathLike, None]) -> bool:
    """A weights path that names an ONNX export (by its ``.onnx`` extension)."""
    return weights is not None and Path(weights).suffix.lower() == ".onnx"


def load_runner(model: Union[str, torch.nn.Module, None] = None, scale: Optional[int] = None, *,
                weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                backend: Optional[str] = None, weights_dir=None) -> Runner:
    """Build the runner: a pretrained name (or ``"bicubic"``), a checkpoint or ``.onnx`` file,
    or a module. ``backend`` None: ``onnxruntime`` for a ``.onnx`` file, else ``torch``."""
    if isinstance(model, str) and model.lower() == BICUBIC:
        if weights is not None or backend not in (None, "torch"):
            raise ValueError("bicubic is a plain resize run by torch: it takes no weights and no backend")
        return Bicubic(4 if scale is None else scale).to(device)
    if backend is None:
        backend = "onnxruntime" if is_onnx_file(weights) else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    if backend == "torch" and is_onnx_file(weights):
        raise ValueError(f"{weights}: an ONNX file runs with the onnxruntime backend, not torch")
    runner = BACKENDS[backend](model=model, scale=scale, weights=weights, device=device,
                               weights_dir=weights_dir)
    if runner is not model:  # name what was loaded (the caller's own module is left as it is)
        try:
            runner.distillsr_source = str(weights) if weights is not None else (model or None)
        except AttributeError:
            pass
    return runner


def weights_digest(model: torch.nn.Module) -> str:
    """sha256 (hex) of a network's weights: its state dict in key order, as float32, and its
    pixel range."""
    h = hashlib.sha256()
    for k, v in sorted(model.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    h.update(repr(getattr(model, "pixel_range", "")).encode())
    return h.hexdigest()


def runner_identity(runner: Runner) -> Tuple[str, str]:
    """``(label, identity)`` of a runner: the label names it for people (the weights' name or
    file, else the architecture); the identity is the same only for the same computation
    (``bicubic``, or a sha256 of the weights or of the ONNX file)."""
    arch = getattr(runner, "arch_name", type(runner).__name__)
    label = getattr(runner, "distillsr_source", None) or arch
    if isinstance(runner, Bicubic):
        return BICUBIC, BICUBIC
    if isinstance(runner, torch.nn.Module):
        return str(label), f"{arch}:{weights_digest(runner)}"
    path = getattr(runner, "path", None)
    if path is not None and Path(path).is_file():
        from ..pretrained import sha256_file
        return str(label), f"{arch}:file:{sha256_file(path)}"
    return str(label), f"{arch}:{type(runner).__qualname__}"
