"""Running an exported network with onnxruntime, with the interface of a torch model.

:class:`OnnxModel` is called on an N x 3 x H x W float tensor in [0, 1] and returns the
N x 3 x sH x sW tensor (on the input's device and dtype), like ``model(x)``; it has
``scale``, ``arch_name`` and ``eval()``. :func:`onnxruntime_backend` is the
``backend="onnxruntime"`` factory of ``distillsr.engine.upscale``: it takes a ``.onnx``
file as ``weights``, or exports the torch model it would otherwise load (once, cached).
"""
from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Callable, Optional, Sequence, Union

import numpy as np
import torch

from .backends import BACKENDS, is_onnx_file, weights_digest

__all__ = ["OnnxModel", "onnxruntime_backend", "cached_export"]


def _ort():
    try:
        import onnxruntime
    except ImportError:
        raise RuntimeError("the onnxruntime backend needs the package onnxruntime; "
                           "pip install 'distillsr[onnx]'") from None
    return onnxruntime


class OnnxModel:
    """An exported network (``distillsr export``) run by onnxruntime."""

    def __init__(self, path: Union[str, os.PathLike], device: Union[str, torch.device] = "cpu",
                 threads: Optional[int] = None, providers: Optional[Sequence[str]] = None):
        ort = _ort()
        self.path = Path(path)
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path}: no such ONNX file")
        device = torch.device(device)
        if providers is None:
            providers = ["CPUExecutionProvider"]
            if device.type == "cuda":
                if "CUDAExecutionProvider" not in ort.get_available_providers():
                    raise RuntimeError("device cuda: this onnxruntime has no CUDAExecutionProvider "
                                       "(pip install onnxruntime-gpu)")
                providers = [("CUDAExecutionProvider", {"device_id": device.index or 0}), "CPUExecutionProvider"]
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads or torch.get_num_threads()
        # fp32 files: no arena and no memory pattern: each image size gets its own buffers,
        # freed after the run (1280x720 x4: peak RSS 1.25 GB instead of 2.2 GB, measured).
        # int8 files (distillsr quantize) keep both: their quantise / dequantise steps allocate
        # many buffers per run, and without the arena a mixed int8 / float E-RFDN x4 ran 1.2x
        # the fp32 speed instead of 1.75x (measured)
        pooled = _is_quantized_file(self.path)
        options.enable_cpu_mem_arena = pooled
        options.enable_mem_pattern = pooled
        self.pooled_memory = pooled
        try:
            self.session = ort.InferenceSession(str(self.path), options, providers=list(providers))
        except Exception as e:  # onnxruntime raises its own error types
            raise RuntimeError(f"{self.path}: onnxruntime cannot load it ({e})") from e
        meta = self.session.get_modelmeta().custom_metadata_map
        if "distillsr.scale" not in meta:
            raise RuntimeError(f"{self.path}: not a distillsr export (no distillsr.scale metadata)")
        self.scale = int(meta["distillsr.scale"])
        self.arch_name = meta.get("distillsr.arch", "onnx")
        self.input_name = self.session.get_inputs()[0].name
        self.output_name = self.session.get_outputs()[0].name
        self.device = device
        self.training = False

    def eval(self) -> "OnnxModel":
        return self

    def to(self, *args, **kwargs) -> "OnnxModel":  # the onnxruntime session stays where it was made
        return self

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise ValueError(f"expected an N x 3 x H x W tensor, got {shape}")
        arr = np.ascontiguousarray(x.detach().to("cpu", torch.float32).numpy())
        y = self.session.run([self.output_name], {self.input_name: arr})[0]
        return torch.from_numpy(y).to(device=x.device, dtype=x.dtype)

    def memory_estimate(self, device=None):
        """Peak memory of a forward pass, linear in the LR pixels (for ``tile="auto"``):
        the growth of the process's peak RSS over two probe runs (measured once)."""
        from .profile import peak_memory
        from .memory import MemoryEstimate
        if getattr(self, "_estimate", None) is None:
            peaks = []
            for side in (48, 96):
                x = torch.rand(1, 3, side, side)
                before = _current_rss()
                peak = peak_memory(lambda: self(x))
                peaks.append(max(0, (peak or before) - before))
            per_pixel = max((peaks[1] - peaks[0]) / (96 * 96 - 48 * 48), peaks[1] / (96 * 96), 1.0)
            self._estimate = MemoryEstimate(per_pixel, max(0.0, peaks[1] - per_pixel * 96 * 96))
        return self._estimate

    def __repr__(self) -> str:
        return f"OnnxModel({str(self.path)!r}, {self.arch_name} x{self.scale})"


def _is_quantized_file(path: Path) -> bool:
    """Whether an ONNX file was written by ``distillsr quantize`` (its metadata key
    ``distillsr.quantization``, found without parsing the protobuf)."""
    key = b"distillsr.quantization"
    try:
        with open(path, "rb") as f:
            tail = b""
            for chunk in iter(lambda: f.read(1 << 20), b""):
                if key in tail + chunk:
                    return True
                tail = chunk[-len(key):]
    except OSError:
        return False
    return False


def _current_rss() -> int:
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _cache_dir() -> Path:
    base = os.environ.get("DISTILLSR_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME", os.path.expanduser("~/.cache")), "distillsr")
    return Path(base) / "onnx"


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def cached_export(model: torch.nn.Module, cache_dir: Union[str, os.PathLike, None] = None,
                  log: Optional[Callable[[str], None]] = _say) -> Path:
    """The ONNX file of ``model``, exported on first use and then reused (keyed by the
    architecture, scale and a hash of the weights). An export (which can take a minute) is
    announced through ``log`` (stderr by default), with where the file is cached; the file is
    written by ``distillsr.io.atomic_write`` (complete or absent, the user's file mode)."""
    from ..io import atomic_write
    from .export import DEFAULT_OPSET, export_onnx
    name = f"{getattr(model, 'arch_name', 'model')}_x{model.scale}_{weights_digest(model)[:16]}_op{DEFAULT_OPSET}.onnx"
    path = Path(cache_dir) if cache_dir else _cache_dir()
    target = path / name
    if not target.is_file():
        if log:
            log(f"exporting {getattr(model, 'arch_name', 'the model')} x{model.scale} to ONNX for onnxruntime "
                f"(once; it can take a minute or more), cached as {target}")
        start = time.perf_counter()
        atomic_write(target, lambda tmp: export_onnx(model, tmp))
        if log:
            log(f"exported in {time.perf_counter() - start:.0f} s")
    return target


def onnxruntime_backend(model=None, scale: Optional[int] = None, weights=None,
                        device: Union[str, torch.device] = "cpu", weights_dir=None) -> OnnxModel:
    """Runner factory for ``distillsr.engine.upscale`` (``backend="onnxruntime"``)."""
    if is_onnx_file(weights):
        runner = OnnxModel(weights, device)
    else:
        net = BACKENDS["torch"](model=model, scale=scale, weights=weights, device="cpu",
                                weights_dir=weights_dir)
        runner = OnnxModel(cached_export(net), device)
    if scale is not None and runner.scale != scale:
        raise ValueError(f"{weights or runner.path}: the model upscales x{runner.scale}, not x{scale}")
    return runner


def _register() -> None:
    from .backends import register_backend
    register_backend("onnxruntime")(onnxruntime_backend)


_register()
