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
"""
from __future__ import annotations

from functools import partial
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
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


# Fused CPU kernels. In inference on the CPU (no autograd, no tracing or export) a
# matrix product or conv and what follows it (GELU, sigmoid, a residual add) run as one
# oneDNN primitive with post-ops, which saves a pass over the map each; and in float32
# the memory-bound steps run in our C kernels (``distillsr.kernels``): LayerNorm written
# straight into window order, the residual add from windows fused with the next
# LayerNorm, depthwise convs with GELU or the GFN gate, written where the next step
# reads them. Everywhere else (training, CUDA, export) the same ops run one by one.
_MKLDNN = getattr(torch.ops, "mkldnn", None)
_HAS_FUSED = (torch.backends.mkldnn.is_available() and _MKLDNN is not None
              and hasattr(_MKLDNN, "_linear_pointwise") and hasattr(_MKLDNN, "_convolution_pointwise"))
# oneDNN has no bf16 primitives on CPUs without AVX-512 (it fails to create them): there bf16 runs op by op.
_FUSED_DTYPES = (torch.float32,) + ((torch.bfloat16,) if _HAS_FUSED and getattr(
    _MKLDNN, "_is_mkldnn_bf16_supported", lambda: False)() else ())


class fused_kernels:
    """``with fused_kernels(False):`` runs the plain op-by-op path (used by export), with
    neither oneDNN post-ops nor the C kernels."""

    enabled = True

    def __init__(self, enabled: bool):
        self.enabled_inside = enabled

    def __enter__(self):
        self.before, fused_kernels.enabled = fused_kernels.enabled, self.enabled_inside

    def __exit__(self, *exc):
        fused_kernels.enabled = self.before


def _fusable(x: torch.Tensor) -> bool:
    return (fused_kernels.enabled and _HAS_FUSED and type(x) is torch.Tensor
            and x.device.type == "cpu" and x.dtype in _FUSED_DTYPES
            and not torch.is_grad_enabled() and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def _shortcuts() -> bool:
    """Inference merges products that are exact algebraically (the value projection into
    the output projection, ...); training and ``fused_kernels(False)`` compute them as
    defined (and FLOP counts count them so)."""
    return fused_kernels.enabled and not torch.is_grad_enabled()


def _ckernels(x: torch.Tensor) -> bool:
    """The C kernels of ``distillsr.kernels`` (CPU float32 inference) apply to ``x``."""
    return fused_kernels.enabled and kernels.available(x)


def _act(y: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    return y


def pointwise(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              act: Optional[str] = None, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x W^T + b)`` or ``x W^T + b + add`` over the channels of an NHWC map
    (a 1x1 conv or a linear layer; ``weight`` (out, in) or (out, in, 1, 1))."""
    w = weight.flatten(1)
    n, k = w.shape
    if act is None and n >= 16 and (add is not None or k >= n) and _ckernels(x):
        # small products (and those with a residual add) in the C kernel, faster than
        # oneDNN there; GELU and the widening products stay with oneDNN
        y = kernels.linear(x, w, bias, add=add)
        if y is not None:
            return y
    if _fusable(x):
        x2 = x.reshape(-1, x.shape[-1])
        if add is not None:
            y = _MKLDNN._linear_pointwise.binary(x2, add.reshape(-1, w.shape[0]), w, bias, "add")
        else:
            y = _MKLDNN._linear_pointwise(x2, w, bias, act or "none", [], "none" if act == "gelu" else "")
        return y.view(*x.shape[:-1], w.shape[0])
    y = _act(F.linear(x.reshape(-1, x.shape[-1]), w, bias).view(*x.shape[:-1], w.shape[0]), act)
    return y if add is None else y + add


def conv_nhwc(conv: nn.Conv2d, x: torch.Tensor, act: Optional[str] = None,
              mul: Optional[torch.Tensor] = None, channels: Optional[slice] = None) -> torch.Tensor:
    """``act(conv(x))`` or ``conv(x) * mul`` on an NHWC map; ``channels`` restricts a
    depthwise conv to some of its channels (``x`` holds just those)."""
    w, b = conv.weight, conv.bias
    if conv.kernel_size == (1, 1) and conv.stride == (1, 1) and conv.groups == 1 and conv.padding == (0, 0):
        y = pointwise(x, w, b, act)
        return y if mul is None else y * mul
    groups = conv.groups
    if channels is not None:
        w, b, groups = w[channels], (None if b is None else b[channels]), x.shape[-1]
    if _fusable(x):
        xc = _nchw(x.contiguous())
        args = (conv.padding, conv.stride, conv.dilation, groups)
        if mul is not None:
            y = _MKLDNN._convolution_pointwise.binary(xc, _nchw(mul.contiguous()), w, b, *args,
                                                      "mul", None, None, [], None)
        else:
            y = _MKLDNN._convolution_pointwise(xc, w, b, *args, act or "none", [],
                                               "none" if act == "gelu" else "")
        return _nhwc(y)
    y = _act(_nhwc(F.conv2d(_nchw(x), w, b, conv.stride, conv.padding, conv.dilation, groups)), act)
    return y if mul is None else y * mul


# ----------------------------------------------------------------------------- basics
class LayerNorm2d(nn.Module):
    """LayerNorm over channels at every pixel (eps 1e-6 as released); NHWC input."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.eps = eps

    def forward(self, x):
        if _ckernels(x):
            return kernels.layer_norm(x, self)
        return F.layer_norm(x, self.weight.shape, self.weight, self.bias, self.eps)


class GFN(nn.Module):
    """Gated conv feed-forward: 1x1 (d->2d), depthwise 3x3, GELU(x1) * x2, 1x1 (d->d)."""

    def __init__(self, dim: int):
        super().__init__()
        self.project_in = nn.Conv2d(dim, 2 * dim, 1, bias=False)
        self.dwconv = nn.Conv2d(2 * dim, 2 * dim, 3, padding=1, groups=2 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def forward(self, x, residual: Optional[torch.Tensor] = None):
        """NHWC; with ``residual`` returns ``residual + GFN(x)``."""
        d = self.project_out.in_channels
        if _ckernels(x):  # one product, then both dwconvs, GELU and gate in one pass
            h, w = pointwise(x, self.project_in.weight), self.dwconv.weight
            g = kernels.dwconv3x3(h[..., :d], w[:d], act="gelu", gate=(h[..., d:], w[d:]))
        elif _fusable(x):  # each half through its own dwconv: GELU and the gate fused into it
            w = self.project_in.weight
            x1 = conv_nhwc(self.dwconv, pointwise(x, w[:d]), act="gelu", channels=slice(0, d))
            g = conv_nhwc(self.dwconv, pointwise(x, w[d:]), mul=x1, channels=slice(d, 2 * d))
        else:
            x1, x2 = conv_nhwc(self.dwconv, conv_nhwc(self.project_in, x)).chunk(2, dim=-1)
            g = F.gelu(x1) * x2
        return pointwise(g, self.project_out.weight, add=residual)


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
        self.conv_in = nn.Conv2d(dim, dim, 1)
        self.dwconv = nn.Conv2d(dim, dim, 3, padding=1, groups=dim)
        self.se = SE(dim)
        self.conv_out = nn.Conv2d(dim, dim, 1)

    def forward(self, x):
        if _fusable(x) and not x.is_contiguous():
            x = x.contiguous()  # a channel slice: copied once here, not by both oneDNN products
        y = conv_nhwc(self.conv_in, x, act="gelu")
        if _ckernels(y) and y.shape[0] == 1:
            # the dwconv sums its output for SE; the SE gate (one per channel) is folded
            # into conv_out's weight instead of multiplying the map (exact algebra)
            y, mean = kernels.dwconv3x3(y, self.dwconv.weight, self.dwconv.bias, act="gelu", channel_means=True)
            w_out = self.conv_out.weight.flatten(1) * self.se.gate(mean)
            return pointwise(y, w_out, self.conv_out.bias, add=x)
        y = conv_nhwc(self.dwconv, y, act="gelu")
        return pointwise(self.se(y), self.conv_out.weight, self.conv_out.bias, add=x)


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


def norm_tokens(x: torch.Tensor, norm: nn.Module, kind: str) -> torch.Tensor:
    """``norm(to_tokens(x, kind))`` for a LayerNorm over channels (one pass with the kernels)."""
    if _ckernels(x):
        return kernels.layer_norm(x, norm, kind)
    return norm(to_tokens(x, kind))


def add_tokens_norm(x: torch.Tensor, t: torch.Tensor, kind: str,
                    norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = add_tokens(x, t, kind)`` and ``norm(y)`` (one pass with the kernels)."""
    if _ckernels(x):
        return kernels.add_tokens_norm(x, t, kind, norm)
    y = add_tokens(x, t, kind)
    return y, norm(y)


def attend_add_norm(attn: torch.Tensor, v: torch.Tensor, x: torch.Tensor, kind: str,
                    norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``add_tokens_norm(x, attn @ v, kind, norm)``; the C kernel adds each window's (or
    grid group's) ``attn @ v`` into the map as it computes it."""
    if _ckernels(x):
        out = kernels.attend_add_norm(attn, v, x, kind, norm)
        if out is not None:
            return out
    return add_tokens_norm(x, torch.bmm(attn, v), kind, norm)


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
        """t: (windows, 64, d) normalised tokens -> (attention matrix A, values v); the
        output is proj(A v). In inference v is already projected (t (W_proj W_v)^T: one
        product instead of two, exact algebra) and the output is A v."""
        if not self.computes and shared is None:
            raise RuntimeError("a sharing attention unit needs the matrix of a computing unit")
        d = self.proj.in_features
        w_v = self.qkv.weight[2 * d:] if self.computes else self.v.weight
        if _shortcuts():
            w_v = self.proj.weight @ w_v
        if not self.computes:
            return shared, pointwise(t, w_v)
        qkv = pointwise(t, torch.cat([self.qkv.weight[:2 * d], w_v]))
        bias = self.rel_pos_bias[self.rel_pos_index]
        if _ckernels(qkv):  # scores, bias and softmax of each window in registers
            return kernels.attention_scores(qkv, bias, self.scale), qkv[..., 2 * d:]
        q, k, v = qkv.chunk(3, dim=-1)
        attn = torch.baddbmm(bias, q, k.transpose(-2, -1), alpha=self.scale).softmax(dim=-1)
        return attn, v


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
        attn, v = self.attn(norm_tokens(x, self.norm1, self.kind), shared)
        if _shortcuts():  # v is projected already
            x, z = attend_add_norm(attn, v, x, self.kind, self.norm2)
        else:
            x, z = add_tokens_norm(x, pointwise(torch.bmm(attn, v), self.attn.proj.weight), self.kind, self.norm2)
        return self.gfn(z, residual=x), attn


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
        self.temperature = nn.Parameter(torch.ones(1))
        self.qkv = nn.Conv2d(dim, 3 * dim, 1, bias=False)
        self.qkv_dwconv = nn.Conv2d(3 * dim, 3 * dim, 3, padding=1, groups=3 * dim, bias=False)
        self.project_out = nn.Conv2d(dim, dim, 1, bias=False)

    def qkv_tokens(self, x):
        """q, k, v (1x1 conv, depthwise 3x3) of an NHWC map, each (groups, pixels, C)."""
        layout, c = ("meso" if self.kind == "meso" else "grid"), x.shape[-1]
        if _ckernels(x):  # the dwconvs write tokens directly
            h, w = pointwise(x, self.qkv.weight), self.qkv_dwconv.weight
            return [kernels.dwconv3x3(h[..., i * c:(i + 1) * c], w[i * c:(i + 1) * c], layout=layout)
                    for i in range(3)]
        return to_tokens(conv_nhwc(self.qkv_dwconv, conv_nhwc(self.qkv, x)), layout).chunk(3, dim=-1)

    def forward(self, x, residual: torch.Tensor, norm: Optional[nn.Module] = None):
        """``residual + CA(x)`` (NHWC); with ``norm`` returns ``(that, norm(that))``."""
        layout = "meso" if self.kind == "meso" else "grid"
        q, k, v = self.qkv_tokens(x)
        # q, k L2-normalised along pixels: the Gram matrix divided by the norms
        l2 = kernels.token_norms if _ckernels(q) else partial(torch.linalg.vector_norm, dim=1)
        nq, nk = (l2(z).clamp_min(1e-12) for z in (q, k))  # (G, C)
        attn = (q.transpose(1, 2) @ k * (self.temperature / (nq[:, :, None] * nk[:, None, :])))
        attn = attn.softmax(dim=-1)  # (G, C, C)
        w_out = self.project_out.weight.flatten(1)
        if _shortcuts():
            # project_out (W_o) folded into the small C x C matrices, (W_o A)^T: fewer
            # products than W_o on every pixel and one pass less over the map
            y = v @ (w_out @ attn).transpose(1, 2)
        else:
            y = pointwise(v @ attn.transpose(1, 2), w_out)
        if norm is None:
            return add_tokens(residual, y, layout)
        return add_tokens_norm(residual, y, layout, norm)


class CAM(nn.Module):
    """Channel attention module: meso CA, GFN, global CA, GFN, each pre-normed and residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm1, self.ca_meso = LayerNorm2d(dim), ChannelAttention(dim, "meso")
        self.norm2, self.gfn1 = LayerNorm2d(dim), GFN(dim)
        self.norm3, self.ca_glob = LayerNorm2d(dim), ChannelAttention(dim, "global")
        self.norm4, self.gfn2 = LayerNorm2d(dim), GFN(dim)

    def forward(self, x):
        x, z = self.ca_meso(self.norm1(x), x, norm=self.norm2)
        x = self.gfn1(z, residual=x)
        x, z = self.ca_glob(self.norm3(x), x, norm=self.norm4)
        return self.gfn2(z, residual=x)


class ESA(nn.Module):
    """Enhanced spatial attention (RFANet), the reduced form used by Omni-SR and ASID."""

    def __init__(self, dim: int, f: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(dim, f, 1)
        self.conv_f = nn.Conv2d(f, f, 1)
        self.conv2 = nn.Conv2d(f, f, 3, stride=2)
        self.conv3 = nn.Conv2d(f, f, 3, padding=1)
        self.conv4 = nn.Conv2d(f, dim, 1)

    def forward(self, x):  # NHWC; needs H, W >= 15 (the network pads to at least 16)
        c1 = conv_nhwc(self.conv1, x)
        m = F.max_pool2d(self.conv2(_nchw(c1)), kernel_size=7, stride=3)
        c3 = F.interpolate(self.conv3(m), size=x.shape[1:3], mode="bilinear", align_corners=False)
        return x * pointwise(pointwise(c1, self.conv_f.weight, self.conv_f.bias, add=_nhwc(c3)),
                             self.conv4.weight, self.conv4.bias, act="sigmoid")


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
            self.pw1 = nn.Conv2d(dim, dim, 1)
            self.pw2 = nn.Conv2d(3 * q, 3 * q, 1)
        self.pw3 = nn.Conv2d(dim, dim, 1)
        self.cam = CAM(dim)
        self.conv = nn.Conv2d(dim, dim, 1)
        self.esa = ESA(dim, max(dim // 4, 16))

    def distill(self, x, shared: Matrices) -> Tuple[torch.Tensor, Matrices]:
        q = self.q
        out: Matrices = []

        def sam(k, module, t):
            given = shared[2 * k: 2 * k + 2]
            if self.intra and k > 0:
                given = out[0:2]
            t, mats = module(t, given)
            out.extend(mats)
            return t

        def pw(conv, parts):
            return conv_nhwc(conv, torch.cat(parts, -1))

        if self.split:
            x = self.lm1(x)                                    # step 1: 4q
            x = pw(self.pw1, [sam(0, self.sam1, x[..., q:]), x[..., :q]])
            r1 = x[..., :q]
            x = self.lm2(x[..., q:])                           # step 2: 3q
            x = pw(self.pw2, [sam(1, self.sam2, x[..., q:]), x[..., :q]])
            r2 = x[..., :q]
            x = self.lm3(x[..., q:])                           # step 3: 2q
            x = pw(self.pw3, [r1, r2, sam(2, self.sam3, x[..., q:]), x[..., :q]])
        else:
            x = sam(0, self.sam1, self.lm1(x))                 # 4q
            r1 = x[..., :q]
            x = sam(1, self.sam2, self.lm2(x[..., q:]))        # 3q
            r2 = x[..., :q]
            x = sam(2, self.sam3, self.lm3(x[..., q:]))        # 2q
            x = pw(self.pw3, [r1, r2, x])
        return self.cam(x), out

    def forward(self, x, shared: Matrices):
        y, mats = self.distill(x, shared)
        return self.esa(pointwise(y, self.conv.weight, self.conv.bias, add=x)), mats


class SerialBlock(nn.Module):
    """Table 3 baseline block: LM -> SAM -> CAM in series on all channels (no distillation)."""

    def __init__(self, dim: int = 48):
        super().__init__()
        self.lm = LM(dim)
        self.sam = SAM(dim, computes=True)
        self.cam = CAM(dim)
        self.conv = nn.Conv2d(dim, dim, 1)
        self.esa = ESA(dim, max(dim // 4, 16))

    def forward(self, x, shared: Matrices):
        y, mats = self.sam(self.lm(x))
        return self.esa(pointwise(self.cam(y), self.conv.weight, self.conv.bias, add=x)), list(mats)


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
        self.fuse = nn.Conv2d(channels, channels, 3, padding=1)
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

    def features(self, x: torch.Tensor) -> Tuple[torch.Tensor, Matrices]:
        """Deep features (NCHW, channels_last memory) of a padded NCHW input, and the
        attention matrices of the first block."""
        f0 = _nhwc(self.head(x.contiguous(memory_format=torch.channels_last)))
        shared: Matrices = [None] * 6
        first: Matrices = []
        y = f0
        for i, block in enumerate(self.blocks):
            y, mats = block(y, shared)
            if i == 0:
                first = mats
                shared = mats
        return _nchw(conv_nhwc(self.fuse, y) + f0), first

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
