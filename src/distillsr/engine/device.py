"""The device upscaling runs on, and how much memory it has free.

:func:`select_device` is the one place that turns ``"auto"`` / ``"cpu"`` / ``"cuda:N"`` into a
checked ``torch.device``; :func:`available_memory` says how many bytes can still be allocated
there: free CUDA memory, or for the CPU the least of the host's ``MemAvailable``
(:func:`host_memory_available`) and the container's own cgroup v2 limit
(:func:`cgroup_memory_available`).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Union

import torch

__all__ = ["select_device", "available_memory", "host_memory_available", "cgroup_memory_available"]

FALLBACK_MEMORY = 4 << 30  # assumed free host memory when nothing can be read
CGROUP_ROOT = Path("/sys/fs/cgroup")


def select_device(device: Union[str, torch.device, None] = "auto") -> torch.device:
    """``auto`` -> CUDA when available, else CPU; anything else as given (checked)."""
    if device is None or str(device) == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"--device {str(device)!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError("device cuda was asked for, but torch sees no CUDA GPU (use --device cpu)")
    return dev


def host_memory_available(meminfo: Union[str, os.PathLike] = "/proc/meminfo") -> Optional[int]:
    """``MemAvailable`` of the host in bytes, or None where it cannot be read."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def cgroup_memory_available(root: Union[str, os.PathLike] = CGROUP_ROOT) -> Optional[int]:
    """Bytes left under this process's cgroup v2 memory limit (``memory.max`` minus
    ``memory.current``); None without a limit or where the files cannot be read."""
    root = Path(root)
    try:
        limit = (root / "memory.max").read_text().strip()
        if limit == "max":
            return None
        used = int((root / "memory.current").read_text())
        return max(0, int(limit) - used)
    except (OSError, ValueError):
        return None


def available_memory(device: Union[str, torch.device]) -> int:
    """Bytes that can still be allocated on ``device`` (host RAM for CPU, cgroup-aware)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        cached = torch.cuda.memory_reserved(device) - torch.cuda.memory_allocated(device)
        return int(free + cached)
    candidates = [m for m in (host_memory_available(), cgroup_memory_available()) if m is not None]
    if not candidates:
        try:
            candidates.append(os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (ValueError, OSError, AttributeError):
            candidates.append(FALLBACK_MEMORY)
    return int(min(candidates))
