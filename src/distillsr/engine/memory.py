"""How much memory one forward pass of a runner takes, measured by probe runs.

:func:`estimate_memory` runs the network on two small inputs and fits
``fixed + per_pixel * (LR pixels)`` (a :class:`MemoryEstimate`): on CUDA from the allocator's
peak, on the CPU from the tensors alive at once (:class:`_LiveBytes`). ``tile="auto"`` divides
the free memory by it (``engine.tiling.choose_tile``).
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Dict, Sequence, Union

import torch

from .backends import Runner

__all__ = ["MemoryEstimate", "estimate_memory"]


@dataclass(frozen=True)
class MemoryEstimate:
    """Peak memory of one forward pass: ``fixed + per_pixel * (LR pixels)`` bytes."""
    per_pixel: float
    fixed: float = 0.0

    def bytes_for(self, pixels: int) -> float:
        return self.fixed + self.per_pixel * pixels


class _LiveBytes(torch.utils._python_dispatch.TorchDispatchMode):
    """Peak bytes of tensors alive at once during the ops run under it (CPU measurement).

    Counts every new storage an op creates until its last tensor is freed; views and
    in-place results (which share an input's storage) are not new memory.
    """

    def __init__(self):
        super().__init__()
        self.refs: Dict[int, int] = {}
        self.current = 0
        self.peak = 0

    def _release(self, key: int, nbytes: int) -> None:
        n = self.refs.get(key, 0) - 1
        if n > 0:
            self.refs[key] = n
        elif key in self.refs:
            del self.refs[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        leaves = torch.utils._pytree.tree_leaves
        inputs = {t.untyped_storage().data_ptr() for t in leaves((args, kwargs)) if isinstance(t, torch.Tensor)}
        for t in leaves(out):
            if not isinstance(t, torch.Tensor):
                continue
            storage = t.untyped_storage()
            key = storage.data_ptr()
            if key == 0 or key in inputs:
                continue
            if key in self.refs:
                self.refs[key] += 1
            else:
                self.refs[key] = 1
                self.current += storage.nbytes()
                self.peak = max(self.peak, self.current)
            weakref.finalize(t, self._release, key, storage.nbytes())
        return out


def _peak_bytes(runner: Runner, x: torch.Tensor) -> int:
    with torch.inference_mode():
        if x.device.type == "cuda":
            torch.cuda.synchronize(x.device)
            base = torch.cuda.memory_allocated(x.device)
            torch.cuda.reset_peak_memory_stats(x.device)
            y = runner(x)
            del y
            return int(torch.cuda.max_memory_allocated(x.device) - base)
        tracker = _LiveBytes()
        with tracker:
            y = runner(x)
            del y
        return tracker.peak


_ESTIMATES: "weakref.WeakKeyDictionary" = weakref.WeakKeyDictionary()


def estimate_memory(runner: Runner, device: Union[str, torch.device], probe: Sequence[int] = (48, 64)
                    ) -> MemoryEstimate:
    """Peak memory of a forward pass as a linear function of the LR pixel count.

    Measured once per runner and device with two probe inputs (CUDA: the allocator's peak;
    CPU: the tensors alive at once, see :class:`_LiveBytes`), then cached. A runner may
    provide its own ``memory_estimate(device)``.
    """
    device = torch.device(device)
    if hasattr(runner, "memory_estimate"):
        return runner.memory_estimate(device)
    cache = _ESTIMATES.setdefault(runner, {}) if _weakrefable(runner) else {}
    if str(device) not in cache:
        a, b = probe
        pa = _peak_bytes(runner, torch.rand(1, 3, a, a, device=device))
        pb = _peak_bytes(runner, torch.rand(1, 3, b, b, device=device))
        per_pixel = max((pb - pa) / (b * b - a * a), pb / (b * b), 1.0)
        cache[str(device)] = MemoryEstimate(per_pixel, max(0.0, pb - per_pixel * b * b))
    return cache[str(device)]


def _weakrefable(obj) -> bool:
    try:
        weakref.ref(obj)
        return True
    except TypeError:
        return False
