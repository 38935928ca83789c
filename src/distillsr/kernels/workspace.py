"""Workspace: the buffers of a prepared model's maps, kept from one call to the next.

A forward pass of ASID at a 1280x720 output allocates a few hundred maps of 10-45 MB and
frees each soon after. glibc serves blocks above 32 MB with ``mmap`` and gives them back
when they are freed (and trims the top of its heap for smaller ones), so every such map
is page-faulted in again at every call: at x2 that is about 1.6 million page faults, a
third or more of the time of a call. A :class:`Workspace` keeps those buffers instead,
inside the prepared model and for it alone; the process's allocator settings are left as
they are.

How it serves a request (``empty(shape)``): it hands out a view of a buffer of exactly that
many bytes that no tensor uses any more (the buffer's storage is referenced by the
workspace alone), or allocates a new one. A buffer is thus never shared by two live
tensors, whoever holds them (a later op, the caller, another thread), and the number of
buffers kept is the largest number of maps of one size alive at once. Requests are served
under a lock, so that two threads calling the same model never receive the same buffer.

Buffers are kept per input shape (and dtype and device) for the ``shapes`` most recent
ones (tiled inference alternates between the full tiles and the edge ones), and freed
with the workspace: when the model is deleted, trained (``train()``), or prepared again.

The fused forms request their maps through :func:`empty`, which serves them from the
workspace made active for the current thread by :func:`active` (the prepared network
activates its own around each call), and from ``torch.empty`` otherwise.
"""
from __future__ import annotations

import contextlib
import math
import threading
from collections import OrderedDict
from typing import Dict, Hashable, Iterator, List, Optional, Sequence

import torch

__all__ = ["Workspace", "active", "current", "empty", "MIN_BYTES"]

# smaller maps come from glibc's heap without page faults; not worth a lookup
MIN_BYTES = 1 << 20


def _use_count(t: torch.Tensor) -> int:
    return torch._C._storage_Use_Count(t.untyped_storage()._cdata)


# the use count of a storage held by one tensor only (the workspace's own reference)
_FREE = _use_count(torch.empty(1, dtype=torch.uint8))


class Workspace:
    """Buffers of one model, reused across calls (see the module doc)."""

    def __init__(self, shapes: int = 2):
        if shapes < 1:
            raise ValueError(f"shapes must be at least 1, not {shapes}")
        self.shapes = shapes
        self._lock = threading.Lock()
        # input key -> {nbytes -> flat uint8 buffers}
        self._pools: "OrderedDict[Hashable, Dict[int, List[torch.Tensor]]]" = OrderedDict()

    def select(self, key: Hashable) -> Dict[int, List[torch.Tensor]]:
        """The pool for inputs of ``key``, made the most recent; the pools of keys beyond
        the ``shapes`` most recent are dropped."""
        with self._lock:
            pool = self._pools.pop(key, None)
            if pool is None:
                pool = {}
            self._pools[key] = pool
            while len(self._pools) > self.shapes:
                self._pools.popitem(last=False)
            return pool

    def take(self, pool: Dict[int, List[torch.Tensor]], shape: Sequence[int],
             dtype: torch.dtype, device: torch.device) -> torch.Tensor:
        """A tensor of ``shape`` on a buffer of ``pool`` that nothing else uses."""
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            buffers = pool.setdefault(nbytes, [])
            for b in buffers:
                if b.device == device and _use_count(b) == _FREE:
                    return b.view(dtype).view(shape)  # the view holds the buffer until it dies
            with torch.inference_mode(False):  # a normal tensor: in-place ops allowed in any mode
                b = torch.empty(nbytes, dtype=torch.uint8, device=device)
            buffers.append(b)
            return b.view(dtype).view(shape)

    def clear(self) -> None:
        """Drop every buffer (those still in use are freed when their tensors die)."""
        with self._lock:
            self._pools.clear()

    @property
    def nbytes(self) -> int:
        """Bytes held by the buffers kept."""
        with self._lock:
            return sum(b.numel() for pool in self._pools.values() for bs in pool.values() for b in bs)

    def keys(self) -> List[Hashable]:
        with self._lock:
            return list(self._pools)


_local = threading.local()


@contextlib.contextmanager
def active(workspace: Optional[Workspace], key: Hashable) -> Iterator[None]:
    """``with active(ws, key):`` :func:`empty` in this thread serves from ``ws``'s pool for
    inputs of ``key`` (None: from ``torch.empty``). Nests: the previous one is restored."""
    prev = getattr(_local, "pool", None)
    _local.pool = None if workspace is None else (workspace, workspace.select(key))
    try:
        yield
    finally:
        _local.pool = prev


def current() -> Optional[Workspace]:
    """The workspace active in this thread, if any."""
    pool = getattr(_local, "pool", None)
    return None if pool is None else pool[0]


def empty(shape: Sequence[int], dtype: torch.dtype = torch.float32,
          device: torch.device = torch.device("cpu")) -> torch.Tensor:
    """An uninitialised tensor for a fused form's map: from the active workspace when one
    is active in this thread and the map is big enough to matter, else ``torch.empty``."""
    pool = getattr(_local, "pool", None)
    shape = tuple(int(s) for s in shape)
    if pool is None or math.prod(shape) * dtype.itemsize < MIN_BYTES:
        return torch.empty(shape, dtype=dtype, device=device)
    return pool[0].take(pool[1], shape, dtype, torch.device(device))
