"""Weight normalisation for training and its folding for inference.

Networks that were trained with weight normalisation (FDIWN) build their convs through
``weight_norm_conv``: with ``enabled=True`` the conv gets
``torch.nn.utils.parametrizations.weight_norm`` (weight = g * v / ||v||, norm per output
channel), so training behaves as in the paper; ``fold_weight_norm`` replaces g and v by
the plain weight they define, which is what inference needs.

One conv can meet three state-dict layouts for its weight:

* ``weight_g`` / ``weight_v`` — the legacy ``torch.nn.utils.weight_norm`` (the authors'
  releases),
* ``parametrizations.weight.original0`` / ``original1`` — the parametrization (g, v),
* ``weight`` — folded.

A load hook on each such conv converts whichever layout arrives into the one the conv
has now: g, v are folded with the same kernel torch uses (``torch._weight_norm``, so the
result is bit-identical to the un-folded module), and a plain weight w becomes
g = ||w||, v = w, which defines the same weight. A checkpoint therefore loads whether or
not it, or the model, uses weight normalisation.
"""
from __future__ import annotations

from typing import Dict

import torch
import torch.nn as nn
from torch.nn.utils import parametrize
from torch.nn.utils.parametrizations import weight_norm as _parametrize_weight_norm

__all__ = ["weight_norm_conv", "fold_weight_norm", "fold_g_v", "has_weight_norm"]

_G, _V = "parametrizations.weight.original0", "parametrizations.weight.original1"
_LEGACY_G, _LEGACY_V = "weight_g", "weight_v"


def fold_g_v(g: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """The weight g * v / ||v|| (norm over all dims but 0), computed as torch does."""
    return torch._weight_norm(v, g, 0)


def _any_layout_hook(module: nn.Module, sd: Dict[str, torch.Tensor], prefix: str, *_) -> None:
    g_v = None
    for g_name, v_name in ((_LEGACY_G, _LEGACY_V), (_G, _V)):
        if prefix + g_name in sd and prefix + v_name in sd:
            g_v = sd.pop(prefix + g_name), sd.pop(prefix + v_name)
            break
    if parametrize.is_parametrized(module, "weight"):
        if g_v is None and prefix + "weight" in sd:
            w = sd.pop(prefix + "weight")
            g_v = torch.norm_except_dim(w, 2, 0), w
        if g_v is not None:
            sd[prefix + _G], sd[prefix + _V] = g_v
    elif g_v is not None and prefix + "weight" not in sd:
        sd[prefix + "weight"] = fold_g_v(*g_v)


def weight_norm_conv(conv: nn.Conv2d, enabled: bool = True) -> nn.Conv2d:
    """Give ``conv`` weight normalisation (if ``enabled``) and a loader for all three layouts."""
    if enabled:
        conv = _parametrize_weight_norm(conv, name="weight", dim=0)
    conv.register_load_state_dict_pre_hook(_any_layout_hook)
    conv.weight_normalised = True  # kept when folded: cost counters report these convs apart
    return conv


def has_weight_norm(model: nn.Module) -> bool:
    return any(parametrize.is_parametrized(m, "weight") for m in model.modules())


def fold_weight_norm(model: nn.Module) -> int:
    """Replace every weight-norm parametrization by its current weight; returns how many."""
    n = 0
    for m in model.modules():
        if parametrize.is_parametrized(m, "weight"):
            parametrize.remove_parametrizations(m, "weight", leave_parametrized=True)
            n += 1
    return n
