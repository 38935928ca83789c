"""A plain ASID forward pass, written the way the authors' release computes it.

This is the baseline of ``benchmarks/inference.py``: same weights (it reads the
parameters of a ``distillsr`` ASID model), same outputs, but every window
rearrangement is an explicit ``permute().contiguous()`` copy on NCHW maps (as
einops ``rearrange`` does), LayerNorm2d is computed from its mean and variance
over channels (as the release's LayerNorm2d does), q, k and v are separate
copies, and the attention logits, bias and softmax are separate passes. It is
our own code; it only mimics the release's style so that speed-ups can be
measured side by side, in one run, against a straightforward implementation.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

W8 = 8


def conv(m, x):
    return F.conv2d(x, m.weight, m.bias, m.stride, m.padding, m.dilation, m.groups)


def layer_norm2d(m, x):
    mu = x.mean(1, keepdim=True)
    var = (x - mu).pow(2).mean(1, keepdim=True)
    y = (x - mu) / (var + m.eps).sqrt()
    return m.weight.view(1, -1, 1, 1) * y + m.bias.view(1, -1, 1, 1)


def gfn(m, x):
    x1, x2 = conv(m.dwconv, conv(m.project_in, x)).chunk(2, dim=1)
    return conv(m.project_out, F.gelu(x1) * x2)


def lm(m, x):
    y = F.gelu(conv(m.dwconv, F.gelu(conv(m.conv_in, x))))
    gate = torch.sigmoid(F.linear(F.silu(F.linear(y.mean(dim=(2, 3)), m.se.fc1.weight)), m.se.fc2.weight))
    return x + conv(m.conv_out, y * gate[:, :, None, None])


def windows(x, kind):  # 'b d (x w1) (y w2) -> b x y w1 w2 d' or 'b d (w1 x) (w2 y) -> ...'
    b, d, hh, ww = x.shape
    h, w = hh // W8, ww // W8
    if kind == "meso":
        return x.view(b, d, h, W8, w, W8).permute(0, 2, 4, 3, 5, 1).contiguous()
    return x.view(b, d, W8, h, W8, w).permute(0, 3, 5, 2, 4, 1).contiguous()


def unwindows(t, kind):  # inverse of ``windows``
    b, h, w, _, _, d = t.shape
    if kind == "meso":
        return t.permute(0, 5, 1, 3, 2, 4).contiguous().view(b, d, h * W8, w * W8)
    return t.permute(0, 5, 3, 1, 4, 2).contiguous().view(b, d, h * W8, w * W8)


def attention_unit(m, x, shared):
    b, d, hh, ww = x.shape
    t = windows(x, m.kind)
    n = F.layer_norm(t, (d,), m.norm1.weight, m.norm1.bias, m.norm1.eps)
    a = m.attn
    if a.computes:
        q, k, v = F.linear(n, a.qkv.weight).chunk(3, dim=-1)
        q, k, v = (z.reshape(-1, W8 * W8, d).contiguous() for z in (q, k, v))
        sim = torch.einsum("bid,bjd->bij", q * a.scale, k)
        sim = sim + a.rel_pos_bias[a.rel_pos_index]
        attn = sim.softmax(dim=-1)
    else:
        v = F.linear(n, a.v.weight).reshape(-1, W8 * W8, d).contiguous()
        attn = shared
    out = torch.einsum("bij,bjd->bid", attn, v).view(t.shape)
    x = x + unwindows(F.linear(out, a.proj.weight), m.kind)
    return x + gfn(m.gfn, layer_norm2d(m.norm2, x)), attn


def sam(m, x, shared):
    x, a1 = attention_unit(m.meso, x, shared[0])
    x, a2 = attention_unit(m.glob, x, shared[1])
    return x, [a1, a2]


def channel_attention(m, x):
    b, c, hh, ww = x.shape
    h, w = hh // W8, ww // W8
    qkv = conv(m.qkv_dwconv, conv(m.qkv, x))
    if m.kind == "meso":  # 'b c (h ph) (w pw) -> b (h w) c (ph pw)'
        t = qkv.view(b, 3 * c, h, W8, w, W8).permute(0, 2, 4, 1, 3, 5).contiguous().view(b, h * w, 3 * c, -1)
    else:                 # 'b c (h ph) (w pw) -> b (ph pw) c (h w)'
        t = qkv.view(b, 3 * c, h, W8, w, W8).permute(0, 3, 5, 1, 2, 4).contiguous().view(b, W8 * W8, 3 * c, -1)
    q, k, v = (z.contiguous() for z in t.chunk(3, dim=2))
    q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
    attn = ((q @ k.transpose(-2, -1)) * m.temperature).softmax(dim=-1)
    out = attn @ v
    if m.kind == "meso":
        out = out.view(b, h, w, c, W8, W8).permute(0, 3, 1, 4, 2, 5).contiguous()
    else:
        out = out.view(b, W8, W8, c, h, w).permute(0, 3, 4, 1, 5, 2).contiguous()
    return conv(m.project_out, out.view(b, c, hh, ww))


def cam(m, x):
    x = x + channel_attention(m.ca_meso, layer_norm2d(m.norm1, x))
    x = x + gfn(m.gfn1, layer_norm2d(m.norm2, x))
    x = x + channel_attention(m.ca_glob, layer_norm2d(m.norm3, x))
    return x + gfn(m.gfn2, layer_norm2d(m.norm4, x))


def esa(m, x):
    c1 = conv(m.conv1, x)
    mx = F.max_pool2d(conv(m.conv2, c1), kernel_size=7, stride=3)
    c3 = F.interpolate(conv(m.conv3, mx), size=x.shape[-2:], mode="bilinear", align_corners=False)
    return x * torch.sigmoid(conv(m.conv4, c3 + conv(m.conv_f, c1)))


def idb(m, x, shared):
    q = m.q
    y = lm(m.lm1, x)
    s, a12 = sam(m.sam1, y[:, q:].contiguous(), shared[0:2])
    y = conv(m.pw1, torch.cat([s, y[:, :q]], 1))
    r1 = y[:, :q]
    y = lm(m.lm2, y[:, q:].contiguous())
    s, a34 = sam(m.sam2, y[:, q:].contiguous(), shared[2:4])
    y = conv(m.pw2, torch.cat([s, y[:, :q]], 1))
    r2 = y[:, :q]
    y = lm(m.lm3, y[:, q:].contiguous())
    s, a56 = sam(m.sam3, y[:, q:].contiguous(), shared[4:6])
    y = conv(m.pw3, torch.cat([r1, r2, s, y[:, :q]], 1))
    y = cam(m.cam, y)
    return esa(m.esa, x + conv(m.conv, y)), a12 + a34 + a56


def forward_native(model, x):
    """The plain computation of ``model.forward_native`` (ASID / ASID-D8 as released:
    inter-block sharing and channel split)."""
    from distillsr.models.asid import IDB
    if not all(isinstance(b, IDB) and b.split and not b.intra for b in model.blocks):
        raise ValueError("the plain baseline covers the released ASID / ASID-D8 layout only")
    h, w = x.shape[-2:]
    x = model.pad(x)
    f0 = conv(model.head, x)
    y, shared = f0, [None] * 6
    for i, block in enumerate(model.blocks):
        y, mats = idb(block, y, shared)
        if i == 0:
            shared = mats
    y = conv(model.fuse, y) + f0
    y = F.pixel_shuffle(conv(model.upsampler[0], y), model.scale)
    return y[..., : h * model.scale, : w * model.scale]


def forward(model, x):
    """[0, 1] in and out, like ``model(x)``."""
    lo, hi = model.pixel_range
    return (forward_native(model, x * (hi - lo) + lo) - lo) / (hi - lo)
