"""Recognise FDIWN state dicts: the authors' release (24wenjie-li/FDIWN ``model_best.pt``,
weight-normalised convs stored as ``weight_g``/``weight_v``, also as plain ``*_state.pth``
copies) and our own layout saved without metadata.

Official names -> ours: ``MODEL`` top level (``Sub_mean``, ``head``, ``Li{k}``, ``conv1``,
``UP1.0``, ``conv2``, ``UP2.0``, ``Add_mean``); ``Li`` = FSWG (``MY{j}``, ``conv``,
``conv1``, ``conv2``, ``rb1``, ``scale_x``, ``scale_res``); ``MY`` = WDIB (``srb1..4``,
``rb1``, ``rb2``, ``A1/B1/A2/B2_coffconv``, ``conv_distilled1/2``, ``scale_x1/2``,
``fuse1``, ``fuse2``, ``SAlayer``); wide units (``body.{0,2,3}``, ``SAlayer``, ``conv``,
``res_scale``, ``x_scale``). The weight-normalised convs are folded (g * v / ||v||, the
same kernel torch uses, so outputs are bit-identical) and the model is built without
weight normalisation, ready for inference. Scale = sqrt(``UP1.0`` output channels / 3).
"""
from __future__ import annotations

from typing import Dict, Iterator, Optional, Tuple

import torch

from . import scale_from_upsampler
from ..checkpoint import Recognised, register_format
from ..models.weight_norm import fold_g_v

Pairs = Iterator[Tuple[str, str]]


def _wide(off: str, ours: str, shortcut: bool) -> Pairs:
    for i in (0, 2, 3):
        yield f"{off}.body.{i}", f"{ours}.body.{i}"
    yield f"{off}.SAlayer", f"{ours}.attention"
    yield f"{off}.SAlayer.gn", f"{ours}.attention.gn"
    yield f"{off}.res_scale", f"{ours}.res_scale"
    yield f"{off}.x_scale", f"{ours}.x_scale"
    if shortcut:
        yield f"{off}.conv", f"{ours}.shortcut"


def _wdib(off: str, ours: str) -> Pairs:
    for o, n in (("srb1", "wirw_a1"), ("srb2", "wirw_b1"), ("srb3", "wirw_a2"), ("srb4", "wirw_b2")):
        yield from _wide(f"{off}.{o}", f"{ours}.{n}", shortcut=False)
    for o, n in (("rb1", "wcrw_a"), ("rb2", "wcrw_b")):
        yield from _wide(f"{off}.{o}", f"{ours}.{n}", shortcut=True)
    yield from _wide(f"{off}.fuse1", f"{ours}.scf.fuse", shortcut=True)
    for o, n in (("A1", "coff_a1"), ("B1", "coff_b1"), ("A2", "coff_a2"), ("B2", "coff_b2")):
        for ob, nb in (("upper_branch.1", "from_mean.0"), ("upper_branch.3", "from_mean.2"),
                       ("lower_branch.0", "from_std.0"), ("lower_branch.2", "from_std.2")):
            yield f"{off}.{o}_coffconv.{ob}", f"{ours}.{n}.{nb}"
    for o, n in (("conv_distilled1", "gate_b"), ("conv_distilled2", "gate_a"), ("scale_x1", "scale_a"),
                 ("scale_x2", "scale_b"), ("fuse2", "scf.gate"), ("SAlayer", "attention"),
                 ("SAlayer.gn", "attention.gn")):
        yield f"{off}.{o}", f"{ours}.{n}"


def _fswg(off: str, ours: str) -> Pairs:
    for j in range(3):
        yield from _wdib(f"{off}.MY{j + 1}", f"{ours}.wdib.{j}")
    for o, n in (("conv", "conv"), ("conv1", "shuffle_conv1"), ("conv2", "shuffle_conv2"),
                 ("scale_x", "scale_x"), ("scale_res", "scale_res")):
        yield f"{off}.{o}", f"{ours}.{n}"
    yield from _wide(f"{off}.rb1", f"{ours}.wirw", shortcut=False)


def module_map(n_groups: int) -> Dict[str, str]:
    """Official module path -> ours, for a release with ``n_groups`` FSWG parameter sets."""
    pairs = {"Sub_mean": "sub_mean", "Add_mean": "add_mean", "head": "head", "conv1": "tail.0",
             "UP1.0": "tail.1", "conv2": "skip.0", "UP2.0": "skip.1"}
    for k in range(n_groups):
        pairs.update(_fswg(f"Li{k + 1}", f"fswg.{k}"))
    return pairs


def _fold(sd: Dict[str, torch.Tensor]) -> Dict[str, torch.Tensor]:
    out = {}
    for key, v in sd.items():
        if key.endswith(".weight_v"):
            continue
        if key.endswith(".weight_g"):
            base = key[: -len("_g")]
            out[base] = fold_g_v(v, sd[base + "_v"])
        else:
            out[key] = v
    return out


def _scale(sd: Dict[str, torch.Tensor], key: str) -> Optional[int]:
    s = scale_from_upsampler(sd[key])
    return s if s is not None and s in (2, 3, 4) else None


def _arch(n_groups: int) -> Optional[str]:
    return {3: "fdiwn", 2: "fdiwn-m"}.get(n_groups)


@register_format
def recognise_official_fdiwn(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    if not {"Sub_mean.weight", "Add_mean.weight", "head.weight", "UP1.0.weight", "UP2.0.weight"} <= sd.keys():
        return None
    n_groups = len({k.split(".")[0] for k in sd if k.startswith("Li")})
    scale, arch = _scale(sd, "UP1.0.weight"), _arch(n_groups)
    if scale is None or arch is None:
        return None
    names = module_map(n_groups)
    renamed = {}
    for key, v in sd.items():
        module, leaf = key.rsplit(".", 1)
        if module not in names:
            return None
        renamed[f"{names[module]}.{leaf}"] = v
    if any(k.endswith(".weight_g") and k[:-1] + "v" not in renamed for k in renamed):
        return None
    return Recognised(arch, scale, _fold(renamed), {"weight_norm": False}, pixel_range=(0.0, 255.0),
                      source="official FDIWN release (24wenjie-li/FDIWN)")


@register_format
def recognise_own_fdiwn(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    """Our own key layout without metadata, with or without weight normalisation."""
    if not {"sub_mean.weight", "add_mean.weight", "head.weight", "tail.1.weight", "skip.1.weight"} <= sd.keys():
        return None
    n_groups = len({k.split(".")[1] for k in sd if k.startswith("fswg.")})
    scale, arch = _scale(sd, "tail.1.weight"), _arch(n_groups)
    if scale is None or arch is None:
        return None
    weight_norm = any(".parametrizations.weight." in k for k in sd)
    return Recognised(arch, scale, dict(sd), {"weight_norm": weight_norm}, pixel_range=(0.0, 255.0),
                      source="distillsr FDIWN state dict")
