"""RFDN and E-RFDN: "Residual Feature Distillation Network for Lightweight Image
Super-Resolution" (Liu, Tang, Wu; ECCV 2020 workshops / AIM 2020 efficient SR winner).

The network chains residual feature distillation blocks (RFDB). Each RFDB runs three
shallow residual blocks (SRB); before each SRB a 1x1 feature distillation connection
(FDC) keeps a narrow "distilled" copy of the running features; a last 3x3 conv distils
what is left, a 1x1 conv fuses the four distilled streams, and an attention layer
reweights the result:

* ``e-rfdn`` — the challenge model released as ``RFDN_AIM.pth``: 50 channels, 4 RFDBs,
  enhanced spatial attention (ESA, from RFANet) in each block; 433,448 parameters at x4.
* ``rfdn`` — the paper's RFDN: 48 channels, 6 RFDBs, contrast-aware channel attention
  (CCA, from IMDN) in each block; 534,036 / 540,531 / 549,624 parameters at x2/x3/x4.
  No code or weights were released for it; the attention choice is the one that
  reproduces the paper's parameter counts exactly (see docs: CCA after the fusion conv,
  reduction 4).

Pixel range: the authors train and test on RGB in 0..255 with no mean shift, so
``forward_native`` works on 0..255 and ``pixel_range`` is (0, 255) by default, for the
released weights and for weights trained with this package alike. ``forward`` takes and
returns [0, 1] as every model in the package.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model
from .base import SRNet
from .layers import conv, lrelu, spatial_std

__all__ = ["SRB", "ESA", "CCA", "RFDB", "RFDN", "ESA_MIN_SIZE"]

class SRB(nn.Module):
    """Shallow residual block: a 3x3 conv with an identity connection, then LeakyReLU."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = conv(channels, channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return lrelu(self.conv(x) + x)


# ESA's strided conv (k3, s2, no padding) followed by a 7x7 max pool with stride 3 needs
# at least 15 pixels in each dimension.
ESA_MIN_SIZE = 15


class ESA(nn.Module):
    """Enhanced spatial attention (from RFANet): a spatial mask computed at low resolution.

    1x1 reduction to f = channels // 4, strided conv and max pooling for a large
    receptive field, a conv group, bilinear upsampling back, a 1x1 skip from the reduced
    features, a 1x1 expansion and a sigmoid.

    Inputs smaller than 15 pixels in a dimension (which the original cannot process) are
    extended to 15 by replicating the last row/column of the reduced features before the
    strided conv; the mask is computed for the extended size and cropped back. Inputs of
    15 pixels or more take exactly the original path, so results there are unchanged.
    Replicate (not zero) padding is used because the branch takes a max pool: zeros would
    inject a value that the real features do not contain.
    """

    def __init__(self, channels: int):
        super().__init__()
        f = channels // 4
        self.reduce = nn.Conv2d(channels, f, 1)
        self.skip = nn.Conv2d(f, f, 1)
        self.down = nn.Conv2d(f, f, 3, stride=2, padding=0)
        self.pool_conv = conv(f, f, 3)
        self.group_conv1 = conv(f, f, 3)
        self.group_conv2 = conv(f, f, 3)
        self.expand = nn.Conv2d(f, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        c1 = self.reduce(x)
        ph, pw = max(0, ESA_MIN_SIZE - h), max(0, ESA_MIN_SIZE - w)
        c1_big = F.pad(c1, (0, pw, 0, ph), mode="replicate") if ph or pw else c1
        y = self.down(c1_big)
        y = F.max_pool2d(y, kernel_size=7, stride=3)
        y = F.relu(self.pool_conv(y))
        y = F.relu(self.group_conv1(y))
        y = self.group_conv2(y)
        y = F.interpolate(y, size=c1_big.shape[-2:], mode="bilinear", align_corners=False)
        y = y[..., :h, :w]
        mask = torch.sigmoid(self.expand(y + self.skip(c1)))
        return x * mask


class CCA(nn.Module):
    """Contrast-aware channel attention (IMDN): contrast -> 1x1 squeeze -> ReLU -> 1x1 -> sigmoid."""

    def __init__(self, channels: int, reduction: int = 4):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, channels // reduction, 1)
        self.excite = nn.Conv2d(channels // reduction, channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        contrast = spatial_std(x) + x.mean(dim=(2, 3), keepdim=True)
        w = torch.sigmoid(self.excite(F.relu(self.squeeze(contrast))))
        return x * w


class RFDB(nn.Module):
    """Residual feature distillation block.

    Three stages: a feature distillation connection (FDC, 1x1 conv to half the width)
    keeps distilled features, a shallow residual block (SRB) refines the rest; a last 3x3
    conv distils the refined features; the four distilled streams are concatenated, fused
    by a 1x1 conv and reweighted by the attention layer (ESA or CCA). As in the released
    code there is no activation after the fusion conv and no block-level residual.
    """

    def __init__(self, channels: int, attention: str = "esa"):
        super().__init__()
        distilled = channels // 2
        self.fdc = nn.ModuleList(nn.Conv2d(channels, distilled, 1) for _ in range(3))
        self.srb = nn.ModuleList(SRB(channels) for _ in range(3))
        self.last = conv(channels, distilled, 3)
        self.fuse = nn.Conv2d(4 * distilled, channels, 1)
        if attention == "esa":
            self.attention = ESA(channels)
        elif attention == "cca":
            self.attention = CCA(channels)
        else:
            raise ValueError(f"RFDB attention must be 'esa' or 'cca', not {attention!r}")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        distilled = []
        for fdc, srb in zip(self.fdc, self.srb):
            distilled.append(lrelu(fdc(x)))
            x = srb(x)
        distilled.append(lrelu(self.last(x)))
        return self.attention(self.fuse(torch.cat(distilled, dim=1)))


class RFDN(SRNet):
    """Shallow conv, chained RFDBs, 1x1 fusion of all block outputs, 3x3 conv with a global
    residual, and a pixel-shuffle upsampler (one 3x3 conv to 3 * scale^2 channels)."""

    def __init__(self, scale: int, channels: int = 50, blocks: int = 4, attention: str = "esa",
                 pixel_range=(0.0, 255.0)):
        super().__init__()
        self.scale = scale
        self.head = conv(3, channels, 3)
        self.blocks = nn.ModuleList(RFDB(channels, attention) for _ in range(blocks))
        self.fuse = nn.Conv2d(blocks * channels, channels, 1)
        self.lr_conv = conv(channels, channels, 3)
        self.upsampler = nn.Sequential(conv(channels, 3 * scale * scale, 3), nn.PixelShuffle(scale))
        self.set_pixel_range(*pixel_range)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        shallow = self.head(x)
        outs, feat = [], shallow
        for block in self.blocks:
            feat = block(feat)
            outs.append(feat)
        fused = lrelu(self.fuse(torch.cat(outs, dim=1)))
        return self.upsampler(self.lr_conv(fused) + shallow)


@register_model("rfdn", paper="RFDN (Liu et al., AIM 2020 / ECCV-W 2020)",
                description="paper RFDN: 48 channels, 6 RFDBs with CCA (no released weights)")
def _rfdn(scale: int, channels: int = 48, blocks: int = 6, attention: str = "cca") -> RFDN:
    return RFDN(scale, channels, blocks, attention)


@register_model("e-rfdn", paper="E-RFDN (AIM 2020 efficient SR challenge winner)",
                description="released RFDN_AIM model: 50 channels, 4 RFDBs with ESA (x4 weights)")
def _e_rfdn(scale: int, channels: int = 50, blocks: int = 4, attention: str = "esa") -> RFDN:
    return RFDN(scale, channels, blocks, attention)
