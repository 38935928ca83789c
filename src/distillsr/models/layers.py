"""Small layers and operations shared by the CNN families (RFDN, FDIWN)."""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

LRELU_SLOPE = 0.05  # the LeakyReLU slope of both releases


def lrelu(x: torch.Tensor) -> torch.Tensor:
    return F.leaky_relu(x, LRELU_SLOPE)


def conv(cin: int, cout: int, k: int, **kw) -> nn.Conv2d:
    """A "same" convolution (zero padding k // 2); ``kw`` as nn.Conv2d (bias, groups, ...)."""
    return nn.Conv2d(cin, cout, k, padding=k // 2, **kw)


def spatial_std(x: torch.Tensor) -> torch.Tensor:
    """Per-channel standard deviation over H x W (population, no epsilon), shape N x C x 1 x 1."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    return (x - mean).pow(2).mean(dim=(2, 3), keepdim=True).sqrt()


def channel_shuffle(x: torch.Tensor, groups: int) -> torch.Tensor:
    """ShuffleNet channel shuffle: view C as (groups, C / groups), transpose, flatten."""
    n, c, h, w = x.shape
    return x.reshape(n, groups, c // groups, h, w).transpose(1, 2).reshape(n, c, h, w)
