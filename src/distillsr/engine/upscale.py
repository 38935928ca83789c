"""Upscaling real images of any size: device and tile choice, alpha, batches of files.

The pieces live in modules by job; this module gathers their public names (import them
from here or from their module):

* ``engine.backends``: :func:`load_runner` builds what runs the network (the ``backend``;
  ``torch`` here, others register with :func:`register_backend`).
* ``engine.device``: :func:`select_device` (the one that turns ``auto`` into a device) and
  :func:`available_memory` (free device memory; host and cgroup limits for the CPU).
* ``engine.memory``: :func:`estimate_memory` measures a runner's peak memory per pixel.
* ``engine.tiling``: :func:`choose_tile` picks the tile from the memory the device has free
  (``tile="auto"``), or ``None`` (the whole image at once) when that fits.
* ``engine.upscaler``: :class:`Upscaler` upscales one float image array: greyscale is run as
  RGB and averaged back, alpha is upscaled apart (bicubic) and colour premultiplied by it, big images are
  processed in overlapping tiles so that memory stays bounded, optional x8 self-ensemble.
* ``engine.inputs``: :func:`collect_inputs` expands files, folders and globs (leaving out
  outputs of upscale), :func:`output_path` names outputs.
* ``engine.records``: the output folder's record of what was made with which settings.
* ``engine.batch``: :func:`upscale_files` runs a batch of files and folders into an output
  folder and returns a :class:`BatchReport`; a bad input is reported and the batch goes on.
"""
from __future__ import annotations

from .backends import BACKENDS, Bicubic, Runner, load_runner, register_backend
from .batch import BatchReport, upscale_files
from .inputs import collect_inputs, output_path
from .device import available_memory, select_device
from .memory import MemoryEstimate, estimate_memory
from .tiling import DEFAULT_BLEND, DEFAULT_OVERLAP, MAX_AUTO_TILE, MEMORY_FRACTION, MIN_AUTO_TILE, choose_tile
from .upscaler import Upscaler

__all__ = ["Upscaler", "select_device", "available_memory", "estimate_memory", "choose_tile",
           "load_runner", "register_backend", "BACKENDS", "collect_inputs", "upscale_files",
           "BatchReport", "MemoryEstimate", "DEFAULT_OVERLAP", "DEFAULT_BLEND", "Runner", "output_path",
           "MIN_AUTO_TILE", "MAX_AUTO_TILE", "MEMORY_FRACTION", "Bicubic"]
