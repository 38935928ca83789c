"""Cost and speed of a network: parameters, multiply-accumulates, latency, peak memory.

MACs are counted from the shapes alone, on the ``meta`` device (no arithmetic runs),
at the operator level, so they do not depend on how a model is written:

* ``conv``: every convolution, ``out.numel() * in/groups * kh * kw``;
* ``linear``: every matrix product with a weight (``mm`` / ``addmm``: linear layers,
  and 1x1 convs written as matrix products), ``out.numel() * in_features``;
* ``attention``: batched products of two activations (``bmm`` / ``baddbmm``: q k^T
  and A v of spatial and channel attention).

Conventions (all for the padded input the network really computes on):

* ``macs`` = conv + linear: the usual convention of SR papers' "FLOPs" (ASID x4 at a
  1280x720 output: 17.00 G);
* ``macs_paper`` = ``macs`` + one add per output of a conv/linear with bias + 2 per
  element of every ``nn.LayerNorm`` input: what the ASID paper's tables appear to count
  (17.16 G for x4, paper 17.2 G; 63.56 G for x2, paper 63.592 G);
* ``macs_total`` = ``macs`` + attention; ``2 * macs_total`` are the FLOPs a
  ``torch.utils.flop_counter.FlopCounterMode`` reports (41.59 G for ASID x4).

Timing: :func:`measure_latency` (median after warm-up), :func:`measure_sgemm` (the
machine's fp32 matrix-multiply rate, the yardstick of achieved GFLOP/s),
:func:`peak_memory` (peak RSS on the CPU, ``max_memory_allocated`` on CUDA).
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import math
import statistics
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode

from ..kernels import prepare_for_inference

__all__ = ["Cost", "count_cost", "input_size_for_output", "measure_latency", "measure_sgemm",
           "peak_memory", "tune_cpu_allocator", "ProfileResult", "profile_model", "DTYPES",
           "parse_size", "tf32"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_aten = torch.ops.aten


# ----------------------------------------------------------------------------- counting
@dataclass
class Cost:
    """Parameters and multiply-accumulates of one forward pass (see the module doc)."""
    params: int
    input_shape: Tuple[int, ...]
    output_shape: Tuple[int, ...]
    conv: int = 0
    linear: int = 0
    attention: int = 0
    bias: int = 0
    layernorm: int = 0
    weight_norm_conv: int = 0  # MACs of the convs that are weight-normalised (part of ``conv``)
    by_op: Dict[str, int] = field(default_factory=dict)

    @property
    def macs_without_weight_norm(self) -> int:
        """conv + linear less the weight-normalised convs: what FDIWN's published mult-adds
        count (its counter skipped weight-normalised convs; 28.36 G for FDIWN x4, paper 28.4 G)."""
        return self.macs - self.weight_norm_conv

    @property
    def macs(self) -> int:
        """conv + linear (SR papers' usual "FLOPs")."""
        return self.conv + self.linear

    @property
    def macs_paper(self) -> int:
        """conv + linear + bias adds + 2 x LayerNorm elements (the ASID paper's count)."""
        return self.macs + self.bias + self.layernorm

    @property
    def macs_total(self) -> int:
        """conv + linear + attention matmuls."""
        return self.macs + self.attention

    @property
    def flops(self) -> int:
        """2 x macs_total: floating-point operations of all products."""
        return 2 * self.macs_total

    def as_dict(self) -> dict:
        d = asdict(self)
        d.update(macs=self.macs, macs_paper=self.macs_paper, macs_total=self.macs_total, flops=self.flops,
                 macs_without_weight_norm=self.macs_without_weight_norm)
        return d


class _MacCounter(TorchDispatchMode):
    def __init__(self, cost: Cost):
        super().__init__()
        self.cost = cost

    def _add(self, kind: str, op: str, n: int) -> None:
        setattr(self.cost, kind, getattr(self.cost, kind) + n)
        self.cost.by_op[op] = self.cost.by_op.get(op, 0) + n

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        packet = func.overloadpacket
        if packet is _aten.convolution:
            x, w, b = args[0], args[1], args[2]
            per_out = math.prod(w.shape[1:])  # in/groups * kh * kw
            self._add("conv", "convolution", out.numel() * per_out)
            if b is not None:
                self.cost.bias += out.numel()
        elif packet is _aten.mm:
            self._add("linear", "mm", out.numel() * args[0].shape[-1])
        elif packet is _aten.addmm:
            self._add("linear", "addmm", out.numel() * args[1].shape[-1])
            if args[0].dim() <= 1:  # a bias vector (not a residual matrix)
                self.cost.bias += out.numel()
        elif packet in (_aten.bmm, _aten.baddbmm):
            a = args[0] if packet is _aten.bmm else args[1]
            self._add("attention", packet.__name__, out.numel() * a.shape[-1])
        return out


def count_cost(model: nn.Module, input_shape: Sequence[int]) -> Cost:
    """Count the MACs of ``model`` on an input of ``input_shape`` (N, C, H, W) without
    computing anything: a copy of the model runs on the ``meta`` device."""
    params = sum(p.numel() for p in model.parameters())
    meta = copy.deepcopy(model).to("meta").eval().requires_grad_(False)
    cost = Cost(params, tuple(int(s) for s in input_shape), ())

    def ln_hook(mod, inputs, output):
        cost.layernorm += 2 * inputs[0].numel()

    def wn_hook(mod, inputs, output):
        cost.weight_norm_conv += output.numel() * math.prod(mod.weight.shape[1:])

    hooks = [m.register_forward_hook(ln_hook) for m in meta.modules() if isinstance(m, nn.LayerNorm)]
    hooks += [m.register_forward_hook(wn_hook) for m in meta.modules() if getattr(m, "weight_normalised", False)]
    try:
        # grad mode on (nothing requires grad, so no graph) and out of inference mode (where
        # linear and conv2d would reach the counter undecomposed): models run their layers
        # as defined, without the merged products of their inference shortcuts
        with torch.inference_mode(False), torch.enable_grad(), _MacCounter(cost):
            out = meta(torch.empty(*input_shape, device="meta"))
    finally:
        for h in hooks:
            h.remove()
    cost.output_shape = tuple(out.shape)
    return cost


def parse_size(text: str) -> Tuple[int, int]:
    """"1280x720" -> (width, height)."""
    try:
        w, h = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"size must look like 1280x720 (width x height), got {text!r}") from None
    if w < 1 or h < 1:
        raise ValueError(f"size must be positive, got {text!r}")
    return w, h


def input_size_for_output(width: int, height: int, scale: int) -> Tuple[int, int]:
    """LR (width, height) for an output of about ``width x height``: ceil(side / scale)
    (1280x720 at x3 -> 427x240, whose output is 1281x720)."""
    return -(-width // scale), -(-height // scale)


# ----------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(fn: Callable[[], object], device: Union[str, torch.device] = "cpu",
                    repeats: int = 5, warmup: int = 1) -> List[float]:
    """Seconds of ``fn()`` for ``repeats`` runs after ``warmup`` runs (sorted)."""
    device = torch.device(device)
    for _ in range(warmup):
        fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)


def measure_sgemm(device: Union[str, torch.device] = "cpu", n: int = 2048, repeats: int = 5) -> float:
    """The fp32 matrix-multiply rate (GFLOP/s, median of ``repeats``) of an n x n product."""
    device = torch.device(device)
    a = torch.randn(n, n, device=device)
    b = torch.randn(n, n, device=device)
    ctx = contextlib.nullcontext()
    if device.type == "cuda":  # plain fp32, not TF32
        ctx = _no_tf32()
    with ctx, torch.inference_mode():
        times = measure_latency(lambda: torch.mm(a, b), device, repeats, warmup=1)
    return 2 * n ** 3 / statistics.median(times) / 1e9


@contextlib.contextmanager
def tf32(allowed: bool):
    """CUDA's TF32 matmul/conv mode on or off inside the block, restored after it."""
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = allowed
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


def _no_tf32():
    return tf32(False)


def _rss_peak_kib() -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def _reset_rss_peak() -> bool:
    try:  # Linux: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def peak_memory(fn: Callable[[], object], device: Union[str, torch.device] = "cpu") -> Optional[int]:
    """Peak memory in bytes while ``fn()`` runs: ``torch.cuda.max_memory_allocated`` on
    CUDA; on the CPU the process's peak resident set size (VmHWM, reset first; Linux),
    which includes the interpreter, torch and the model (~0.3-0.4 GB). None if unknown."""
    device = torch.device(device)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device)
    if not _reset_rss_peak():
        fn()
        if sys.platform.startswith("linux"):
            import resource
            return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
        return None
    fn()
    peak = _rss_peak_kib()
    return None if peak is None else peak * 1024


_ALLOCATOR_TUNED = False


def tune_cpu_allocator() -> bool:
    """Keep freed memory inside the process (glibc: no mmap for big blocks, no trimming).

    By default glibc gives every block above 32 MB back to the OS when it is freed, and
    the next one of that size page-faults in again: 1280x720 x2 activations are 44 MB
    each, and those faults took about a third of the CPU time (and ~10% at x4). After
    this call freed blocks are reused. Process-wide; returns False where it does not
    apply (not glibc). Prepared ASID models do not need it (their workspace keeps their
    maps, see ``distillsr.kernels.workspace``), and nothing in the package calls it; it
    remains for programs that run unprepared models (training, the paper modules) and
    for comparisons (``benchmarks/inference.py --raw --raw-tuned``).
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED:
        return True
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_top_pad, m_mmap_max = -1, -2, -4
        ok = (libc.mallopt(m_mmap_max, 0) == 1
              and libc.mallopt(m_trim_threshold, 2 ** 31 - 1) == 1
              and libc.mallopt(m_top_pad, 64 << 20) == 1)
    except (OSError, AttributeError):
        return False
    _ALLOCATOR_TUNED = bool(ok)
    return _ALLOCATOR_TUNED


# ----------------------------------------------------------------------------- one profile
@dataclass
class ProfileResult:
    model: str
    scale: int
    output_size: Tuple[int, int]     # (width, height) requested
    device: str
    dtype: str
    threads: int
    cost: Cost
    latency_s: List[float]           # sorted
    peak_memory_bytes: Optional[int]

    @property
    def median_s(self) -> Optional[float]:
        """Median latency; None when nothing was timed (``--count-only``)."""
        return statistics.median(self.latency_s) if self.latency_s else None

    @property
    def gflops_per_s(self) -> Optional[float]:
        return self.cost.flops / self.median_s / 1e9 if self.latency_s else None

    def as_dict(self) -> dict:
        return {"model": self.model, "scale": self.scale, "output_size": list(self.output_size),
                "device": self.device, "dtype": self.dtype, "threads": self.threads,
                **{k: v for k, v in self.cost.as_dict().items() if k != "by_op"},
                "macs_by_op": self.cost.by_op,
                "latency_s": self.latency_s, "latency_median_s": self.median_s,
                "achieved_gflops_per_s": self.gflops_per_s, "peak_memory_bytes": self.peak_memory_bytes}


def profile_model(model: nn.Module, output_size: Tuple[int, int] = (1280, 720), *,
                  device: Union[str, torch.device] = "cpu", dtype: str = "fp32", repeats: int = 5,
                  warmup: int = 1, name: str = "", time_it: bool = True,
                  compile: bool = False) -> ProfileResult:
    """Cost, latency (``repeats`` runs after ``warmup``) and peak memory of ``model``
    producing an output of about ``output_size`` = (width, height), batch 1.

    ``compile``: time ``torch.compile(model)`` instead (fixed shape; on CUDA with
    ``mode="reduce-overhead"``, i.e. CUDA graphs); compiling happens in the warm-up run,
    which is then at least 1. On a 2-core AMD EPYC VM it brought no gain over the eager
    fast path (see README, speed)."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, not {dtype!r}")
    device = torch.device(device)
    scale = int(getattr(model, "scale"))
    w, h = input_size_for_output(*output_size, scale)
    cost = count_cost(model, (1, 3, h, w))
    times: List[float] = []
    peak = None
    if time_it:
        net = prepare_for_inference(model.to(device=device, dtype=DTYPES[dtype]))
        if compile:
            net = torch.compile(net, dynamic=False, mode="reduce-overhead" if device.type == "cuda" else None)
            warmup = max(warmup, 1)
        x = torch.rand(1, 3, h, w, device=device, dtype=DTYPES[dtype])
        with torch.inference_mode():
            def run():
                return net(x)
            times = measure_latency(run, device, repeats, warmup)
            peak = peak_memory(run, device)
    return ProfileResult(name or getattr(model, "arch_name", type(model).__name__), scale, tuple(output_size),
                         str(device), dtype, torch.get_num_threads(), cost, times, peak)
