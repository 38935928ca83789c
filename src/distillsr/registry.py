"""Model registry: every architecture registers a builder under a name.

``create_model(name, scale, **options)`` is the one way to build a network; the
checkpoint loader and the CLI go through it too.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Dict, List, Sequence

import torch.nn as nn

__all__ = ["register_model", "create_model", "list_models", "model_info", "ModelInfo"]


@dataclass(frozen=True)
class ModelInfo:
    name: str
    builder: Callable[..., nn.Module]
    scales: Sequence[int] = (2, 3, 4)
    paper: str = ""
    description: str = ""
    defaults: Dict[str, object] = field(default_factory=dict)


_REGISTRY: Dict[str, ModelInfo] = {}


def register_model(name: str, *, scales: Sequence[int] = (2, 3, 4), paper: str = "",
                   description: str = "", **defaults):
    """Decorator: ``@register_model("asid")`` on a function ``f(scale, **opts) -> Module``."""
    key = name.lower()

    def deco(fn):
        if key in _REGISTRY:
            raise ValueError(f"model name {name!r} is registered twice")
        _REGISTRY[key] = ModelInfo(key, fn, tuple(scales), paper, description, dict(defaults))
        return fn

    return deco


def _ensure_loaded() -> None:
    # importing the models package registers every built-in architecture
    from . import models  # noqa: F401


def list_models() -> List[str]:
    _ensure_loaded()
    return sorted(_REGISTRY)


def model_info(name: str) -> ModelInfo:
    _ensure_loaded()
    key = name.lower()
    if key not in _REGISTRY:
        raise KeyError(f"unknown model {name!r}; known models: {', '.join(sorted(_REGISTRY))}")
    return _REGISTRY[key]


def create_model(name: str, scale: int, **options) -> nn.Module:
    """Build a registered network for upscaling factor ``scale``.

    The returned module takes an NCHW float RGB batch in [0, 1] and returns the
    x``scale`` result in (about) the same range; it is not clamped.
    """
    info = model_info(name)
    if not isinstance(scale, int) or isinstance(scale, bool):
        raise TypeError(f"scale must be an int, got {scale!r}")
    if scale not in info.scales:
        raise ValueError(f"model {info.name!r} supports scales {list(info.scales)}, not x{scale}")
    model = info.builder(scale, **options)
    # remembered so that checkpoints can rebuild the same network
    model.arch_name = info.name
    model.arch_options = dict(options)
    return model
