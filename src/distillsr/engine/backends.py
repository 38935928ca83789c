"""What runs the network for ``distillsr upscale``: the backend registry and :func:`load_runner`.

A *runner* is called on an N x 3 x h x w float tensor in [0, 1] on its device and returns the
N x 3 x h*s x w*s result; it has an int attribute ``scale``. Backends are factories
``factory(model, scale, weights, device, weights_dir) -> runner`` registered by name with
:func:`register_backend`; ``torch`` is built in, ``onnxruntime`` is imported when asked for.
"""
from __future__ import annotations

import os
from typing import Callable, Dict, Optional, Union

import torch

__all__ = ["Runner", "BACKENDS", "register_backend", "load_runner"]

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
    return net.to(device).eval()


@register_backend("onnxruntime")
def _onnxruntime_backend(**kwargs):
    """The network exported to ONNX and run by onnxruntime (``engine.onnx_backend``,
    imported only when asked for)."""
    from .onnx_backend import onnxruntime_backend
    return onnxruntime_backend(**kwargs)


def load_runner(model: Union[str, torch.nn.Module, None] = None, scale: Optional[int] = None, *,
                weights: Union[str, os.PathLike, None] = None, device: Union[str, torch.device] = "cpu",
                backend: str = "torch", weights_dir=None) -> Runner:
    """Build the network runner: a pretrained name, a checkpoint file or a module."""
    if backend not in BACKENDS:
        raise ValueError(f"unknown backend {backend!r}; available: {', '.join(sorted(BACKENDS))}")
    return BACKENDS[backend](model=model, scale=scale, weights=weights, device=device,
                             weights_dir=weights_dir)
