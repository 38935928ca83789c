"""ASID: Attention-Sharing Information Distillation transformer (Park et al., AAAI 2025).

The network, in the paper's terms (Eq. 1-3):

    F0 = head(I_LR)                       shallow 3x3 conv
    F_i = IDB_i(F_{i-1}),  i = 1..N       information distillation blocks
    I_SR = upsampler(fuse(F_N) + F0)      3x3 conv, conv + pixel shuffle

Each IDB distils features in three steps. Step k runs a local module (LM) and a
spatial attention module (SAM: a meso unit on 8x8 windows, then a global unit on a
sparse 8x8 grid spanning the image) and splits off a refined slice; a channel
attention module (CAM) finishes the block, followed by a 1x1 conv, the block
residual and ESA. The first IDB computes the six attention matrices (meso/global
for SAM1..3) and later IDBs reuse them ("attention sharing"): their SAM units only
project values, so they never compute queries, keys or a softmax.

Ablations of the paper (Tables 3 and 4, Fig. 7) are options: ``blocks`` (N),
``sharing`` ("inter", "intra", "none") and ``channel_split``; ``asid-baseline``
is the serial LM -> SAM -> CAM baseline.

The layer layout follows the authors' release exactly, so their checkpoints load
through ``distillsr.convert.asid``; this file uses our own names.

The modules here compute exactly what the paper describes, in training, inference and
export alike. Fast CPU inference is a separate, explicit step:
``model.prepare_for_inference()`` (see :func:`distillsr.kernels.prepare_for_inference`)
merges products that are exact algebraically and gives the modules their fused forms
(``distillsr.kernels.asid``); the results are the same to rounding.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_model
from .base import SRNet

WINDOW = 8  # side of the attention windows and grids (fixed in the release)
Matrices = List[Optional[torch.Tensor]]


# ----------------------------------------------------------------------------- layout
# Inside the network feature maps are NHWC tensors (B, H, W, C), contiguous (or a slice
# of the last dimension of one). Then a LayerNorm over channels needs no permute, a 1x1
# conv is one matrix product over the channel dimension, the 3x3 and depthwise convs
# run on the same memory seen as a channels_last NCHW tensor, and cutting a map into
# windows is a single copy. ``ASID.features`` converts at the entry and exit.

def _nchw(x: torch.Tensor) -> torch.Tensor:
    """NHWC -> NCHW view (channels_last strides; no copy)."""
    return x.permute(0, 3, 1, 2)


def _nhwc(y: torch.Tensor) -> torch.Tensor:
    """NCHW -> contiguous NHWC (no copy when ``y`` is channels_last)."""
    return y.permute(0, 2, 3, 1).contiguous()


def linear_nhwc(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``x W^T + b`` over the last dimension (a 1x1 conv of an NHWC map, or a linear layer
    on tokens); ``weight`` (out, in) or (out, in, 1, 1)."""
    w = weight.flatten(1)
    return F.linear(x.reshape(-1, x.shape[-1]), w, bias).view(*x.shape[:-1], w.shape[0])


class ConvNHWC(nn.Conv2d):
    """``nn.Conv2d`` on NHWC maps (same parameters, so checkpoints load unchanged); a 1x1
    conv is a product over the channels (and then also takes tokens (..., C))."""

    @property
    def pointwise(self) -> bool:
        return (self.kernel_size == (1, 1) and self.stride == (1, 1) and self.groups == 1
                and self.padding == (0, 0))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pointwise:
            return linear_nhwc(x, self.weight, self.bias)
        return _nhwc(F.conv2d(_nchw(x), self.weight, self.bias, self.stride, self.padding,
                              self.dilation, self.groups))


# ----------------------------------------------------------------------------- basics
class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel (eps 1e-6 as released); NHWC input."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GFN(nn.Module):
    """Gated conv feed-forward: 1x1 (d->2d), depthwise 3x3, GELU(x1) * x2, 1x1 (d->d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_in = ConvNHWC(dim, 2 * dim, 1, bias=False)
        self.dwconv = ConvNHWC(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=False)
        self.project_out = ConvNHWC(dim, dim, 1, bias=False)

    def forward(self, x):
        x1, x2 = self.dwconv(self.project_in(x)).chunk(2, dim=-1)
        return self.project_out(F.gelu(x1) * x2)


class SE(nn.Module):
    """Squeeze-excitation: global mean -> Linear(d, d/4) -> SiLU -> Linear -> sigmoid gate."""

    def __init__(self, dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, dim // 4, bias=False)
        self.fc2 = nn.Linear(dim // 4, dim, bias=False)

    def gate(self, mean: torch.Tensor) -> torch.Tensor:
        """(B, d) channel means -> (B, d) gate."""
        return torch.sigmoid(self.fc2(F.silu(self.fc1(mean))))

    def forward(self, x):
        return x * self.gate(x.mean(dim=(1, 2)))[:, None, None, :]


class LM(nn.Module):
    """Local module: residual MBConv with expansion 1 (1x1, GELU, dw 3x3, GELU, SE, 1x1)."""

    def __init__(self, dim: int):
        super().__init__()
        self.conv_in = ConvNHWC(dim, dim, 1)
        self.dwconv = ConvNHWC(dim, dim, 3, padding=1, groups=dim)
        self.se = SE(dim)
        self.conv_out = ConvNHWC(dim, dim, 1)

    def forward(self, x):
        y = F.gelu(self.dwconv(F.gelu(self.conv_in(x))))
        return x + self.conv_out(self.se(y))


# ----------------------------------------------------------------- window bookkeeping
# How a map is cut into groups of pixels. H = h * 8 is seen either as (h, 8) ("outer":
# the 8x8 windows) or as (8, h) ("inner": the sparse grid); the permutation of the 6-d
# view (B, ., ., ., ., C) puts the group dimensions first and the members next.
#   meso   8x8 window (i // 8, j // 8), member (i % 8, j % 8)          (spatial and channel)
#   global grid group (i % h, j % w), member (i // h, j // w)           (spatial)
#   grid   one group per in-window position (i % 8, j % 8), members are the windows (channel)
_LAYOUTS = {
    "meso": (True, (0, 1, 3, 2, 4, 5)),
    "global": (False, (0, 2, 4, 1, 3, 5)),
    "grid": (True, (0, 2, 4, 1, 3, 5)),
}


def _view6(x: torch.Tensor, kind: str) -> torch.Tensor:
    b, hh, ww, c = x.shape
    h, w = hh // WINDOW, ww // WINDOW
    outer, _ = _LAYOUTS[kind]
    return x.view(b, h, WINDOW, w, WINDOW, c) if outer else x.view(b, WINDOW, h, WINDOW, w, c)


def to_tokens(x: torch.Tensor, kind: str) -> torch.Tensor:
    """(B, H, W, C) -> (B * groups, members, C), one copy."""
    t = _view6(x, kind).permute(*_LAYOUTS[kind][1])
    return t.reshape(t.shape[0] * t.shape[1] * t.shape[2], t.shape[3] * t.shape[4], t.shape[5])


def add_tokens(x: torch.Tensor, t: torch.Tensor, kind: str) -> torch.Tensor:
    """``x + from_tokens(t)`` in one pass: (B, H, W, C) + (B * groups, members, C)."""
    x6 = _view6(x, kind)
    perm = _LAYOUTS[kind][1]
    inverse = [perm.index(i) for i in range(6)]
    t6 = t.view([x6.shape[i] for i in perm]).permute(*inverse)
    return (x6 + t6).reshape(x.shape)


def from_tokens(t: torch.Tensor, kind: str, shape: Sequence[int]) -> torch.Tensor:
    """Inverse of ``to_tokens`` for an NHWC ``shape``."""
    perm = _LAYOUTS[kind][1]
    inverse = [perm.index(i) for i in range(6)]
    b, hh, ww, c = shape
    h, w = hh // WINDOW, ww // WINDOW
    six = (b, h, WINDOW, w, WINDOW, c) if _LAYOUTS[kind][0] else (b, WINDOW, h, WINDOW, w, c)
    return t.view([six[i] for i in perm]).permute(*inverse).reshape(shape)


def relative_position_index(n: int = WINDOW) -> torch.Tensor:
    """(n*n, n*n) index into a (2n-1)^2 bias table: (yi - yj + n-1) * (2n-1) + (xi - xj + n-1)."""
    ys, xs = torch.meshgrid(torch.arange(n), torch.arange(n), indexing="ij")
    ys, xs = ys.flatten(), xs.flatten()
    dy = ys[:, None] - ys[None, :] + n - 1
    dx = xs[:, None] - xs[None, :] + n - 1
    return dy * (2 * n - 1) + dx


# ------------------------------------------------------------------ spatial attention
class WindowAttention(nn.Module):
    """Single-head attention inside each window/group of 64 tokens.

    ``computes=True``: q, k, v projections, relative position bias, softmax; the
    attention matrix is returned for sharing. ``computes=False``: only values are
    projected and a given (shared) matrix is applied - no q, k or softmax at all.
    """

    def __init__(self, dim: int, computes: bool):
        super().__init__()
        self.computes = computes
        self.scale = dim ** -0.5
        if computes:
            self.qkv = nn.Linear(dim, 3 * dim, bias=False)
            self.rel_pos_bias = nn.Parameter(torch.zeros((2 * WINDOW - 1) ** 2))
            self.register_buffer("rel_pos_index", relative_position_index(), persistent=False)
        else:
            self.v = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, t: torch.Tensor, shared: Optional[torch.Tensor] = None):
        """t: (groups, 64, d) normalised tokens -> (proj(A v), A), A the attention matrices."""
        if self.computes:
            q, k, v = linear_nhwc(t, self.qkv.weight).chunk(3, dim=-1)
            bias = self.rel_pos_bias[self.rel_pos_index]
            attn = torch.baddbmm(bias, q, k.transpose(-2, -1), alpha=self.scale).softmax(dim=-1)
        elif shared is None:
            raise RuntimeError("a sharing attention unit needs the matrix of a computing unit")
        else:
            attn, v = shared, linear_nhwc(t, self.v.weight)
        return linear_nhwc(torch.bmm(attn, v), self.proj.weight), attn


class AttentionUnit(nn.Module):
    """One SAM unit: x + Attn(LN(x)) over windows ("meso") or grid groups ("global"),
    then y + GFN(LN2d(y)). NHWC in and out."""

    def __init__(self, dim: int, kind: str, computes: bool):
        super().__init__()
        self.kind = kind
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, computes)
        self.norm2 = LayerNorm2d(dim)
        self.gfn = GFN(dim)

    def forward(self, x, shared: Optional[torch.Tensor] = None):
        out, attn = self.attn(self.norm1(to_tokens(x, self.kind)), shared)
        x = add_tokens(x, out, self.kind)
        return x + self.gfn(self.norm2(x)), attn


class SAM(nn.Module):
    """Spatial attention module: a meso unit then a global unit (two attention matrices)."""

    def __init__(self, dim: int, computes: bool):
        super().__init__()
        self.meso = AttentionUnit(dim, "meso", computes)
        self.glob = AttentionUnit(dim, "global", computes)

    def forward(self, x, shared: Sequence[Optional[torch.Tensor]] = (None, None)):
        x, a_meso = self.meso(x, shared[0])
        x, a_glob = self.glob(x, shared[1])
        return x, (a_meso, a_glob)


# ------------------------------------------------------------------ channel attention
class ChannelAttention(nn.Module):
    """Transposed (C x C) attention on pixels of each 8x8 window ("meso") or on the
    pixels at one in-window position across all windows ("global")."""

    def __init__(self, dim: int, kind: str):
        super().__init__()
        self.kind = kind
        self.layout = "meso" if kind == "meso" else "grid"  # how pixels are grouped into tokens
        self.temperature = nn.Parameter(torch.ones(1))
        self.qkv = ConvNHWC(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = ConvNHWC(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.project_out = ConvNHWC(dim, dim, 1, bias=False)

    def matrices(self, q: torch.Tensor, k: torch.Tensor,
                 norms: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> torch.Tensor:
        """softmax(temperature * q^T k) of (G, pixels, C) tokens, q and k L2-normalised
        along pixels (the Gram matrix divided by the norms): (G, C, C). ``norms``: the
        (G, C) norms of q and k when they are known already."""
        if norms is None:
            norms = (torch.linalg.vector_norm(q, dim=1), torch.linalg.vector_norm(k, dim=1))
        nq, nk = (n.clamp_min(1e-12) for n in norms)
        return (q.transpose(1, 2) @ k * (self.temperature / (nq[:, :, None] * nk[:, None, :]))).softmax(dim=-1)

    def forward(self, x):
        q, k, v = to_tokens(self.qkv_dwconv(self.qkv(x)), self.layout).chunk(3, dim=-1)
        attn = self.matrices(q, k)
        return from_tokens(self.project_out(v @ attn.transpose(1, 2)), self.layout, x.shape)


class CAM(nn.Module):
    """Channel attention module: meso CA, GFN, global CA, GFN, each pre-normed and residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.ca_meso = LayerNorm2d(dim), ChannelAttention(dim, "meso")
        self.norm2, self.gfn1 = LayerNorm2d(dim), GFN(dim)
        self.norm3, self.ca_glob = LayerNorm2d(dim), ChannelAttention(dim, "global")
        self.norm4, self.gfn2 = LayerNorm2d(dim), GFN(dim)

    def forward(self, x):
        x = x + self.ca_meso(self.norm1(x))
        x = x + self.gfn1(self.norm2(x))
        x = x + self.ca_glob(self.norm3(x))
        return x + self.gfn2(self.norm4(x))


class ESA(nn.Module):
    """Enhanced spatial attention (RFANet), the reduced form used by Omni-SR and ASID.
    conv2 and conv3 run on the small strided map in NCHW."""

    def __init__(self, dim: int, f: int = 16):
        super().__init__()
        self.conv1 = ConvNHWC(dim, f, 1)
        self.conv_f = ConvNHWC(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = ConvNHWC(f, dim, 1)

    def mask_input(self, x: torch.Tensor, c1: torch.Tensor) -> torch.Tensor:
        """conv3(maxpool(conv2(c1))) upsampled to the size of ``x`` (NHWC)."""
        m = F.max_pool2d(self.conv2(_nchw(c1)), kernel_size=7, stride=3)
        return _nhwc(F.interpolate(self.conv3(m), size=x.shape[1:3], mode="bilinear", align_corners=False))

    def forward(self, x):  # NHWC; needs H, W >= 15 (the network pads to at least 16)
        c1 = self.conv1(x)
        return x * torch.sigmoid(self.conv4(self.conv_f(c1) + self.mask_input(x, c1)))


# ---------------------------------------------------------------- distillation block
class IDB(nn.Module):
    """Information distillation block (NHWC in and out).

    ``computes``: which of its three SAMs compute attention matrices (the others
    reuse the matrices passed in, or, with intra-block sharing, those of SAM1).
    ``channel_split``: SAMs see only the non-bypassed 3q/2q/q channels (the paper's
    design); without it they run on the LM's full width and there is no pw1/pw2.
    """

    def __init__(self, dim: int = 48, computes: Sequence[bool] = (True, True, True),
                 channel_split: bool = True, intra_sharing: bool = False):
        super().__init__()
        q = dim // 4
        self.q, self.split, self.intra = q, channel_split, intra_sharing
        widths = (dim, 3 * q, 2 * q)                      # LM widths of the three steps
        sam_widths = (3 * q, 2 * q, q) if channel_split else widths
        self.lm1, self.lm2, self.lm3 = (LM(d) for d in widths)
        self.sam1, self.sam2, self.sam3 = (SAM(d, c) for d, c in zip(sam_widths, computes))
        if channel_split:
            self.pw1 = ConvNHWC(dim, dim, 1)
            self.pw2 = ConvNHWC(3 * q, 3 * q, 1)
        self.pw3 = ConvNHWC(dim, dim, 1)
        self.cam = CAM(dim)
        self.conv = ConvNHWC(dim, dim, 1)
        self.esa = ESA(dim, max(dim // 4, 16))

    def distill(self, x, shared: Matrices) -> Tuple[torch.Tensor, Matrices]:
        """The three distillation steps and CAM; returns the attention matrices too."""
        q = self.q
        out: Matrices = []

        def sam(k, module, t):
            given = shared[2 * k: 2 * k + 2]
            if self.intra and k > 0:
                given = out[0:2]
            t, mats = module(t, given)
            out.extend(mats)
            return t

        if self.split:
            x = self.lm1(x)                                    # step 1: 4q
            x = self.pw1(torch.cat([sam(0, self.sam1, x[..., q:]), x[..., :q]], -1))
            r1 = x[..., :q]
            x = self.lm2(x[..., q:])                           # step 2: 3q
            x = self.pw2(torch.cat([sam(1, self.sam2, x[..., q:]), x[..., :q]], -1))
            r2 = x[..., :q]
            x = self.lm3(x[..., q:])                           # step 3: 2q
            x = self.pw3(torch.cat([r1, r2, sam(2, self.sam3, x[..., q:]), x[..., :q]], -1))
        else:
            x = sam(0, self.sam1, self.lm1(x))                 # 4q
            r1 = x[..., :q]
            x = sam(1, self.sam2, self.lm2(x[..., q:]))        # 3q
            r2 = x[..., :q]
            x = sam(2, self.sam3, self.lm3(x[..., q:]))        # 2q
            x = self.pw3(torch.cat([r1, r2, x], -1))
        return self.cam(x), out

    def forward(self, x, shared: Matrices):
        y, mats = self.distill(x, shared)
        return self.esa(x + self.conv(y)), mats


class SerialBlock(nn.Module):
    """Table 3 baseline block: LM -> SAM -> CAM in series on all channels (no distillation)."""

    def __init__(self, dim: int = 48):
        super().__init__()
        self.lm = LM(dim)
        self.sam = SAM(dim, computes=True)
        self.cam = CAM(dim)
        self.conv = ConvNHWC(dim, dim, 1)
        self.esa = ESA(dim, max(dim // 4, 16))

    def forward(self, x, shared: Matrices):
        y, mats = self.sam(self.lm(x))
        return self.esa(x + self.conv(self.cam(y))), list(mats)


# ----------------------------------------------------------------------------- network
class ASID(SRNet):
    """ASID network. Input and output of ``forward_native`` are in ``pixel_range``."""

    def __init__(self, scale: int, blocks: int = 3, sharing: str = "inter",
                 channel_split: bool = True, channels: int = 48, serial: bool = False):
        super().__init__()
        if sharing not in ("inter", "intra", "none"):
            raise ValueError(f"sharing must be 'inter', 'intra' or 'none', not {sharing!r}")
        if not 1 <= blocks <= 16:
            raise ValueError(f"blocks must be between 1 and 16, not {blocks}")
        if channels % 4:
            raise ValueError(f"channels must be a multiple of 4, not {channels}")
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        if serial:
            self.blocks = nn.ModuleList(SerialBlock(channels) for _ in range(blocks))
        else:
            def idb(i):
                if sharing == "inter":
                    computes = (i == 0,) * 3
                elif sharing == "intra":
                    computes = (True, False, False)
                else:
                    computes = (True, True, True)
                return IDB(channels, computes, channel_split, intra_sharing=sharing == "intra")
            self.blocks = nn.ModuleList(idb(i) for i in range(blocks))
        self.fuse = ConvNHWC(channels, channels, 3, padding=1)
        self.upsampler = nn.Sequential(nn.Conv2d(channels, 3 * scale * scale, 3, padding=1),
                                       nn.PixelShuffle(scale))

    @staticmethod
    def pad(x: torch.Tensor) -> torch.Tensor:
        """Zero-pad bottom/right to a multiple of 8 and to at least 16 px (ESA's minimum);
        for every input the release accepts this is exactly the release's padding.
        (Written with ``sym_max`` and no branch, so that export keeps H and W symbolic.)"""
        h, w = x.shape[-2:]
        ph = torch.sym_max((h + WINDOW - 1) // WINDOW * WINDOW, 2 * WINDOW) - h
        pw = torch.sym_max((w + WINDOW - 1) // WINDOW * WINDOW, 2 * WINDOW) - w
        return F.pad(x, (0, pw, 0, ph))

    def body(self, f0: torch.Tensor) -> Tuple[torch.Tensor, Matrices]:
        """The blocks on the shallow features ``f0`` (NHWC): F_N, and the attention
        matrices of the first block (which the later blocks share)."""
        shared: Matrices = [None] * 6
        first: Matrices = []
        y = f0
        for i, block in enumerate(self.blocks):
            y, mats = block(y, shared)
            if i == 0:
                first = mats
                shared = mats
        return y, first

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Matrices]:
        """Deep features (NCHW, channels_last memory) of a padded NCHW input, and the
        attention matrices of the first block."""
        f0 = _nhwc(self.head(x.contiguous(memory_format=torch.channels_last)))
        y, first = self.body(f0)
        return _nchw(self.fuse(y) + f0), first

    def prepare_for_inference(self) -> "ASID":
        """Ready this network for fast inference (in place; returns it): eval mode, the
        algebraic merges done once, fused CPU kernels chosen. See
        :func:`distillsr.kernels.prepare_for_inference` for what changes and for what
        happens after ``train()`` or a change of the weights."""
        from ..kernels import prepare_for_inference
        return prepare_for_inference(self)

    def forward_native(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        feats, _ = self.features(self.pad(x))
        # the last conv in NCHW: oneDNN's channels_last kernel sums its 432 products per
        # output in an order that loses about 1e-6 here, where nothing averages it out
        y = self.upsampler(feats.contiguous())
        return y[..., : h * self.scale, : w * self.scale].contiguous()


@register_model("asid", paper="ASID (AAAI 2025)", description="ASID, 3 IDBs, 48 channels")
def asid(scale: int, **options) -> ASID:
    return ASID(scale, **options)


@register_model("asid-d8", paper="ASID (AAAI 2025)", description="ASID-D8, 8 IDBs")
def asid_d8(scale: int, **options) -> ASID:
    options.setdefault("blocks", 8)
    return ASID(scale, **options)


@register_model("asid-baseline", paper="ASID (AAAI 2025), Table 3",
                description="serial LM -> SAM -> CAM baseline of the ablation")
def asid_baseline(scale: int, blocks: int = 3, channels: int = 48) -> ASID:
    return ASID(scale, blocks=blocks, channels=channels, serial=True)
