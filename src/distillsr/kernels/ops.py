"""Inference ops on NHWC maps that pick the fastest implementation for their input.

Each op runs, in this order of preference:

* the C kernels of ``distillsr.kernels`` (CPU float32, compiled): LayerNorm written
  straight into window order, the residual add from windows fused with the next
  LayerNorm, depthwise convs with GELU or the GFN gate, small 1x1 convs;
* one oneDNN primitive with post-ops (CPU float32, and bfloat16 where oneDNN has bf16
  kernels): a matrix product or conv and what follows it (GELU, sigmoid, a residual add,
  a gate) in one pass over the map;
* the same computation op by op in PyTorch (CUDA, other dtypes, autocast, or with
  ``distillsr.kernels.enabled = False``).

They serve the fused inference forms of the models (``distillsr.kernels.asid``), which
call them only without autograd (no_grad / inference_mode); the results agree to
rounding whichever implementation runs.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import kernels
from ..models.asid import add_tokens, to_tokens

_MKLDNN = getattr(torch.ops, "mkldnn", None)
HAS_ONEDNN = (torch.backends.mkldnn.is_available() and _MKLDNN is not None
              and hasattr(_MKLDNN, "_linear_pointwise") and hasattr(_MKLDNN, "_convolution_pointwise"))
# oneDNN has no bf16 primitives on CPUs without AVX-512 (it fails to create them): there
# bf16 runs op by op.
ONEDNN_DTYPES = (torch.float32,) + ((torch.bfloat16,) if HAS_ONEDNN and getattr(
    _MKLDNN, "_is_mkldnn_bf16_supported", lambda: False)() else ())


def _nchw(x: torch.Tensor) -> torch.Tensor:
    return x.permute(0, 3, 1, 2)


def _nhwc(y: torch.Tensor) -> torch.Tensor:
    return y.permute(0, 2, 3, 1).contiguous()


def inference(x: torch.Tensor) -> bool:
    """Whether a fused form may run on ``x``: no autograd, a plain tensor (not a fake or
    functional one of a tracer), no tracing or compiling. Otherwise the paper form runs."""
    return (not torch.is_grad_enabled() and type(x) is torch.Tensor
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def onednn(x: torch.Tensor) -> bool:
    """oneDNN primitives with post-ops apply to ``x``."""
    return (kernels.enabled and HAS_ONEDNN and type(x) is torch.Tensor and x.device.type == "cpu"
            and x.dtype in ONEDNN_DTYPES and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling())


def c_kernels(x: torch.Tensor) -> bool:
    """The C kernels apply to ``x`` (CPU float32, compiled; see ``kernels.available``)."""
    return kernels.available(x)


def _act(y: torch.Tensor, act: Optional[str]) -> torch.Tensor:
    if act == "gelu":
        return F.gelu(y)
    if act == "sigmoid":
        return torch.sigmoid(y)
    return y


def linear(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           act: Optional[str] = None, add: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``act(x W^T + b)`` or ``x W^T + b + add`` over the channels of an NHWC map
    (a 1x1 conv or a linear layer; ``weight`` (out, in) or (out, in, 1, 1))."""
    w = weight.flatten(1)
    n, k = w.shape
    if c_kernels(x):
        # the C kernel writes into the workspace's buffers, where oneDNN's outputs would be
        # page-faulted in afresh at every call (see distillsr.kernels.workspace)
        y = kernels.linear(x, w, bias, act, add)
        if y is not None:
            return y
    if onednn(x):
        x2 = x.reshape(-1, x.shape[-1])
        if add is not None:
            y = _MKLDNN._linear_pointwise.binary(x2, add.reshape(-1, w.shape[0]), w, bias, "add")
        else:
            y = _MKLDNN._linear_pointwise(x2, w, bias, act or "none", [], "none" if act == "gelu" else "")
        return y.view(*x.shape[:-1], w.shape[0])
    y = _act(F.linear(x.reshape(-1, x.shape[-1]), w, bias).view(*x.shape[:-1], w.shape[0]), act)
    return y if add is None else y + add


def conv(module: nn.Conv2d, x: torch.Tensor, act: Optional[str] = None,
         mul: Optional[torch.Tensor] = None, channels: Optional[slice] = None) -> torch.Tensor:
    """``act(conv(x))`` or ``conv(x) * mul`` on an NHWC map; ``channels`` restricts a
    depthwise conv to some of its channels (``x`` holds just those)."""
    w, b = module.weight, module.bias
    if (module.kernel_size == (1, 1) and module.stride == (1, 1) and module.groups == 1
            and module.padding == (0, 0)):
        y = linear(x, w, b, act)
        return y if mul is None else y * mul
    groups = module.groups
    if channels is not None:
        w, b, groups = w[channels], (None if b is None else b[channels]), x.shape[-1]
    if onednn(x):
        xc = _nchw(x.contiguous())
        args = (module.padding, module.stride, module.dilation, groups)
        if mul is not None:
            y = _MKLDNN._convolution_pointwise.binary(xc, _nchw(mul.contiguous()), w, b, *args,
                                                      "mul", None, None, [], None)
        else:
            y = _MKLDNN._convolution_pointwise(xc, w, b, *args, act or "none", [],
                                               "none" if act == "gelu" else "")
        return _nhwc(y)
    y = _act(_nhwc(F.conv2d(_nchw(x), w, b, module.stride, module.padding, module.dilation, groups)), act)
    return y if mul is None else y * mul


def layer_norm(x: torch.Tensor, norm: nn.Module, layout: str = "image") -> torch.Tensor:
    """``norm`` (a LayerNorm over channels) of the NHWC map ``x``, in ``layout`` token order
    ("image": the map itself)."""
    if c_kernels(x):
        return kernels.layer_norm(x, norm, layout)
    return norm(x if layout == "image" else to_tokens(x, layout))


def add_tokens_norm(x: torch.Tensor, t: torch.Tensor, layout: str,
                    norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``y = x + from_tokens(t, layout)`` and ``norm(y)`` (one pass with the C kernels)."""
    if c_kernels(x):
        return kernels.add_tokens_norm(x, t, layout, norm)
    y = add_tokens(x, t, layout)
    return y, norm(y)


def attend_add_norm(attn: torch.Tensor, v: torch.Tensor, x: torch.Tensor, layout: str,
                    norm: nn.Module) -> Tuple[torch.Tensor, torch.Tensor]:
    """``add_tokens_norm(x, attn @ v, layout, norm)``; the C kernel adds each window's (or
    grid group's) ``attn @ v`` into the map as it computes it."""
    if c_kernels(x):
        out = kernels.attend_add_norm(attn, v, x, layout, norm)
        if out is not None:
            return out
    return add_tokens_norm(x, torch.bmm(attn, v), layout, norm)


def conv_add_(module: nn.Conv2d, x: torch.Tensor, acc: torch.Tensor) -> torch.Tensor:
    """``acc += conv(x)`` on NHWC maps, in the memory of ``acc`` (oneDNN: the conv's sum
    written straight into it); returns ``acc``."""
    if onednn(x) and acc.is_contiguous():
        _MKLDNN._convolution_pointwise_.binary(_nchw(acc), _nchw(x.contiguous()), module.weight, module.bias,
                                               module.padding, module.stride, module.dilation, module.groups,
                                               "add", None, None, [], None)
        return acc
    return acc.add_(conv(module, x))
