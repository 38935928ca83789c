"""ASID checkpoints: the authors' release (saturnian77/ASID) and bare state dicts of ours.

The released files hold the official key names (``block0.residual_layer.0.LB1.net.fn.0``,
``SLA1``/``SGA1`` for the meso/global units, ``BlockC`` for the CAM, ...) and were
trained on inputs in [-1, 1]; they map one to one onto ``distillsr.models.asid``.
"""
from __future__ import annotations

import re
from typing import Dict, Optional

import torch

from ..checkpoint import Recognised, register_format
from . import scale_from_upsampler

# applied in order to the part of a key below ``block<i>.``
_BLOCK_RULES = [
    (r"^LB(\d)\.net\.fn\.0\.", r"lm\1.conv_in."),
    (r"^LB(\d)\.net\.fn\.2\.", r"lm\1.dwconv."),
    (r"^LB(\d)\.net\.fn\.4\.gate\.1\.", r"lm\1.se.fc1."),
    (r"^LB(\d)\.net\.fn\.4\.gate\.3\.", r"lm\1.se.fc2."),
    (r"^LB(\d)\.net\.fn\.5\.", r"lm\1.conv_out."),
    (r"^SLA(\d)\.", r"sam\1.meso."),
    (r"^SGA(\d)\.", r"sam\1.glob."),
    (r"\.norm\.", ".norm1."),
    (r"\.cnorm\.", ".norm2."),
    (r"\.attn\.to_qkv\.", ".attn.qkv."),
    (r"\.attn\.to_v\.", ".attn.v."),
    (r"\.attn\.to_out\.0\.", ".attn.proj."),
    (r"\.attn\.rel_pos_bias\.weight$", ".attn.rel_pos_bias"),
    (r"^BlockC\.canorm1\.", "cam.norm1."),
    (r"^BlockC\.cttn1\.", "cam.ca_meso."),
    (r"^BlockC\.cnorm1\.", "cam.norm2."),
    (r"^BlockC\.gfn1\.", "cam.gfn1."),
    (r"^BlockC\.canorm2\.", "cam.norm3."),
    (r"^BlockC\.cttn2\.", "cam.ca_glob."),
    (r"^BlockC\.cnorm2\.", "cam.norm4."),
    (r"^BlockC\.gfn2\.", "cam.gfn2."),
]
_TOP = {"input.": "head.", "output.": "fuse.", "up.0.": "upsampler.0."}


def official_key(key: str) -> str:
    """Our name for an official ASID state-dict key."""
    for old, new in _TOP.items():
        if key.startswith(old):
            return new + key[len(old):]
    m = re.match(r"^block(\d+)\.(.*)$", key)
    if not m:
        raise KeyError(key)
    i, rest = m.groups()
    if rest.startswith("res_end."):
        return f"blocks.{i}.conv.{rest[len('res_end.'):]}"
    if rest.startswith("esa."):
        return f"blocks.{i}.{rest}"
    rest = re.sub(r"^residual_layer\.(0\.)?", "", rest)
    for pattern, repl in _BLOCK_RULES:
        rest = re.sub(pattern, repl, rest)
    return f"blocks.{i}.{rest}"


def _count_blocks(sd, pattern: str) -> int:
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


@register_format
def recognise_official(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    if not {"input.weight", "up.0.weight", "block0.res_end.weight"} <= sd.keys():
        return None
    if "block0.residual_layer.0.LB1.net.fn.0.weight" not in sd:
        return None
    scale = scale_from_upsampler(sd["up.0.weight"])
    if scale is None:
        return None
    converted = {}
    for k, v in sd.items():
        if k.endswith("rel_pos_indices"):
            continue  # a buffer the release recomputes; some exports carry it
        nk = official_key(k)
        if nk.endswith("rel_pos_bias"):
            v = v.reshape(-1)
        elif nk.endswith("temperature"):
            v = v.reshape(1)
        converted[nk] = v
    blocks = _count_blocks(sd, r"^block(\d+)\.res_end\.weight$")
    channels = sd["input.weight"].shape[0]
    arch, options = ("asid-d8", {}) if blocks == 8 else ("asid", {} if blocks == 3 else {"blocks": blocks})
    if channels != 48:
        options["channels"] = channels
    return Recognised(arch, scale, converted, options, pixel_range=(-1.0, 1.0),
                      source="official ASID release (inputs in [-1, 1])")


@register_format
def recognise_ours(sd: Dict[str, torch.Tensor]) -> Optional[Recognised]:
    """A bare ``model.state_dict()`` of our ASID (no safetensors metadata)."""
    if not {"head.weight", "upsampler.0.weight", "blocks.0.conv.weight"} <= sd.keys():
        return None
    scale = scale_from_upsampler(sd["upsampler.0.weight"])
    if scale is None:
        return None
    blocks = _count_blocks(sd, r"^blocks\.(\d+)\.conv\.weight$")
    channels = sd["head.weight"].shape[0]
    options: Dict[str, object] = {"blocks": blocks}
    if channels != 48:
        options["channels"] = channels
    if "blocks.0.lm.conv_in.weight" in sd:
        return Recognised("asid-baseline", scale, sd, options)
    if "blocks.0.lm1.conv_in.weight" not in sd:
        return None
    if "blocks.0.pw1.weight" not in sd:
        options["channel_split"] = False
    if "blocks.0.sam2.meso.attn.v.weight" in sd:
        options["sharing"] = "intra"
    elif blocks > 1 and "blocks.1.sam1.meso.attn.qkv.weight" in sd:
        options["sharing"] = "none"
    arch = "asid"
    if blocks == 8:
        arch = "asid-d8"
        del options["blocks"]
    elif blocks == 3:
        del options["blocks"]
    return Recognised(arch, scale, sd, options)
