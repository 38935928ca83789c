"""Small parameter-free operations shared by the CNN families."""
from __future__ import annotations

import torch


def spatial_std(x: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation over H x W (population, no epsilon), shape N x C x 1 x 1."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view C as (groups, C / groups), transpose, flatten."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
