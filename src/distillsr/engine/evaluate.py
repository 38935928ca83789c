"""Benchmark evaluation with the papers' protocol (``distillsr eval`` in Python).

``evaluate(model, scale, data_root, datasets)`` upscales every LR image of each
set, quantises the output to uint8, and scores it against the HR on Y with
PSNR / SSIM (``distillsr.metrics``). It returns the dict that ``--json`` writes::

    {"model": str, "weights": str|None, "scale": int, "ssim_variant": str,
     "grey": str, "tile": int|None, "tile_overlap": int, "blend": "mean"|None, "chop": bool,
     "self_ensemble": bool, "device": str,
     "results": [{"dataset": str, "psnr": float, "ssim": float, "num_images": int,
                  "seconds": float, "images": [{"name": str, "psnr": float,
                                                "ssim": float}]}]}
"""
from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from ..data.benchmark import BenchmarkSet, ImageError, find_sets, write_png
from ..data.imresize import imresize
from ..metrics import GREY_CONVENTIONS, SSIM_VARIANTS, mean_scores, psnr_ssim, to_uint8
from .infer import make_forward

__all__ = ["EvalError", "EvalModel", "BICUBIC", "load_eval_model", "release_protocol_for", "make_upscaler", "evaluate",
           "format_table", "write_json"]

BICUBIC = "bicubic"
PathLike = Union[str, os.PathLike]


class EvalError(RuntimeError):
    """Evaluation cannot go on (bad image, missing data, unusable model)."""


@dataclass
class EvalModel:
    """What is evaluated: ``module`` is None for the bicubic baseline."""
    name: str
    weights: Optional[str]
    module: Optional[torch.nn.Module]


def default_device() -> str:
    """CUDA when available, else the CPU (:func:`distillsr.engine.device.select_device`)."""
    from .device import select_device
    return str(select_device("auto"))


def load_eval_model(name: Optional[str] = None, weights: Optional[PathLike] = None, *,
                    scale: Optional[int] = None, device: str = "cpu") -> EvalModel:
    """Resolve ``--model`` / ``--weights`` into what :func:`evaluate` runs.

    * ``weights``: any checkpoint ``distillsr.load_model`` reads (``name``, if
      given, must match its architecture);
    * ``name="bicubic"``: the classic bicubic baseline (MATLAB imresize of the LR);
    * another name: weights of that name and scale (``distillsr.pretrained``; a release
      is pulled on first use); a registered architecture without weights is an error.
    """
    if weights is not None:
        if name is not None and name.lower() == BICUBIC:
            raise EvalError("the bicubic baseline takes no weights")
        from .backends import is_onnx_file
        if is_onnx_file(weights):
            return _onnx_eval_model(name, weights, scale, device)
        from ..checkpoint import CheckpointError, load_model
        try:
            module = load_model(weights, device)
        except CheckpointError as e:
            raise EvalError(str(e)) from e
        arch = getattr(module, "arch_name", type(module).__name__)
        if scale is not None and getattr(module, "scale", scale) != scale:
            raise EvalError(f"{weights}: the checkpoint is a x{module.scale} model, not x{scale}")
        if name is not None and name.lower() != arch:
            raise EvalError(f"{weights}: the checkpoint holds {arch!r}, not {name!r}")
        return EvalModel(name.lower() if name else arch, str(weights), module)
    if name is None:
        raise EvalError("nothing to evaluate: give --model NAME or --weights PATH")
    if scale is None:
        raise EvalError(f"{name}: give the scale (it is read from the checkpoint only with weights)")
    key = name.lower()
    if key == BICUBIC:
        return EvalModel(BICUBIC, None, None)
    from ..pretrained import PretrainedError, list_pretrained, load_pretrained
    from ..releases import find_release
    if find_release(key) is not None or any(e.name == key for e in list_pretrained()):
        try:
            module = load_pretrained(key, scale, device=device)
        except (PretrainedError, ValueError, OSError) as e:
            raise EvalError(str(e)) from None
        return EvalModel(key, module.pretrained_file, module)
    from ..registry import model_info
    try:
        info = model_info(key)
    except KeyError as e:
        raise EvalError(f"{e.args[0]} (or 'bicubic' for the baseline)") from None
    if scale not in info.scales:
        raise EvalError(f"model {info.name!r} supports scales {list(info.scales)}, not x{scale}")
    raise EvalError(f"no weights ship for model {info.name!r} x{scale}; evaluate a checkpoint "
                    f"with --weights PATH")


def _onnx_eval_model(name: Optional[str], weights: PathLike, scale: Optional[int], device: str) -> EvalModel:
    """An ONNX export (``distillsr export`` / ``distillsr quantize``) run by onnxruntime; its
    scale is read from the file's ``distillsr.scale`` metadata."""
    from .onnx_backend import OnnxModel
    try:
        module = OnnxModel(weights, device)
    except (RuntimeError, FileNotFoundError) as e:
        raise EvalError(str(e)) from e
    if scale is not None and module.scale != scale:
        raise EvalError(f"{weights}: the ONNX file is a x{module.scale} model, not x{scale}")
    if name is not None and name.lower() != module.arch_name:
        raise EvalError(f"{weights}: the ONNX file holds {module.arch_name!r}, not {name!r}")
    return EvalModel(module.arch_name, str(weights), module)


def release_protocol_for(model: EvalModel) -> dict:
    """The release test path of the evaluated network (``eval --protocol release``)."""
    from ..releases import ReleaseError, release_protocol
    if model.module is None:
        raise EvalError("the bicubic baseline has no release test protocol")
    try:
        return release_protocol(getattr(model.module, "arch_name", type(model.module).__name__))
    except ReleaseError as e:
        raise EvalError(str(e)) from None


def make_upscaler(model: EvalModel, scale: int, *, tile: Optional[int] = None, tile_overlap: int = 24,
                  self_ensemble: bool = False, chop: bool = False,
                  device: str = "cpu") -> Callable[[np.ndarray], np.ndarray]:
    """``lr_uint8 (h x w x C) -> sr_uint8 (h*s x w*s x C')`` for one model and strategy.

    Greyscale LR images are fed to networks as three equal channels; the
    bicubic baseline resizes the LR as it is (grey stays grey).
    """
    if model.module is None:
        if tile is not None or self_ensemble or chop:
            raise EvalError("tiling, chop and self-ensemble apply to networks, not to the bicubic baseline")
        return lambda lr: imresize(lr, scale)
    from ..kernels import prepare_for_inference
    module = model.module
    if isinstance(module, torch.nn.Module):
        module = prepare_for_inference(module.to(device))  # eval mode, fused CPU kernels
    param = next(module.parameters(), None) if isinstance(module, torch.nn.Module) else None
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    try:
        forward = make_forward(module, scale, tile=tile, overlap=tile_overlap, chop=chop,
                               ensemble=self_ensemble)
    except (RuntimeError, ValueError) as e:  # bad tile settings, chop not available
        raise EvalError(str(e)) from e

    def upscale(lr: np.ndarray) -> np.ndarray:
        x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None]
        x = x.to(device=device, dtype=dtype) / 255.0
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        y = forward(x)
        want = (lr.shape[0] * scale, lr.shape[1] * scale)
        if y.ndim != 4 or tuple(y.shape[-2:]) != want:
            raise EvalError(f"the model returned {tuple(y.shape)} for an LR of {lr.shape[1]}x{lr.shape[0]}; "
                            f"expected {want[1]}x{want[0]} at x{scale}")
        return to_uint8(y[0].permute(1, 2, 0))  # the protocol's quantiser (metrics.quantise)
    return upscale


def evaluate(model: Union[str, EvalModel, torch.nn.Module], scale: int, data_root: PathLike,
             datasets: Optional[Sequence[str]] = None, *, tile: Optional[int] = None,
             tile_overlap: int = 24, self_ensemble: bool = False, chop: bool = False,
             ssim_variant: str = "wang", grey: str = "replicate",
             save_images: Optional[PathLike] = None, device: Optional[str] = None,
             skip_bad: bool = False, progress: bool = False, weights: Optional[str] = None,
             log: Optional[Callable[[str], None]] = None,
             skipped: Optional[List[Tuple[str, str]]] = None) -> dict:
    """Score a model on benchmark sets; returns the JSON-shaped dict (module docstring).

    ``model``: ``"bicubic"``, a registered name (shipped weights), an
    :class:`EvalModel` or an ``nn.Module`` (its ``arch_name`` names it; pass
    ``weights`` to record where it came from). ``datasets``: set folders under
    ``data_root`` (default: all there). A bad image raises :class:`EvalError`
    naming the file, unless ``skip_bad``: then it is reported through ``log``,
    appended to ``skipped`` as ``(dataset, message)`` and left out of the means.
    """
    if ssim_variant not in SSIM_VARIANTS:
        raise ValueError(f"unknown SSIM variant {ssim_variant!r}; choose one of {', '.join(SSIM_VARIANTS)}")
    if grey not in GREY_CONVENTIONS:
        raise ValueError(f"unknown grey convention {grey!r}; choose one of {', '.join(GREY_CONVENTIONS)}")
    scale = int(scale)
    log = log or (lambda msg: print(msg, file=sys.stderr))
    device = device or default_device()
    model = _as_eval_model(model, scale, device, weights)
    upscale = make_upscaler(model, scale, tile=tile, tile_overlap=tile_overlap,
                            self_ensemble=self_ensemble, chop=chop, device=device)

    def score(ds: BenchmarkSet, item) -> dict:
        sr = upscale(item.lr)
        if save_images is not None:
            write_png(Path(save_images) / ds.name / f"X{scale}" / f"{item.name}.png", sr)
        p, s = psnr_ssim(sr, item.hr, scale, ssim_variant=ssim_variant, grey=grey)
        return {"name": item.name, "psnr": p, "ssim": s}

    results = [_score_set(ds, score, skip_bad=skip_bad, progress=progress, log=log, skipped=skipped)
               for ds in _open_sets(data_root, datasets, scale)]
    return {"model": model.name, "weights": model.weights, "scale": scale,
            "ssim_variant": ssim_variant, "grey": grey, "tile": tile, "tile_overlap": tile_overlap,
            "blend": "mean" if tile else None, "chop": bool(chop), "self_ensemble": bool(self_ensemble),
            "device": str(device), "results": results}


def _as_eval_model(model, scale: int, device: str, weights: Optional[str]) -> EvalModel:
    """A name, a module or an EvalModel -> an EvalModel of scale ``scale``."""
    if isinstance(model, str):
        model = load_eval_model(model, scale=scale, device=device)
    elif not isinstance(model, EvalModel):  # an nn.Module, or a runner such as OnnxModel
        model = EvalModel(getattr(model, "arch_name", type(model).__name__), weights, model)
    if model.module is not None and getattr(model.module, "scale", scale) != scale:
        raise EvalError(f"model {model.name!r} is x{model.module.scale}, not x{scale}")
    return model


def _open_sets(data_root: PathLike, datasets: Optional[Sequence[str]], scale: int) -> List[BenchmarkSet]:
    """The benchmark sets named (default: all under ``data_root``), each checked to exist."""
    root = Path(data_root)
    try:
        names = list(datasets) if datasets else find_sets(root)
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None
    if not names:
        raise EvalError(f"{root}: no benchmark sets (folders with an HR folder) found")
    try:
        return [BenchmarkSet(root, n, scale) for n in names]
    except FileNotFoundError as e:
        raise EvalError(str(e)) from None


def _score_set(ds: BenchmarkSet, score: Callable, *, skip_bad: bool, progress: bool,
               log: Callable[[str], None], skipped: Optional[List[Tuple[str, str]]]) -> dict:
    """Score every image of one set (``score(ds, item) -> dict``) and average them."""
    missing = ds.missing_lr()
    if missing:
        what = "the folder is missing" if not ds.lr_dir.is_dir() else f"{len(missing)} of {len(ds)} files missing"
        log(f"{ds.name}: {ds.lr_dir}: {what}; LR made from HR with MATLAB bicubic")
    images = []
    t0 = time.perf_counter()
    indices = range(len(ds))
    if progress:
        from tqdm import tqdm
        indices = tqdm(indices, desc=f"{ds.name} x{ds.scale}", unit="img", file=sys.stderr, leave=False)
    for i in indices:
        try:
            item = ds.load(i)
        except ImageError as e:
            if not skip_bad:
                raise EvalError(f"{e} (--skip-bad scores the other images)") from e
            log(f"skipped: {e}")
            if skipped is not None:
                skipped.append((ds.name, str(e)))
            continue
        images.append(score(ds, item))
    mean = mean_scores((im["psnr"], im["ssim"]) for im in images)
    return {"dataset": ds.name, "psnr": mean["psnr"], "ssim": mean["ssim"], "num_images": len(images),
            "seconds": time.perf_counter() - t0, "images": images}


def format_table(result: dict, chop: bool = False) -> str:
    """The results as a text table (PSNR 2 decimals, SSIM 4, as the papers)."""
    chop = chop or result.get("chop", False)
    how = (f"tiles {result['tile']} overlap {result.get('tile_overlap', 24)}" if result["tile"]
           else ("chop" if chop else "whole image"))
    if result["self_ensemble"]:
        how += " + x8 self-ensemble"
    lines = [f"model {result['model']}" + (f" ({result['weights']})" if result["weights"] else "")
             + f", x{result['scale']}, {how}; Y channel, SSIM '{result['ssim_variant']}', "
               f"grey '{result['grey']}', border {result['scale']}"
             + (f", {result['device']}" if result.get("device") else ""),
             f"{'dataset':<12} {'scale':>5} {'PSNR':>7} {'SSIM':>7} {'images':>6} {'seconds':>8}"]
    for r in result["results"]:
        lines.append(f"{r['dataset']:<12} {'x' + str(result['scale']):>5} {r['psnr']:>7.2f} "
                     f"{r['ssim']:>7.4f} {r['num_images']:>6d} {r['seconds']:>8.1f}")
    return "\n".join(lines)


def write_json(result: dict, path: PathLike) -> Path:
    """Write the result dict as JSON, atomically."""
    from ..io import atomic_write_text
    return atomic_write_text(path, json.dumps(result, indent=1) + "\n")
