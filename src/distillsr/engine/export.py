"""ONNX export of any network of the registry (dynamic batch, height and width).

The exported graph takes an N x 3 x H x W float32 RGB batch in [0, 1] and returns the
N x 3 x sH x sW result in the same range (the model's own pixel range, e.g. [-1, 1] for
the released ASID weights, is mapped inside the graph, as in ``model(x)``). Padding
to the window size, window partitions and the final crop are traced with symbolic H
and W (``torch.onnx.export(dynamo=True)``, which needs ``onnxscript``), so one file
serves every image size, odd sizes included.
"""
from __future__ import annotations

import contextlib
import io
import logging
import os
import warnings
from pathlib import Path
from typing import Dict, Optional, Union

import torch

from ..kernels import paper_modules

__all__ = ["export_onnx", "ExportError", "DEFAULT_OPSET"]

DEFAULT_OPSET = 18


class ExportError(RuntimeError):
    """The export could not be done (missing packages, a model that does not trace)."""


def export_onnx(model: torch.nn.Module, path: Union[str, os.PathLike], *, opset: int = DEFAULT_OPSET,
                example_size=(2, 3, 19, 27), metadata: Optional[Dict[str, str]] = None,
                verbose: bool = False) -> Path:
    """Export ``model`` (any [0, 1] -> [0, 1] network) to ``path`` atomically.

    ``example_size`` is the shape traced; batch, height and width stay symbolic (the
    example batch must be >= 2 and H != W, or the exporter treats them as constants).
    The file's metadata holds ``distillsr.arch``, ``distillsr.scale`` and
    ``distillsr.options`` for :class:`distillsr.engine.onnx_backend.OnnxModel`.
    """
    _require_onnx()
    meta = _metadata(model, metadata)
    proto = _trace(model, example_size, opset, verbose, meta).model_proto
    for key, value in meta.items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    import onnx
    from ..io import atomic_write
    return atomic_write(path, lambda tmp: onnx.save_model(proto, tmp))


def _require_onnx() -> None:
    try:
        import onnx  # noqa: F401
        import onnxscript  # noqa: F401
    except ImportError as e:
        raise ExportError(f"ONNX export needs the packages onnx and onnxscript ({e}); "
                          "pip install 'distillsr[onnx]'") from None


def _metadata(model: torch.nn.Module, extra: Optional[Dict[str, str]]) -> Dict[str, str]:
    """What the file records about the network (read back by ``OnnxModel``)."""
    scale = getattr(model, "scale", None)
    if not isinstance(scale, int):
        raise ExportError("the model has no integer 'scale' attribute")
    meta = {"distillsr.arch": str(getattr(model, "arch_name", type(model).__name__)),
            "distillsr.scale": str(scale),
            "distillsr.options": repr(getattr(model, "arch_options", {})),
            "distillsr.io": "NCHW float32 RGB in [0, 1] -> NCHW float32 RGB in [0, 1]"}
    meta.update(extra or {})
    return meta


def _trace(model: torch.nn.Module, example_size, opset: int, verbose: bool, meta: Dict[str, str]):
    """The ONNX program of the paper modules (a prepared model's fused forms have no ONNX
    form; a prepared model is prepared again afterwards), with symbolic batch, H and W."""
    was_training = model.training
    device = next(model.parameters()).device
    net = model.eval().to("cpu", torch.float32)
    x = torch.rand(*example_size)
    dyn = torch.export.Dim.DYNAMIC
    quiet = contextlib.nullcontext() if verbose else contextlib.redirect_stdout(io.StringIO())
    # the exporter logs a warning for each torchvision op it cannot register (we have none)
    registration_log = logging.getLogger("torch.onnx._internal.exporter._registration")
    level = registration_log.level
    registration_log.setLevel(logging.ERROR)
    try:
        with torch.no_grad(), paper_modules(net), warnings.catch_warnings(), quiet:
            warnings.simplefilter("ignore")
            return torch.onnx.export(net, (x,), dynamo=True, opset_version=opset,
                                     input_names=["input"], output_names=["output"],
                                     dynamic_shapes={"x": {0: dyn, 2: dyn, 3: dyn}},
                                     optimize=True, verbose=verbose)
    except Exception as e:  # the exporter raises many kinds of errors
        raise ExportError(f"could not export {meta['distillsr.arch']} x{meta['distillsr.scale']} to ONNX: "
                          f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}") from e
    finally:
        registration_log.setLevel(level)
        model.to(device).train(was_training)
