"""Recognise RFDN-family state dicts: the authors' release (njulj/RFDN, ``RFDN_AIM.pth``)
and our own layout saved without metadata.

Official keys (E-RFDN): ``fea_conv``, ``B{k}.c{1,2,3}_d`` (FDC), ``B{k}.c{1,2,3}_r`` (SRB
convs), ``B{k}.c4``, ``B{k}.c5``, ``B{k}.esa.{conv1,conv_f,conv2,conv_max,conv3,conv3_,conv4}``,
``c.0``, ``LR_conv``, ``upsampler.0``. A paper-variant port with ``B{k}.cca.conv_du.{0,2}``
(CCA) is mapped as well. Scale = sqrt(upsampler output channels / 3).
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from . import scale_from_upsampler
from ..checkpoint import Recognised, register_format

_TOP = {"fea_conv": "head", "c.0": "fuse", "LR_conv": "lr_conv", "upsampler.0": "upsampler.0"}
_BLOCK = {"c1_d": "fdc.0", "c2_d": "fdc.1", "c3_d": "fdc.2",
          "c1_r": "srb.0.conv", "c2_r": "srb.1.conv", "c3_r": "srb.2.conv",
          "c4": "last", "c5": "fuse",
          "esa.conv1": "attention.reduce", "esa.conv_f": "attention.skip", "esa.conv2": "attention.down",
          "esa.conv_max": "attention.pool_conv", "esa.conv3": "attention.group_conv1",
          "esa.conv3_": "attention.group_conv2", "esa.conv4": "attention.expand",
          "cca.conv_du.0": "attention.squeeze", "cca.conv_du.2": "attention.excite"}
_BLOCK_KEY = re.compile(r"^B(\d+)\.(.+)$")


def _rename(key: str) -> Optional[str]:
    module, leaf = key.rsplit(".", 1)
    if module in _TOP:
        return f"{_TOP[module]}.{leaf}"
    m = _BLOCK_KEY.match(module)
    if m and m.group(2) in _BLOCK:
        return f"blocks.{int(m.group(1)) - 1}.{_BLOCK[m.group(2)]}.{leaf}"
    return None


def _choose(sd: Dict[str, torch.Tensor], scale: int, source: str) -> Recognised:
    channels = sd["head.weight"].shape[0]
    blocks = len({k.split(".")[1] for k in sd if k.startswith("blocks.")})
    attention = "esa" if "blocks.0.attention.reduce.weight" in sd else "cca"
    if (channels, blocks, attention) == (50, 4, "esa"):
        arch, options = "e-rfdn", {}
    elif (channels, blocks, attention) == (48, 6, "cca"):
        arch, options = "rfdn", {}
    else:  # same family, other width/depth (e.g. RFDN-L: 52 channels)
        arch = "e-rfdn" if attention == "esa" else "rfdn"
        options = {"channels": channels, "blocks": blocks}
    return Recognised(arch, scale, sd, options, pixel_range=(0.0, 255.0), source=source)


@register_format
def recognise_official_rfdn(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    if not {"fea_conv.weight", "B1.c1_d.weight", "c.0.weight", "upsampler.0.weight"} <= sd.keys():
        return None
    scale = scale_from_upsampler(sd["upsampler.0.weight"])
    renamed = {_rename(k): v for k, v in sd.items()}
    if scale is None or None in renamed:
        return None
    return _choose(renamed, scale, "official RFDN release (njulj/RFDN)")


@register_format
def recognise_own_rfdn(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    """Our own key layout without metadata (e.g. ``torch.save(model.state_dict())``)."""
    if not {"head.weight", "blocks.0.fdc.0.weight", "lr_conv.weight", "upsampler.0.weight"} <= sd.keys():
        return None
    scale = scale_from_upsampler(sd["upsampler.0.weight"])
    return None if scale is None else _choose(dict(sd), scale, "distillsr RFDN state dict")
