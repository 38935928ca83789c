"""Fused CPU kernels for inference, and the step that puts them to work.

:func:`prepare_for_inference` (``distillsr.kernels.prepare``) readies a model for fast
inference: its modules take fused forms (``distillsr.kernels.asid``) that merge what is
exact algebraically and run the ops of ``distillsr.kernels.ops``: the C kernels below,
oneDNN primitives with post-ops, or PyTorch. Unprepared models (training, export) run
their paper modules.

``nhwc.c`` holds the steps of ASID that PyTorch runs as several passes over a map (or
slowly, for maps of 12-48 channels): 1x1 convs with bias, GELU, sigmoid or a residual add
(8 rows x 24 outputs in registers, where oneDNN reaches a third to a half of the machine's
rate; the input may be up to four maps side by side, a concatenation never written out),
a LayerNorm taken by the product after it in window/grid token order (``norm_linear``),
LayerNorm alone, the residual add back from tokens fused with the next LayerNorm, depthwise
3x3 convs with GELU or the GFN's gate (and the channel means SE needs; q, k, v in one pass),
the whole GFN row by row (``gfn_rows``; ``gate_linear`` its last two steps), a CAM's
LayerNorm, qkv product and q, k, v convs row by row (``qkv_rows``), the attention output ``A v``
added into the map and normalised, a computing unit's scores, bias and softmax in one pass,
the CAM's channel attention group by group in cache (``channel_attention``), and a tiled
NHWC -> NCHW copy, all writing into the workspace of the prepared model
(``distillsr.kernels.workspace``). The C file is
compiled once with the system C compiler (``$CC``, else ``cc``, else ``gcc``; flags
``-O3 -march=native -fopenmp``) into ``$DISTILLSR_CACHE/kernels`` (default
``~/.cache/distillsr/kernels``) and loaded with ctypes. Without a compiler, or when the
build fails (logged as a warning; :func:`build_error` says why), ``available()`` is False
and prepared models use oneDNN and PyTorch: same results (to rounding), slower.

``enabled`` is the one switch for all fused CPU kernels, the C ones and oneDNN's post-ops
(initially off when the environment has ``DISTILLSR_KERNELS=0``); prepared models then
run their merged computation op by op.
"""
from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Optional

import torch

log = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("nhwc.c")
# Read at import, so that the compiled functions always match the signatures declared
# below, even if the package is replaced on disk while a process runs (a long training
# run whose first validation compiles the kernels).
_SOURCE_TEXT = SOURCE.read_bytes() if SOURCE.exists() else b""
LAYOUTS = {"image": 0, "meso": 1, "global": 2, "grid": 3}
MAX_CHANNELS = 256  # MAX_C in nhwc.c
FLAGS = ["-O3", "-march=native", "-fopenmp", "-fno-math-errno", "-shared", "-fPIC"]

_lib: Optional[ctypes.CDLL] = None
_tried = False
_error: Optional[str] = None
# the one switch for the fused CPU kernels (C kernels and oneDNN post-ops), read at every call
enabled = os.environ.get("DISTILLSR_KERNELS", "1") != "0"

from .prepare import (is_prepared, paper_modules, prepare_for_inference,  # noqa: E402,F401
                      restore_paper_modules)
from .workspace import Workspace, empty  # noqa: E402,F401


def cache_dir() -> Path:
    root = os.environ.get("DISTILLSR_CACHE")
    return (Path(root) if root else Path.home() / ".cache" / "distillsr") / "kernels"


def compiler() -> Optional[str]:
    """The C compiler the build uses (``$CC``, else ``cc``, else ``gcc``); None if none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_error() -> Optional[str]:
    """Why the kernels are not built here (after ``built()`` said False), else None."""
    return _error


def _compile() -> Optional[Path]:
    global _error
    source = _SOURCE_TEXT
    if not source:
        _error = f"{SOURCE} is missing"
        log.warning("%s: fused C kernels off", _error)
        return None
    cc = compiler()
    if cc is None:
        _error = "no C compiler found"
        log.info("%s: fused C kernels off", _error)
        return None
    key = hashlib.sha256(source + " ".join([cc] + FLAGS).encode()).hexdigest()[:16]
    target = cache_dir() / f"nhwc-{key}.so"
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    for stale in target.parent.glob("nhwc-*.so"):  # builds of older sources or flags
        stale.unlink(missing_ok=True)
    fd, tmp = tempfile.mkstemp(suffix=".so", dir=target.parent)
    os.close(fd)
    src = Path(tmp).with_suffix(".c")
    try:
        src.write_bytes(source)
        subprocess.run([cc, *FLAGS, "-o", tmp, str(src), "-lm"], check=True,
                       capture_output=True, timeout=120)
        os.replace(tmp, target)  # atomic: a concurrent process sees all of it or nothing
    except (OSError, subprocess.SubprocessError) as e:
        detail = (getattr(e, "stderr", b"") or b"").decode(errors="replace")[-2000:]
        _error = f"compiling {SOURCE.name} with {cc} failed: {detail or e}"
        log.warning("%s; fused C kernels off", _error)
        Path(tmp).unlink(missing_ok=True)
        return None
    finally:
        src.unlink(missing_ok=True)
    return target


def _load() -> Optional[ctypes.CDLL]:
    global _lib, _tried, _error
    if _tried:
        return _lib
    _tried = True
    _error = None
    if not sys.platform.startswith("linux"):
        _error = "the C kernels are built on Linux only"
        return None
    path = _compile()
    if path is None:
        return None
    try:
        lib = ctypes.CDLL(str(path))
    except OSError as e:
        _error = f"loading {path} failed: {e}"
        log.warning("%s; fused C kernels off", _error)
        return None
    P, L, I, F = ctypes.c_void_p, ctypes.c_long, ctypes.c_int, ctypes.c_float
    lib.layer_norm.argtypes = [P, L, P, I, I, I, I, P, P, F, I, I]
    lib.add_tokens_norm.argtypes = [P, L, P, P, P, I, I, I, I, P, P, F, I, I]
    lib.dwconv3x3.argtypes = [P, L, P, P, P, P, P, P, I, I, I, I, I, I, I, I]
    lib.token_norms.argtypes = [P, P, L, L, I, I]
    lib.attend_add_norm.argtypes = [P, P, L, P, L, P, P, I, I, I, I, P, P, F, I, I]
    lib.attend_add_norm.restype = ctypes.c_int
    lib.attention_scores.argtypes = [P, P, L, L, P, F, P, L, I, I]
    lib.linear_small.argtypes = [P, P, P, I, P, P, P, L, P, L, I, I, I]
    lib.linear_small.restype = ctypes.c_int
    lib.nhwc_to_nchw.argtypes = [P, L, P, I, I, I, I, I]
    lib.channel_attention.argtypes = [P, P, P, L, L, L, I, F, P, P, I]
    lib.channel_attention.restype = ctypes.c_int
    lib.gate_linear.argtypes = [P, P, L, P, P, I, I, I, I, P, P, L, P, I, I]
    lib.gate_linear.restype = ctypes.c_int
    lib.norm_linear.argtypes = [P, L, I, I, I, I, P, P, F, I, P, P, P, I, I]
    lib.norm_linear.restype = ctypes.c_int
    lib.upsample_conv.argtypes = [P, L, I, I, I, I, P, P, I, I, P, I, I, I]
    lib.upsample_conv.restype = ctypes.c_int
    lib.conv3x3.argtypes = [P, L, I, I, I, I, P, P, I, P, I]
    lib.conv3x3.restype = ctypes.c_int
    lib.gfn_rows.argtypes = [P, L, I, I, I, I, P, P, P, P, P, L, P, I]
    lib.gfn_rows.restype = ctypes.c_int
    lib.qkv_rows.argtypes = [P, L, I, I, I, I, P, P, F, P, P, P, I, I]
    lib.qkv_rows.restype = ctypes.c_int
    for f in (lib.layer_norm, lib.add_tokens_norm, lib.dwconv3x3, lib.token_norms, lib.attention_scores,
              lib.nhwc_to_nchw):
        f.restype = None
    _lib = lib
    return lib


def built() -> bool:
    """Whether the kernels are compiled and loaded here (compiling them on the first call;
    whatever ``enabled`` says)."""
    return _load() is not None


def available(x: torch.Tensor) -> bool:
    """True where the kernels apply to ``x``: ``enabled``, CPU float32 inference (no
    autograd, autocast, tracing or compiling), and the kernels compiled."""
    return (enabled and type(x) is torch.Tensor and x.device.type == "cpu"
            and x.dtype == torch.float32 and not torch.is_grad_enabled()
            and not torch.is_autocast_enabled("cpu")  # autocast's ops make bf16 maps
            and not torch.jit.is_tracing() and not torch.compiler.is_compiling()
            and _load() is not None)


def _kernels() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError("the fused CPU kernels are not available (see distillsr.kernels)")
    return lib


def _pixels(x: torch.Tensor):
    """(B, H, W, C) map whose pixels are evenly spaced rows with unit channel stride."""
    b, h, w, c = x.shape
    s = x.stride()
    if s[3] != 1 or s[2] < c or s[1] != w * s[2] or s[0] != h * s[1]:
        x = x.contiguous()
        s = x.stride()
    return x, s[2]


def _f32(t: Optional[torch.Tensor]):
    return None if t is None else t.detach().contiguous().float()


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else t.data_ptr()


def _tokens_shape(shape, layout: str):
    b, h, w, c = shape
    if layout == "image":
        return (b, h, w, c)
    groups = b * 64 if layout == "grid" else b * (h // 8) * (w // 8)
    return (groups, h * w * b // groups, c)


def layer_norm(x: torch.Tensor, norm, layout: str = "image") -> torch.Tensor:
    """``norm`` (a LayerNorm over channels) of the NHWC map ``x``, written in ``layout``
    token order (as ``to_tokens(norm(x), layout)``)."""
    x, xs = _pixels(x)
    b, h, w, c = x.shape
    y = empty(_tokens_shape(x.shape, layout), x.dtype)
    weight, bias = _f32(norm.weight), _f32(norm.bias)
    _kernels().layer_norm(x.data_ptr(), xs, y.data_ptr(), b, h, w, c, weight.data_ptr(), bias.data_ptr(),
                    norm.eps, LAYOUTS[layout], torch.get_num_threads())
    return y


def add_tokens_norm(x: torch.Tensor, t: torch.Tensor, layout: str, norm=None):
    """``y = x + from_tokens(t, layout)`` and ``norm(y)`` in one pass (NHWC);
    returns ``(y, norm(y))``, or ``y`` when ``norm`` is None."""
    x, xs = _pixels(x)
    b, h, w, c = x.shape
    t = t.contiguous()
    y = empty((b, h, w, c), x.dtype)
    z = None if norm is None else empty((b, h, w, c), x.dtype)
    weight, bias = (None, None) if norm is None else (_f32(norm.weight), _f32(norm.bias))
    _kernels().add_tokens_norm(x.data_ptr(), xs, t.data_ptr(), y.data_ptr(), _ptr(z), b, h, w, c,
                         _ptr(weight), _ptr(bias), norm.eps if norm is not None else 0.0,
                         LAYOUTS[layout], torch.get_num_threads())
    return y if norm is None else (y, z)


def _taps(weight: torch.Tensor) -> torch.Tensor:
    """(C, 1, 3, 3) depthwise weight -> (9, C)."""
    return weight.detach().float().reshape(weight.shape[0], 9).t().contiguous()


def dwconv3x3(x: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
              act: Optional[str] = None, gate: Optional[tuple] = None,
              layout: str = "image", channel_means: bool = False, split: int = 1):
    """Depthwise 3x3 conv (padding 1) of an NHWC map, ``act`` None or "gelu", output in
    ``layout`` token order. ``gate=(x2, weight2)``: returns ``act(conv(x)) * conv2(x2)``.
    ``channel_means`` (image layout): returns ``(y, y.mean(dim=(1, 2)))``, the means
    summed while each row is still in cache. ``split=n`` (no bias, gate or means): the
    channels are n equal parts, each returned as a map of its own (a list), every input row
    read once for all of them."""
    if act not in (None, "gelu"):
        raise ValueError(f"unsupported activation {act!r}")
    if split < 1 or x.shape[-1] % split or (split > 1 and (bias is not None or gate is not None
                                                            or channel_means)):
        raise ValueError(f"cannot split {x.shape[-1]} channels in {split} parts here")
    c_part = x.shape[-1] // split
    if c_part > MAX_CHANNELS:
        raise ValueError(f"dwconv3x3 takes at most {MAX_CHANNELS} channels, not {c_part}")
    x, xs = _pixels(x)
    b, h, w, _ = x.shape
    x2 = w2 = None
    if gate is not None:
        x2, w2 = gate
        x2, xs2 = _pixels(x2)
        if x2.shape != x.shape or xs2 != xs:
            raise ValueError("the gate's input must be laid out as the conv's")
        w2 = _taps(w2)
    if channel_means and layout != "image":
        raise ValueError("channel_means needs the image layout")
    shape = _tokens_shape((b, h, w, c_part), layout)
    y = empty((split,) + tuple(shape), x.dtype)
    sums = torch.empty((b, h, c_part), dtype=x.dtype) if channel_means else None
    taps = weight.detach().float().reshape(split, c_part, 9).transpose(1, 2).contiguous()  # (split, 9, C)
    bias = _f32(bias)  # kept alive through the call, as taps
    _kernels().dwconv3x3(x.data_ptr(), xs, taps.data_ptr(), _ptr(bias), _ptr(x2), _ptr(w2),
                   y.data_ptr(), _ptr(sums), b, h, w, c_part, split, 1 if act == "gelu" else 0,
                   LAYOUTS[layout], torch.get_num_threads())
    if split > 1:
        return list(y.unbind(0))
    y = y[0]
    if channel_means:
        return y, sums.sum(dim=1) / (h * w)
    return y


def norm_linear(x: torch.Tensor, norm, layout: str, weight: torch.Tensor,
                bias: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``linear(layer_norm(x, norm, layout), weight, bias)`` (NHWC map in, tokens in
    ``layout`` order out: "image", "meso" or "global"), the normalised map never written
    out. None where the width or layout is not compiled (the caller runs the two steps)."""
    n, k = weight.shape[0], weight.flatten(1).shape[1]
    if (layout not in ("image", "meso", "global") or not linear_width(n) or x.shape[-1] != k
            or k > MAX_CHANNELS):
        return None
    x, xs = _pixels(x)
    b, h, w, _ = x.shape
    wt = weight.detach().reshape(n, k).t().contiguous().float()
    gamma, beta, bias = _f32(norm.weight), _f32(norm.bias), _f32(bias)
    y = empty(tuple(_tokens_shape((b, h, w, k), layout)[:-1]) + (n,), x.dtype)
    ok = _kernels().norm_linear(x.data_ptr(), xs, b, h, w, k, gamma.data_ptr(), beta.data_ptr(), norm.eps,
                                LAYOUTS[layout], wt.data_ptr(), _ptr(bias), y.data_ptr(), n,
                                torch.get_num_threads())
    return y if ok else None


def qkv_rows(x: torch.Tensor, norm, w_qkv: torch.Tensor, w_dw: torch.Tensor, layout: str):
    """q, k, v of ASID's channel attention from the NHWC map ``x`` (d channels): ``norm`` (a
    LayerNorm), the 1x1 conv ``w_qkv`` (3d, d), the depthwise 3x3 conv ``w_dw`` (3d, 1, 3, 3)
    of each third, each returned as tokens in ``layout`` order (as ``dwconv3x3(..., split=3)``
    of ``norm_linear``), row by row: the 3d-channel map is never written out. None where d or
    the layout is not compiled."""
    d = x.shape[-1]
    if (d not in (12, 16, 24, 32, 36, 48) or layout not in LAYOUTS or w_qkv.flatten(1).shape != (3 * d, d)
            or w_dw.shape != (3 * d, 1, 3, 3) or not linear_width(3 * d)):
        return None
    x, xs = _pixels(x)
    b, h, w, _ = x.shape
    wt = w_qkv.detach().reshape(3 * d, d).t().contiguous().float()
    taps = w_dw.detach().float().reshape(3, d, 9).transpose(1, 2).contiguous()  # (3, 9, d)
    gamma, beta = _f32(norm.weight), _f32(norm.bias)
    y = empty((3,) + tuple(_tokens_shape((b, h, w, d), layout)), x.dtype)
    ok = _kernels().qkv_rows(x.data_ptr(), xs, b, h, w, d, gamma.data_ptr(), beta.data_ptr(), norm.eps,
                             wt.data_ptr(), taps.data_ptr(), y.data_ptr(), LAYOUTS[layout],
                             torch.get_num_threads())
    return list(y.unbind(0)) if ok else None


def gfn_rows(x: torch.Tensor, w_in: torch.Tensor, w_dw: torch.Tensor, w_out: torch.Tensor,
             add: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """ASID's GFN on an NHWC map of d channels, ``(GELU(dw(h1)) * dw2(h2)) W_out^T (+ add)``
    with ``[h1 h2] = x W_in^T`` (``w_in`` (2d, d), ``w_dw`` (2d, 1, 3, 3), ``w_out`` (d, d), no
    biases), row by row: neither the 2d-channel map nor the gate is written out. None where
    d is not a compiled width (the caller runs the steps)."""
    d = x.shape[-1]
    if (d not in (12, 16, 24, 32, 36, 48) or w_in.flatten(1).shape != (2 * d, d)
            or w_dw.shape != (2 * d, 1, 3, 3) or w_out.flatten(1).shape != (d, d)):
        return None
    x, xs = _pixels(x)
    b, h, w, _ = x.shape
    a = lda = None
    if add is not None:
        a, lda = _pixels(add)
        if a.shape != x.shape:
            raise ValueError(f"the added map {tuple(add.shape)} does not fit a {tuple(x.shape)} output")
    win_t = w_in.detach().reshape(2 * d, d).t().contiguous().float()
    wo_t = w_out.detach().reshape(d, d).t().contiguous().float()
    taps, taps2 = _taps(w_dw[:d]), _taps(w_dw[d:])
    y = empty((b, h, w, d), x.dtype)
    ok = _kernels().gfn_rows(x.data_ptr(), xs, b, h, w, d, win_t.data_ptr(), taps.data_ptr(), taps2.data_ptr(),
                             wo_t.data_ptr(), _ptr(a), 0 if a is None else lda, y.data_ptr(),
                             torch.get_num_threads())
    return y if ok else None


def gate_linear(x: torch.Tensor, weight: torch.Tensor, x2: torch.Tensor, weight2: torch.Tensor,
                w_out: torch.Tensor, add: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``(GELU(dw(x)) * dw2(x2)) W_out^T (+ add)`` on NHWC maps (depthwise 3x3 convs without
    bias, padding 1; ``w_out`` (N, C)): the GFN's gate and output product, the gate never
    written out. None where a width is not compiled (the caller runs the two steps)."""
    n, c = w_out.shape[0], x.shape[-1]
    if w_out.flatten(1).shape[1] != c or not linear_width(n):
        return None
    x, xs = _pixels(x)
    x2, xs2 = _pixels(x2)
    if x2.shape != x.shape or xs2 != xs:
        raise ValueError("the gate's input must be laid out as the conv's")
    b, h, w, _ = x.shape
    a = None
    if add is not None:
        a, lda = _pixels(add)
        if a.shape != (b, h, w, n):
            raise ValueError(f"the added map {tuple(add.shape)} does not fit a {(b, h, w, n)} output")
    taps, taps2 = _taps(weight), _taps(weight2)
    wo_t = w_out.detach().reshape(n, c).t().contiguous().float()
    y = empty((b, h, w, n), x.dtype)
    ok = _kernels().gate_linear(x.data_ptr(), x2.data_ptr(), xs, taps.data_ptr(), taps2.data_ptr(), b, h, w, c,
                                wo_t.data_ptr(), _ptr(a), 0 if a is None else lda, y.data_ptr(), n,
                                torch.get_num_threads())
    return y if ok else None


_WIDTHS = (12, 16, 24, 32, 36, 48, 60, 72, 84, 96, 108, 120, 132, 144)


def _conv3x3_product(conv, c: int, n: int):
    """(weights (9 C, Np) tap-major, bias (Np,), Np) of a 3x3 conv of C -> n channels as a
    product over its nine taps, n padded to a width the C kernel computes (zero columns);
    None where the conv is not one (padding 1, stride 1, ungrouped) or n is too wide."""
    if (conv.kernel_size != (3, 3) or conv.padding != (1, 1) or conv.stride != (1, 1) or conv.dilation != (1, 1)
            or conv.groups != 1 or conv.weight.shape != (n, c, 3, 3) or c > 64):
        return None
    n_pad = next((v for v in _WIDTHS if v >= n), None)
    if n_pad is None:
        return None
    wt = torch.zeros(9 * c, n_pad)
    wt[:, :n] = conv.weight.detach().float().permute(2, 3, 1, 0).reshape(9 * c, n)  # (tap, c) x out
    bias = torch.zeros(n_pad)
    if conv.bias is not None:
        bias[:n] = conv.bias.detach().float()
    return wt, bias, n_pad


def conv3x3(x: torch.Tensor, conv) -> Optional[torch.Tensor]:
    """``conv`` (3x3, padding 1) of the NHWC map ``x`` as one product over the nine taps of each
    pixel, each tap summed on its own and then the nine sums; NHWC out, in the workspace. None
    where it does not apply (the caller runs the conv)."""
    b, h, w, c = x.shape
    n = conv.out_channels
    prod = _conv3x3_product(conv, c, n) if x.dtype == torch.float32 else None
    if prod is None:
        return None
    wt, bias, n_pad = prod
    x, xs = _pixels(x)
    y = empty((b, h, w, n_pad), x.dtype)
    ok = _kernels().conv3x3(x.data_ptr(), xs, b, h, w, c, wt.data_ptr(), bias.data_ptr(), n_pad, y.data_ptr(),
                            torch.get_num_threads())
    if not ok:
        return None
    return y if n_pad == n else y[..., :n]


def upsample_conv(x: torch.Tensor, conv, scale: int, out_h: int, out_w: int) -> Optional[torch.Tensor]:
    """``pixel_shuffle(conv(x), scale)`` cropped to ``out_h`` x ``out_w``, from the NHWC map
    ``x`` (B, H, W, C) into a new NCHW image (B, 3, out_h, out_w): ``conv`` the network's last
    3x3 conv (padding 1, C -> 3 scale^2, with bias), computed as one product over the nine
    taps per pixel (as ``conv3x3``). None where it does not apply (the caller runs the conv)."""
    b, h, w, c = x.shape
    prod = None
    if x.dtype == torch.float32 and out_h <= h * scale and out_w <= w * scale:
        prod = _conv3x3_product(conv, c, 3 * scale * scale)
    if prod is None:
        return None
    wt, bias, n_pad = prod
    x, xs = _pixels(x)
    y = torch.empty((b, 3, out_h, out_w), dtype=x.dtype)  # the caller's: not a workspace buffer
    ok = _kernels().upsample_conv(x.data_ptr(), xs, b, h, w, c, wt.data_ptr(), bias.data_ptr(), n_pad, scale,
                                  y.data_ptr(), out_h, out_w, torch.get_num_threads())
    return y if ok else None


def to_nchw(x: torch.Tensor) -> torch.Tensor:
    """The NHWC map ``x`` (B, H, W, C) as a contiguous NCHW tensor (B, C, H, W), copied into
    the workspace by tiles."""
    x, xs = _pixels(x)
    b, h, w, c = x.shape
    y = empty((b, c, h, w), x.dtype)
    _kernels().nhwc_to_nchw(x.data_ptr(), xs, y.data_ptr(), b, h, w, c, torch.get_num_threads())
    return y


def channel_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, temperature: float,
                      w_out: torch.Tensor) -> Optional[torch.Tensor]:
    """``(v @ A^T) @ w_out^T`` with ``A = softmax(q^T k * (temperature / (|q| |k|)))`` for
    (G, P, C) tokens (norms over the P tokens): ASID's transposed channel attention and its
    output projection, group by group in cache. None where C is not a multiple of 8 up to 48
    (the caller runs the batched products)."""
    g, p, c = q.shape
    if c % 8 or not 8 <= c <= 48 or k.shape != q.shape or v.shape != q.shape:
        return None
    q, k, v = (t if t.is_contiguous() else t.contiguous() for t in (q, k, v))
    wo_t = w_out.detach().reshape(c, c).t().contiguous().float()
    y = empty((g, p, c), q.dtype)
    _kernels().channel_attention(q.data_ptr(), k.data_ptr(), v.data_ptr(), p * c, g, p, c, float(temperature),
                                 wo_t.data_ptr(), y.data_ptr(), torch.get_num_threads())
    return y


def token_norms(t: torch.Tensor) -> torch.Tensor:
    """L2 norm over the tokens of each group: (G, P, C) -> (G, C)."""
    g, p, c = t.shape
    if c > MAX_CHANNELS:
        return torch.linalg.vector_norm(t, dim=1)
    t = t.contiguous()
    out = torch.empty((g, c), dtype=t.dtype)
    _kernels().token_norms(t.data_ptr(), out.data_ptr(), g, p, c, torch.get_num_threads())
    return out



def attend_add_norm(attn: torch.Tensor, v: torch.Tensor, x: torch.Tensor, layout: str, norm):
    """``y = x + from_tokens(attn @ v, layout)`` and ``norm(y)`` without materialising
    ``attn @ v``: ``attn`` (G, 64, 64), ``v`` (G, 64, d) tokens of the NHWC map ``x``
    (``layout`` "meso" or "global"). Returns ``(y, norm(y))``, or None for a width the
    kernel is not compiled for (d a multiple of 4 from 12 to 36)."""
    x, xs = _pixels(x)
    b, h, w, d = x.shape
    if layout not in ("meso", "global") or d % 4 or not 12 <= d <= 36:
        return None
    attn = attn.contiguous()
    if v.stride(2) != 1 or v.stride(0) != 64 * v.stride(1):  # rows of d at one stride (a slice is fine)
        v = v.contiguous()
    if attn.shape != (b * (h // 8) * (w // 8), 64, 64) or v.shape != (attn.shape[0], 64, d):
        raise ValueError(f"attention {tuple(attn.shape)} and values {tuple(v.shape)} do not fit a "
                         f"{tuple(x.shape)} map in {layout} windows")
    y, z = empty((b, h, w, d)), empty((b, h, w, d))
    g, be = _f32(norm.weight), _f32(norm.bias)
    _kernels().attend_add_norm(attn.data_ptr(), v.data_ptr(), v.stride(1), x.data_ptr(), xs, y.data_ptr(), z.data_ptr(),
                               b, h, w, d, g.data_ptr(), be.data_ptr(), norm.eps, LAYOUTS[layout],
                               torch.get_num_threads())
    return y, z


def attention_scores(qkv: torch.Tensor, bias: torch.Tensor, scale: float) -> torch.Tensor:
    """``softmax(scale * q @ k^T + bias)`` of the tokens ``qkv`` (G, 64, 3d), q and k its
    first two thirds, ``bias`` (64, 64): the (G, 64, 64) attention matrices of a computing
    unit, in one pass that keeps each group's scores in registers."""
    g, n, c3 = qkv.shape
    d = c3 // 3
    if n != 64 or c3 != 3 * d or d > 64:
        raise ValueError(f"attention_scores needs (groups, 64, 3d) tokens with d <= 64, not {tuple(qkv.shape)}")
    qkv = qkv.contiguous()
    bias = _f32(bias)
    out = empty((g, 64, 64), qkv.dtype)
    _kernels().attention_scores(qkv.data_ptr(), qkv.data_ptr() + 4 * d, 3 * d, 64 * 3 * d, bias.data_ptr(),
                                float(scale), out.data_ptr(), g, d, torch.get_num_threads())
    return out


LINEAR_WIDTHS = (12, 16, 24, 32, 36, 48)
ACTS = {None: 0, "gelu": 1, "sigmoid": 2}


def linear_width(n: int) -> bool:
    """Whether the C kernel computes products of ``n`` outputs: one of ``LINEAR_WIDTHS``, or
    a multiple of 12 (run as column chunks of 24)."""
    return n in LINEAR_WIDTHS or n % 12 == 0


def linear(x, weight: torch.Tensor, bias: Optional[torch.Tensor] = None,
           act: Optional[str] = None, add: Optional[torch.Tensor] = None) -> Optional[torch.Tensor]:
    """``act(x W^T + b)`` (+ ``add``) over the last dimension of ``x`` (..., K), ``act``
    None, "gelu" or "sigmoid", for ``weight`` (N, K) with ``linear_width(N)``; rows of ``x``
    and of ``add`` may be strided (channel slices). ``x`` may be a list of up to four maps of
    the same pixels: the product of their concatenation over channels, which is never
    written out. Returns None for other widths (the caller uses oneDNN)."""
    parts = list(x) if isinstance(x, (list, tuple)) else [x]
    n, k = weight.shape[0], weight.shape[-1]
    if (not linear_width(n) or act not in ACTS or not 1 <= len(parts) <= 4
            or sum(p.shape[-1] for p in parts) != k
            or any(p.shape[:-1] != parts[0].shape[:-1] for p in parts)):
        return None
    rows = []
    for p in parts:
        p2 = p.reshape(-1, p.shape[-1]) if p.dim() != 2 else p
        if p2.stride(-1) != 1 or (p2.shape[0] > 1 and p2.stride(0) < p2.shape[1]):
            p2 = p2.contiguous()
        rows.append(p2)
    m = rows[0].shape[0]
    wt = weight.detach().reshape(n, k).t().contiguous().float()
    b = _f32(bias)
    a = None
    if add is not None:
        if add.dtype != torch.float32:
            return None
        a = add.reshape(m, n)
        if a.stride(-1) != 1:
            a = a.contiguous()
    y = empty(parts[0].shape[:-1] + (n,), parts[0].dtype)
    ptrs = (ctypes.c_void_p * 4)(*[r.data_ptr() for r in rows])
    strides = (ctypes.c_long * 4)(*[r.stride(0) for r in rows])
    widths = (ctypes.c_int * 4)(*[r.shape[1] for r in rows])
    _kernels().linear_small(ptrs, strides, widths, len(rows), wt.data_ptr(), _ptr(b), _ptr(a),
                            0 if a is None else a.stride(0), y.data_ptr(), m, n, ACTS[act],
                            torch.get_num_threads())
    return y
