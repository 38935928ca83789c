"""Common base of all networks: the [0, 1] pixel convention of the public API."""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn as nn


class SRNet(nn.Module):
    """A super-resolution network whose public ``forward`` works on [0, 1] RGB.

    Subclasses implement ``forward_native`` in the pixel range their weights were
    trained with (``pixel_range``): (0, 1) for our own weights, (-1, 1) for the
    released ASID checkpoints, (0, 255) for RFDN and FDIWN. ``forward`` maps
    [0, 1] input into that range and the output back, so every model, ours or
    the authors', is used the same way.
    """

    scale: int = 1
    pixel_range: Tuple[float, float] = (0.0, 1.0)

    def set_pixel_range(self, lo: float, hi: float) -> "SRNet":
        if not hi > lo:
            raise ValueError(f"pixel range needs hi > lo, got ({lo}, {hi})")
        self.pixel_range = (float(lo), float(hi))
        return self

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        lo, hi = self.pixel_range
        if (lo, hi) == (0.0, 1.0):
            return self.forward_native(x)
        y = self.forward_native(x * (hi - lo) + lo)
        return (y - lo) / (hi - lo)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
