"""FDIWN and FDIWN-M: "Feature Distillation Interaction Weighting Network for Lightweight
Image Super-Resolution" (Gao, Li, Li, Wu, Lu, Yu; AAAI 2022).

The backbone is a series of feature shuffle weighted groups (FSWG); each FSWG holds three
wide-residual distillation interaction blocks (WDIB). A WDIB runs two interacting paths
built from wide identical residual weighting units (WIRW, identity shortcut) and wide
convolutional residual weighting units (WCRW, conv shortcut), distils half of the
channels of each path to gate the other, and merges the paths with a self-calibration
fusion (SCF) unit. Every wide unit ends in shuffle attention (SA-Net). The FSWGs are
wired by the wide-residual distillation connection (WRDC): each application adds its
output to a running sum that the next one reads. The trunk is 24 channels wide at every
scale; the scales differ only in the wide units' expansion and the reconstruction width.

Names of the released code, for reading it side by side: ``MODEL`` = FDIWN, ``Li`` =
FSWG, ``MY`` = WDIB, ``SRBW1`` = WIRW, ``SRBW`` = WCRW, ``SRBW2`` + ``fuse2`` = SCF,
``sa_layer`` = shuffle attention; ``distillsr.convert.fdiwn`` maps the keys.

``fdiwn``: three FSWG parameter sets applied six times (sets 1, 1, 2, 3, 2, 3):
629,176 / 646,486 / 663,848 parameters at x2/x3/x4, as the released checkpoints.
``fdiwn-m``: no code or weights were released; we read it as two FSWG parameter sets
applied four times (sets 1, 1, 2, 2), everything else unchanged, which gives the
published 446K (x3) and 454K (x4) exactly (446,814 / 454,648). At x2 the same reading
gives 429,504, 3.5K below the published 433K; we keep that reading at x2 too (the x2
difference is not known).

Pixel range: the authors work on RGB in 0..255; their mean-shift layers are ordinary,
trained 1x1 convs here (``sub_mean``, ``add_mean``), so the released weights load as they
are. ``pixel_range`` is (0, 255) by default, also for weights trained with this package.

Weight normalisation: the wide units' convs are weight-normalised as in the release
(``weight_norm=True``, the default, for training); ``fold_weight_norm()`` turns them into
plain convs for inference, with bit-identical outputs. Checkpoints load in either layout
(see ``distillsr.models.weight_norm``).
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn as nn

from ..registry import register_model
from .base import SRNet
from .layers import channel_shuffle, conv, lrelu, spatial_std
from .weight_norm import fold_weight_norm, weight_norm_conv

__all__ = ["Scale", "ShuffleAttention", "CoffConv", "WIRW", "WCRW", "SCF", "WDIB", "FSWG",
           "FDIWN", "FDIWN_SCHEDULE", "FDIWN_M_SCHEDULE"]

C = 24  # trunk width at every scale: 3 * n_feats // 8 with n_feats = 64

# FSWG parameter set used by each application along the WRDC
FDIWN_SCHEDULE = (0, 0, 1, 2, 1, 2)
FDIWN_M_SCHEDULE = (0, 0, 1, 1)


class Scale(nn.Module):
    """Multiplication by one learnable scalar (the "weighting" in the units' names)."""

    def __init__(self, init: float):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor([float(init)]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.scale


class ShuffleAttention(nn.Module):
    """SA-Net shuffle attention: in each of ``groups`` channel groups, half the channels get
    channel attention (global mean), half spatial attention (per-channel GroupNorm), each
    an affine map and a sigmoid gate; then a channel shuffle with 2 groups."""

    def __init__(self, channels: int, groups: int = 6):
        super().__init__()
        self.groups = groups
        half = channels // (2 * groups)
        self.cweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.cbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.sweight = nn.Parameter(torch.zeros(1, half, 1, 1))
        self.sbias = nn.Parameter(torch.ones(1, half, 1, 1))
        self.gn = nn.GroupNorm(half, half)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, c, h, w = x.shape
        xc, xs = x.reshape(n * self.groups, c // self.groups, h, w).chunk(2, dim=1)
        xc = xc * torch.sigmoid(self.cweight * xc.mean(dim=(2, 3), keepdim=True) + self.cbias)
        xs = xs * torch.sigmoid(self.sweight * self.gn(xs) + self.sbias)
        return channel_shuffle(torch.cat([xc, xs], dim=1).reshape(n, c, h, w), 2)


class CoffConv(nn.Module):
    """Per-channel weighting coefficients: the mean of a branch on the global mean and a
    branch on the spatial standard deviation (each 1x1 squeeze, ReLU, 1x1, ReLU, sigmoid,
    so the coefficients lie in [0.5, 1))."""

    def __init__(self, channels: int, reduction: int = 8):
        super().__init__()

        def branch():
            return nn.Sequential(nn.Conv2d(channels, channels // reduction, 1), nn.ReLU(),
                                 nn.Conv2d(channels // reduction, channels, 1), nn.ReLU(), nn.Sigmoid())

        self.from_mean = branch()
        self.from_std = branch()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (self.from_mean(x.mean(dim=(2, 3), keepdim=True)) + self.from_std(spatial_std(x))) / 2


class _WideUnit(nn.Module):
    """Wide residual weighting: weight-normalised 1x1 expansion, ReLU, 1x1 reduction, 3x3
    conv, shuffle attention; output = res_scale * body(x) + x_scale * shortcut(x)."""

    def __init__(self, cin: int, wide: int, mid: int, cout: int, shortcut: bool, weight_norm: bool):
        super().__init__()
        self.body = nn.Sequential(
            weight_norm_conv(conv(cin, wide, 1), weight_norm), nn.ReLU(),
            weight_norm_conv(conv(wide, mid, 1), weight_norm),
            weight_norm_conv(conv(mid, cout, 3), weight_norm))
        self.attention = ShuffleAttention(cout)
        self.shortcut = conv(cin, cout, 3) if shortcut else nn.Identity()
        self.res_scale = Scale(1)
        self.x_scale = Scale(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.res_scale(self.attention(self.body(x))) + self.x_scale(self.shortcut(x))


class WIRW(_WideUnit):
    """Wide identical residual weighting unit (identity shortcut), C -> C."""

    def __init__(self, wide: int, weight_norm: bool = True):
        super().__init__(C, wide, C // 2, C, shortcut=False, weight_norm=weight_norm)


class WCRW(_WideUnit):
    """Wide convolutional residual weighting unit (3x3 conv shortcut), C/2 -> C."""

    def __init__(self, wide: int, weight_norm: bool = True):
        super().__init__(C // 2, wide, C // 2, C, shortcut=True, weight_norm=weight_norm)


class SCF(nn.Module):
    """Self-calibration fusion of the two WDIB paths: a wide unit on their concatenation,
    plus the b-path output gated by a sigmoid of a 1x1 conv of the concatenation."""

    def __init__(self, wide: int, weight_norm: bool = True):
        super().__init__()
        self.fuse = _WideUnit(2 * C, wide, C, C, shortcut=True, weight_norm=weight_norm)
        self.gate = nn.Conv2d(2 * C, C, 1, bias=False)

    def forward(self, z: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return self.fuse(z) + torch.sigmoid(self.gate(z)) * b


class WDIB(nn.Module):
    """Wide-residual distillation interaction block: paths a and b each refine with a WIRW,
    distil half their channels and widen the other half with a WCRW; the paths exchange
    CoffConv-weighted features twice, the distilled halves gate the other path, a second
    WIRW refines each path, and SCF fuses them (plus the block input) before shuffle
    attention."""

    def __init__(self, wide_wirw: int, wide_wcrw: int, wide_scf: int, weight_norm: bool = True):
        super().__init__()
        self.wirw_a1, self.wirw_b1 = WIRW(wide_wirw, weight_norm), WIRW(wide_wirw, weight_norm)
        self.wcrw_a, self.wcrw_b = WCRW(wide_wcrw, weight_norm), WCRW(wide_wcrw, weight_norm)
        self.coff_a1, self.coff_b1 = CoffConv(C), CoffConv(C)
        self.coff_a2, self.coff_b2 = CoffConv(C), CoffConv(C)
        self.gate_b = conv(C // 2, C, 3, bias=False)  # distilled a-features gate path b
        self.gate_a = conv(C // 2, C, 3, bias=False)  # distilled b-features gate path a
        self.wirw_a2, self.wirw_b2 = WIRW(wide_wirw, weight_norm), WIRW(wide_wirw, weight_norm)
        self.scale_a, self.scale_b = Scale(1), Scale(1)
        self.scf = SCF(wide_scf, weight_norm)
        self.attention = ShuffleAttention(C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        da, ra = lrelu(self.wirw_a1(x)).chunk(2, dim=1)  # distilled, remaining
        a = self.wcrw_a(ra)
        b_in = self.coff_a1(a) * a + x                      # first interaction
        a = self.coff_b1(x) * x + a
        db, rb = lrelu(self.wirw_b1(b_in)).chunk(2, dim=1)
        b = self.wcrw_b(rb)
        b, a = ((self.coff_a2(a) * a + b) * torch.sigmoid(self.gate_b(db)),  # second interaction
                (self.coff_b2(b) * b + a) * torch.sigmoid(self.gate_a(da)))
        a, b = self.wirw_a2(a), self.wirw_b2(b)
        z = torch.cat([self.scale_a(a), self.scale_b(b)], dim=1)
        return self.attention(self.scf(z, b) + x)


class FSWG(nn.Module):
    """Feature shuffle weighted group: three WDIBs (the third reads the second's output plus
    a 3x3 conv of the first's), two channel-shuffle + grouped-conv fusions of their outputs,
    and a weighted sum with a WIRW of the group input."""

    def __init__(self, wide_wirw: int, wide_wcrw: int, wide_scf: int, weight_norm: bool = True):
        super().__init__()
        self.wdib = nn.ModuleList(WDIB(wide_wirw, wide_wcrw, wide_scf, weight_norm) for _ in range(3))
        self.conv = conv(C, C, 3, bias=False)
        self.shuffle_conv1 = conv(2 * C, C, 3, bias=False, groups=4)
        self.shuffle_conv2 = conv(2 * C, C, 3, bias=False, groups=4)
        self.wirw = WIRW(wide_wirw, weight_norm)
        self.scale_x, self.scale_res = Scale(0.5), Scale(0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        o1 = self.wdib[0](x)
        o2 = self.wdib[1](o1)
        o3 = self.wdib[2](o2 + self.conv(o1))
        g = self.shuffle_conv1(channel_shuffle(torch.cat([o1, o2], dim=1), 4))
        g = self.shuffle_conv2(channel_shuffle(torch.cat([g, o3], dim=1), 4))
        return self.scale_x(g + o3) + self.scale_res(self.wirw(x))


# per scale: (WIRW, WCRW, SCF expanded widths), reconstruction width
_WIDTHS = {2: ((48, 48, 96), 64), 3: ((48, 48, 96), 64), 4: ((60, 54, 108), 32)}


class FDIWN(SRNet):
    """Learned mean shift, 3x3 head, FSWGs along the WRDC, and two pixel-shuffle branches
    (from the deep features and from the input) summed before the output mean shift."""

    def __init__(self, scale: int, schedule: Sequence[int] = FDIWN_SCHEDULE, weight_norm: bool = True,
                 pixel_range=(0.0, 255.0)):
        super().__init__()
        if scale not in _WIDTHS:
            raise ValueError(f"FDIWN supports x2, x3, x4, not x{scale}")
        schedule = tuple(int(i) for i in schedule)
        if not schedule or min(schedule) < 0:
            raise ValueError(f"schedule must list FSWG indices >= 0, got {schedule}")
        self.scale, self.schedule = scale, schedule
        widths, tail = _WIDTHS[scale]
        self.sub_mean = nn.Conv2d(3, 3, 1)  # trained, like every other layer (see module doc)
        self.head = conv(3, C, 3)
        self.fswg = nn.ModuleList(FSWG(*widths, weight_norm) for _ in range(max(schedule) + 1))
        self.tail = nn.Sequential(conv(C, tail, 3, bias=False), conv(tail, 3 * scale * scale, 3),
                                  nn.PixelShuffle(scale))
        self.skip = nn.Sequential(conv(3, tail, 3), conv(tail, 3 * scale * scale, 3), nn.PixelShuffle(scale))
        self.add_mean = nn.Conv2d(3, 3, 1)
        # the release feeds the mean-shifted input to the skip branch only at x4
        self.skip_after_mean_shift = scale == 4
        self._init_mean_shift()
        self.set_pixel_range(*pixel_range)

    def _init_mean_shift(self, rgb_mean=(0.4488, 0.4371, 0.4040), rgb_range: float = 255.0) -> None:
        with torch.no_grad():
            for layer, sign in ((self.sub_mean, -1.0), (self.add_mean, 1.0)):
                layer.weight.copy_(torch.eye(3).reshape(3, 3, 1, 1))
                layer.bias.copy_(sign * rgb_range * torch.tensor(rgb_mean))

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        shifted = self.sub_mean(x)
        h = self.fswg[self.schedule[0]](self.head(shifted))
        for i in self.schedule[1:]:  # WRDC: each FSWG reads and extends the running sum
            h = h + self.fswg[i](h)
        skip = self.skip(shifted if self.skip_after_mean_shift else x)
        return self.add_mean(self.tail(h) + skip)

    def fold_weight_norm(self) -> "FDIWN":
        """Make every weight-normalised conv a plain conv (same outputs); for inference."""
        fold_weight_norm(self)
        if hasattr(self, "arch_options"):
            self.arch_options = {**self.arch_options, "weight_norm": False}
        return self


@register_model("fdiwn", paper="FDIWN (Gao et al., AAAI 2022)",
                description="3 FSWG parameter sets applied 6 times; released weights x2/x3/x4")
def _fdiwn(scale: int, weight_norm: bool = True) -> FDIWN:
    return FDIWN(scale, FDIWN_SCHEDULE, weight_norm)


@register_model("fdiwn-m", paper="FDIWN-M (Gao et al., AAAI 2022)",
                description="2 FSWG parameter sets applied 4 times (our reading; no released code)")
def _fdiwn_m(scale: int, weight_norm: bool = True, schedule: Sequence[int] = FDIWN_M_SCHEDULE) -> FDIWN:
    return FDIWN(scale, schedule, weight_norm)
