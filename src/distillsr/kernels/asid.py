"""Fused inference forms of ASID's modules (``distillsr.models.asid``).

:func:`distillsr.kernels.prepare_for_inference` gives a network these forms. Each runs
its paper module's computation with the ops of ``distillsr.kernels.ops`` (C kernels,
oneDNN post-ops, or PyTorch op by op) and with products merged where that is exact
algebraically, and returns what the paper module returns. Without autograd only; with
it (or while tracing) each falls back to its paper form.

Merges and fusions, by form:

* ``AttentionUnit``: LayerNorm taken in window order by the product that follows it (the
  normalised map never written out); the value projection
  folded into the output projection (``W_o W_v``, done once, so that ``A (t W_v^T)
  W_o^T = A (t (W_o W_v)^T)``: one product instead of two); a computing unit's scores,
  bias and softmax in one pass; ``A v`` added into the map and the next LayerNorm taken
  in the same pass.
* ``GFN`` (in both): row by row (``kernels.gfn_rows``): ``project_in``'s rows kept in a ring
  of three, the gate and ``project_out`` with the residual add taken while they are in
  cache; neither the 2d-channel map nor the gate is written out.
* ``CAM``: LayerNorm, qkv product and the q, k, v depthwise convs row by row in the same
  way, written as tokens (``kernels.qkv_rows``); each group's norms, Gram
  matrix, softmax, ``project_out`` folded into its small C x C attention matrix
  (``(W_o A)^T``, fewer products than ``W_o`` on every pixel) and output in one C kernel
  pass, in cache (``kernels.channel_attention``); the residual add from tokens fused with
  the next LayerNorm.
* ``LM``: GELU fused into the products and the depthwise conv; the dwconv sums its
  output for SE, and the SE gate (one per channel) is folded into ``conv_out``'s weight.
* ``ESA``, ``IDB``, ``SerialBlock``: residual adds and the sigmoid fused into products; an
  IDB's concatenations read in place by the 1x1 conv that follows each (never written out).
* ``ASID``: the upsampler's conv and pixel shuffle as one product over the nine taps of the
  NHWC features, written straight into the cropped output image (``kernels.upsample_conv``).
* ``ConvNHWC``: 1x1 convs in the small-product C kernel or oneDNN, others in oneDNN.
* ``ASID``: the network runs each call with its workspace (``distillsr.kernels.workspace``)
  active, so that the maps of one call reuse the buffers of the previous one instead of
  page-faulting fresh memory in; ``fuse``'s output is summed into the shallow features'
  memory.
"""
from __future__ import annotations

from typing import Dict, List, Optional

import torch
import torch.nn as nn

from .. import kernels
from ..models import asid as paper
from . import ops
from .ops import inference
from .prepare import FusedForm, register_form
from .workspace import Workspace, active


def gfn(m: paper.GFN, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
    """``residual + m(x)`` (NHWC)."""
    d = m.project_out.in_channels
    w = m.project_in.weight
    if ops.c_kernels(x):  # all of it row by row: no map but the output written out
        y = kernels.gfn_rows(x, w, m.dwconv.weight, m.project_out.weight, add=residual)
        if y is not None:
            return y
    if ops.c_kernels(x):  # one product, then both dwconvs, GELU, gate and project_out row by row
        h, w_dw = ops.linear(x, w), m.dwconv.weight
        y = kernels.gate_linear(h[..., :d], w_dw[:d], h[..., d:], w_dw[d:], m.project_out.weight, add=residual)
        if y is not None:
            return y
        g = kernels.dwconv3x3(h[..., :d], w_dw[:d], act="gelu", gate=(h[..., d:], w_dw[d:]))
    elif ops.onednn(x):  # each half through its own dwconv: GELU and the gate fused into it
        x1 = ops.conv(m.dwconv, ops.linear(x, w[:d]), act="gelu", channels=slice(0, d))
        g = ops.conv(m.dwconv, ops.linear(x, w[d:]), mul=x1, channels=slice(d, 2 * d))
    else:
        x1, x2 = ops.conv(m.dwconv, ops.linear(x, w)).chunk(2, dim=-1)
        g = torch.nn.functional.gelu(x1) * x2
    return ops.linear(g, m.project_out.weight, add=residual)


def normed_product(x: torch.Tensor, norm: nn.Module, layout: str, weight: torch.Tensor) -> torch.Tensor:
    """``linear(norm(x) in layout token order, weight)``; the C kernel normalises the rows as
    it multiplies them (the normalised map is never written out)."""
    if ops.c_kernels(x):
        y = kernels.norm_linear(x, norm, layout, weight)
        if y is not None:
            return y
    return ops.linear(ops.layer_norm(x, norm, layout), weight)


def qkv_tokens(m: paper.ChannelAttention, x: torch.Tensor, norm: nn.Module):
    """q, k, v (1x1 conv, depthwise 3x3) of the NHWC map ``norm(x)``, each (groups, pixels,
    C). (A function of its own, so that the 3C-channel product is freed when it returns.)"""
    if ops.c_kernels(x):  # row by row: the 3C-channel map never written out
        parts = kernels.qkv_rows(x, norm, m.qkv.weight, m.qkv_dwconv.weight, m.layout)
        if parts is not None:
            return parts
    if ops.c_kernels(x):  # the dwconvs write tokens directly
        h = normed_product(x, norm, "image", m.qkv.weight)
        return kernels.dwconv3x3(h, m.qkv_dwconv.weight, layout=m.layout, split=3)
    x = ops.layer_norm(x, norm)
    return paper.to_tokens(ops.conv(m.qkv_dwconv, ops.conv(m.qkv, x)), m.layout).chunk(3, dim=-1)


def channel_matrices(m: paper.ChannelAttention, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
    """``m.matrices(q, k)`` with the token norms of the C kernel and every (G, C, C)
    temporary in the workspace (meso groups at x2 720p: 33 MB each); the same ops in the
    same order."""
    nq, nk = (kernels.token_norms(t).clamp_min(1e-12) for t in (q, k))
    g, c = q.shape[0], q.shape[-1]
    gram = torch.bmm(q.transpose(1, 2), k, out=kernels.empty((g, c, c)))
    scale = torch.mul(nq[:, :, None], nk[:, None, :], out=kernels.empty((g, c, c)))
    gram.mul_(torch.div(m.temperature, scale, out=scale))
    del scale
    return torch.softmax(gram, -1, out=kernels.empty((g, c, c)))


def channel_attention(m: paper.ChannelAttention, x: torch.Tensor, norm_in: nn.Module, norm: nn.Module):
    """``y = x + m(norm_in(x))`` and ``norm(y)`` (NHWC)."""
    q, k, v = qkv_tokens(m, x, norm_in)
    y = None
    if ops.c_kernels(q):  # each group's matrices, projection and output in cache
        y = kernels.channel_attention(q, k, v, float(m.temperature), m.project_out.weight)
    if y is not None:
        del q, k, v
    elif ops.c_kernels(q):
        attn = channel_matrices(m, q, k)
        del q, k
        mixed = torch.matmul(m.project_out.weight.flatten(1), attn, out=kernels.empty(attn.shape))
        del attn
        y = torch.bmm(v, mixed.transpose(1, 2), out=kernels.empty(v.shape))
    else:
        attn = m.matrices(q, k)
        y = v @ (m.project_out.weight.flatten(1) @ attn).transpose(1, 2)
    return ops.add_tokens_norm(x, y, m.layout, norm)


@register_form(paper.ConvNHWC)
class FusedConvNHWC(FusedForm, paper.ConvNHWC):
    def forward(self, x):
        if not inference(x):
            return super().forward(x)
        return ops.conv(self, x)


@register_form(paper.LM)
class FusedLM(FusedForm, paper.LM):
    def forward(self, x):
        if not inference(x):
            return super().forward(x)
        if not ops.c_kernels(x) and ops.onednn(x) and not x.is_contiguous():
            x = x.contiguous()  # a channel slice: copied once here, not by both oneDNN products
        y = ops.conv(self.conv_in, x, act="gelu")
        if ops.c_kernels(y) and y.shape[0] == 1:
            y, mean = kernels.dwconv3x3(y, self.dwconv.weight, self.dwconv.bias, act="gelu", channel_means=True)
            w_out = self.conv_out.weight.flatten(1) * self.se.gate(mean)
            return ops.linear(y, w_out, self.conv_out.bias, add=x)
        y = ops.conv(self.dwconv, y, act="gelu")
        return ops.linear(self.se(y), self.conv_out.weight, self.conv_out.bias, add=x)


@register_form(paper.AttentionUnit)
class FusedAttentionUnit(FusedForm, paper.AttentionUnit):
    def _sources(self) -> List[torch.Tensor]:
        a = self.attn
        return [a.qkv.weight, a.rel_pos_bias, a.proj.weight] if a.computes else [a.v.weight, a.proj.weight]

    def _derive(self) -> Dict[str, torch.Tensor]:
        a = self.attn
        d = a.proj.in_features
        if not a.computes:
            return {"w": a.proj.weight @ a.v.weight}
        w_v = a.proj.weight @ a.qkv.weight[2 * d:]
        return {"w": torch.cat([a.qkv.weight[:2 * d], w_v]), "bias": a.rel_pos_bias[a.rel_pos_index]}

    def attention(self, x: torch.Tensor, shared: Optional[torch.Tensor]):
        """(A, v) of the map ``x``: the attention matrices and the values, projected already
        by the merged W_o W_v. (A method of its own, so that the normalised tokens are freed
        when it returns.)"""
        a, merged = self.attn, self.cache()
        if not a.computes:
            if shared is None:
                raise RuntimeError("a sharing attention unit needs the matrix of a computing unit")
            return shared, normed_product(x, self.norm1, self.kind, merged["w"])
        qkv = normed_product(x, self.norm1, self.kind, merged["w"])
        d = qkv.shape[-1] // 3
        if ops.c_kernels(qkv):  # scores, bias and softmax of each window in registers
            return kernels.attention_scores(qkv, merged["bias"], a.scale), qkv[..., 2 * d:]
        q, k, v = qkv.chunk(3, dim=-1)
        return torch.baddbmm(merged["bias"], q, k.transpose(-2, -1), alpha=a.scale).softmax(dim=-1), v

    def forward(self, x, shared: Optional[torch.Tensor] = None):
        if not inference(x):
            return super().forward(x, shared)
        attn, v = self.attention(x, shared)
        x, z = ops.attend_add_norm(attn, v, x, self.kind, self.norm2)
        return gfn(self.gfn, z, residual=x), attn


@register_form(paper.CAM)
class FusedCAM(FusedForm, paper.CAM):
    def forward(self, x):
        if not inference(x):
            return super().forward(x)
        x, z = channel_attention(self.ca_meso, x, self.norm1, self.norm2)
        x = gfn(self.gfn1, z, residual=x)
        x, z = channel_attention(self.ca_glob, x, self.norm3, self.norm4)
        return gfn(self.gfn2, z, residual=x)


@register_form(paper.ESA)
class FusedESA(FusedForm, paper.ESA):
    def forward(self, x):
        if not inference(x):
            return super().forward(x)
        c1 = ops.conv(self.conv1, x)
        y = ops.linear(c1, self.conv_f.weight, self.conv_f.bias, add=self.mask_input(x, c1))
        gate = ops.linear(y, self.conv4.weight, self.conv4.bias, act="sigmoid")
        return gate.mul_(x)  # a fresh map: x * gate in its memory


def cat(tensors: List[torch.Tensor]) -> torch.Tensor:
    """``torch.cat(tensors, -1)`` of NHWC maps, into a workspace buffer."""
    shape = tensors[0].shape[:-1] + (sum(t.shape[-1] for t in tensors),)
    return torch.cat(tensors, -1, out=kernels.empty(shape, tensors[0].dtype, tensors[0].device))


def pw_of_cat(module: paper.ConvNHWC, parts: List[torch.Tensor]) -> torch.Tensor:
    """``module(torch.cat(parts, -1))`` for a 1x1 conv: the C kernel reads the parts where
    they are (the concatenation is never written out); otherwise a workspace ``cat``."""
    if ops.c_kernels(parts[0]):
        y = kernels.linear(parts, module.weight.flatten(1), module.bias)
        if y is not None:
            return y
    return module(cat(parts))


@register_form(paper.IDB)
class FusedIDB(FusedForm, paper.IDB):
    def distill(self, x, shared):
        """The paper's ``distill`` with each concatenation read in place by the 1x1 conv that
        follows it."""
        if not (self.split and inference(x)):
            return super().distill(x, shared)
        q, out = self.q, []

        def sam(k, module, t):
            t, mats = module(t, out[0:2] if self.intra and k > 0 else shared[2 * k: 2 * k + 2])
            out.extend(mats)
            return t

        x = self.lm1(x)
        x = pw_of_cat(self.pw1, [sam(0, self.sam1, x[..., q:]), x[..., :q]])
        r1 = x[..., :q]
        x = self.lm2(x[..., q:])
        x = pw_of_cat(self.pw2, [sam(1, self.sam2, x[..., q:]), x[..., :q]])
        r2 = x[..., :q]
        x = self.lm3(x[..., q:])
        x = pw_of_cat(self.pw3, [r1, r2, sam(2, self.sam3, x[..., q:]), x[..., :q]])
        return self.cam(x), out

    def forward(self, x, shared):
        if not inference(x):
            return super().forward(x, shared)
        y, mats = self.distill(x, shared)
        return self.esa(ops.linear(y, self.conv.weight, self.conv.bias, add=x)), mats


@register_form(paper.SerialBlock)
class FusedSerialBlock(FusedForm, paper.SerialBlock):
    def forward(self, x, shared):
        if not inference(x):
            return super().forward(x, shared)
        y, mats = self.sam(self.lm(x))
        return self.esa(ops.linear(self.cam(y), self.conv.weight, self.conv.bias, add=x)), list(mats)


@register_form(paper.ASID)
class FusedASID(FusedForm, paper.ASID):
    def workspace(self) -> Workspace:
        """This network's workspace (made on first use; dropped by ``train()`` and by
        preparing again)."""
        ws = self.__dict__.get("_workspace")
        if ws is None:
            ws = self.__dict__.setdefault("_workspace", Workspace())
        return ws

    def deep_features_nhwc(self, x: torch.Tensor):
        """``features(x)`` with the features left NHWC (a workspace buffer)."""
        f0 = kernels.conv3x3(x.permute(0, 2, 3, 1), self.head) if ops.c_kernels(x) else None
        if f0 is None:  # (the C kernel writes F_0 into the workspace: oneDNN's output is fresh
            f0 = paper._nhwc(self.head(x.contiguous(memory_format=torch.channels_last)))  # memory)
        y, first = self.body(f0)
        return ops.conv_add_(self.fuse, y, f0), first  # F_0 + fuse(F_N) in F_0's memory

    def features(self, x: torch.Tensor):
        if not (inference(x) and kernels.enabled):
            return super().features(x)
        f, first = self.deep_features_nhwc(x)
        # NCHW for the upsampler (see forward_native), into a workspace buffer
        if ops.c_kernels(f):
            return kernels.to_nchw(f), first
        f = paper._nchw(f)
        return kernels.empty(f.shape, f.dtype, f.device).copy_(f), first

    def forward_native(self, x):
        if not (inference(x) and kernels.enabled and x.device.type == "cpu"):
            return super().forward_native(x)  # (CUDA's caching allocator keeps its memory)
        with active(self.workspace(), (tuple(x.shape), x.dtype, x.device)):
            h, w = x.shape[-2:]
            f, _ = self.deep_features_nhwc(self.pad(x))
            if ops.c_kernels(f):
                # the upsampler's conv and pixel shuffle straight from the NHWC features into
                # the cropped image, each tap summed on its own (within 7e-7 of the exact sum,
                # as oneDNN's NCHW conv; its channels_last kernel was 1.2e-6 off)
                y = kernels.upsample_conv(f, self.upsampler[0], self.scale, h * self.scale, w * self.scale)
                if y is not None:
                    return y
                f = kernels.to_nchw(f)
            else:  # NCHW for the upsampler (see the paper's forward_native)
                f = paper._nchw(f).contiguous()
            y = self.upsampler(f)
            return y[..., : h * self.scale, : w * self.scale].contiguous()
