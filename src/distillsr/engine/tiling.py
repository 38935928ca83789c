"""Tile planning for ``tile="auto"``: the largest tile whose forward pass fits in the memory
the device has free (see ``engine.memory`` for the measurement, ``engine.device`` for the
free memory)."""
from __future__ import annotations

import math
from typing import Optional, Union

import torch

from .backends import Runner
from .device import available_memory
from .memory import estimate_memory

__all__ = ["choose_tile", "DEFAULT_OVERLAP", "DEFAULT_BLEND", "MIN_AUTO_TILE", "MAX_AUTO_TILE",
           "MEMORY_FRACTION"]

DEFAULT_OVERLAP = 24         # LR pixels shared by neighbouring tiles (as the ASID release)
DEFAULT_BLEND = "feather"    # how overlapping tile outputs are combined (see engine.infer)
MIN_AUTO_TILE = 64
MAX_AUTO_TILE = 2048
MEMORY_FRACTION = 0.5        # share of the free memory that tile="auto" plans to use


def choose_tile(runner: Runner, height: int, width: int, device: Union[str, torch.device],
                overlap: int = DEFAULT_OVERLAP, budget: Optional[int] = None,
                safety: float = 1.5) -> Optional[int]:
    """Tile size (LR pixels) for ``tile="auto"``; ``None`` when the whole image fits.

    ``budget`` is the memory the forward pass may use (default: half of what the device
    has free); the measured estimate is multiplied by ``safety`` for allocator overheads.
    """
    est = estimate_memory(runner, device)
    if budget is None:
        budget = int(MEMORY_FRACTION * available_memory(device))
    if safety * est.bytes_for(height * width) <= budget:
        return None
    side = math.sqrt(max(budget / safety - est.fixed, 0.0) / est.per_pixel)
    lo = max(MIN_AUTO_TILE, 2 * overlap + 8)
    return int(min(MAX_AUTO_TILE, max(lo, side)) // 8 * 8)
