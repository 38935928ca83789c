"""Reading, recognising and writing checkpoints.

``load_model(path)`` accepts
* our own safetensors files (architecture, scale and options in the metadata),
* state dicts in safetensors or torch files without metadata, recognised from
  their key names and shapes by the converters in ``distillsr.convert``
  (the authors' released ASID, RFDN and FDIWN checkpoints among them).
Nothing is unpickled except tensors (``weights_only``).
"""
from __future__ import annotations

import json
import os
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Mapping, Optional, Tuple, Union

import torch

from .io import atomic_write
from .registry import create_model

__all__ = ["CheckpointError", "load_model", "save_model", "read_state_dict", "metadata_pixel_range",
           "register_format", "Recognised", "recognise"]

PathLike = Union[str, os.PathLike]
StateDict = Dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint that cannot be read or is not a known architecture."""


@dataclass
class Recognised:
    """What a converter found: how to build the network and its converted weights."""
    arch: str
    scale: int
    state_dict: StateDict
    options: Dict[str, object] = field(default_factory=dict)
    pixel_range: Tuple[float, float] = (0.0, 1.0)
    source: str = ""  # e.g. "official ASID release"


Recogniser = Callable[[StateDict], Optional[Recognised]]
_RECOGNISERS: List[Recogniser] = []


def register_format(fn: Recogniser) -> Recogniser:
    """Register ``fn(state_dict) -> Recognised | None`` (a decorator)."""
    _RECOGNISERS.append(fn)
    return fn


def _ensure_converters() -> None:
    from . import convert  # noqa: F401  (registers the recognisers)


_CONTAINER_KEYS = ("params_ema", "params", "state_dict", "model_state_dict", "model", "net", "weights")


def _unwrap(obj, path: Path) -> StateDict:
    """Find the tensor dict inside common checkpoint containers."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            break
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in _CONTAINER_KEYS if k in obj and isinstance(obj[k], Mapping)), None)
            if inner is None:
                break
            obj = inner
    if not (isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values())):
        raise CheckpointError(f"{path}: does not hold a state dict of tensors (found {type(obj).__name__})")
    sd = {str(k): v for k, v in obj.items()}
    if all(k.startswith("module.") for k in sd):  # saved from DataParallel / DDP
        sd = {k[len("module."):]: v for k, v in sd.items()}
    return sd


def _is_safetensors(path: Path) -> bool:
    with open(path, "rb") as f:
        head = f.read(9)
    if len(head) < 9:
        return False
    n = int.from_bytes(head[:8], "little")
    return 0 < n < 100_000_000 and head[8:9] == b"{"


def read_state_dict(path: PathLike) -> Tuple[StateDict, Dict[str, str]]:
    """Read tensors and metadata from a safetensors or torch file, executing no code."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{path}: is a folder, not a checkpoint file{_meant_in(path)}")
    if path.name.endswith(".state.pt"):
        weights = path.with_name(path.name[:-len(".state.pt")] + ".safetensors")
        raise CheckpointError(f"{path}: is a training state file (optimizer, RNG, step), not network weights; "
                              f"the weights of that checkpoint are {weights}")
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file")
    size = path.stat().st_size
    if size == 0:
        raise CheckpointError(f"{path}: empty file (0 bytes)")
    if _is_safetensors(path):
        from safetensors import safe_open
        try:
            with safe_open(str(path), framework="pt") as f:
                meta = dict(f.metadata() or {})
                sd = {k: f.get_tensor(k) for k in f.keys()}
        except Exception as e:  # safetensors raises its own error types
            raise CheckpointError(f"{path}: unreadable safetensors file, truncated or corrupt ({e})") from e
        return sd, meta
    try:
        obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        obj = _load_restricted(path, e)
    return _unwrap(obj, path), {}


def _meant_in(folder: Path) -> str:
    """'; did you mean ...' for a training run folder: its final, best or newest weights."""
    for name in ("model.safetensors", "best.safetensors"):
        if (folder / name).is_file():
            return f"; did you mean {folder / name}?"
    found = sorted(folder.glob("**/*.safetensors"), key=lambda p: p.stat().st_mtime)
    return f"; did you mean {found[-1]}?" if found else " (no .safetensors weights in it)"


def _load_restricted(path: Path, first_error: Exception):
    """Fallback for torch pickles that ``weights_only`` refuses (see convert.safe_pickle)."""
    from .convert.safe_pickle import load_restricted
    return load_restricted(path, first_error)


def _describe_load_error(path: Path, e: Exception) -> CheckpointError:
    msg = str(e)
    if zipfile.is_zipfile(path) is False and ("zip" in msg.lower() or "central directory" in msg.lower()):
        why = "truncated or corrupt torch zip archive"
    elif isinstance(e, (EOFError,)) or "ran out of input" in msg.lower() or "eof" in msg.lower():
        why = "truncated file"
    elif "weights_only" in msg or "Unsupported global" in msg or "unpickl" in msg.lower():
        why = "it holds pickled objects other than tensors, which are not loaded (weights_only)"
    else:
        why = "not a safetensors or torch checkpoint, or corrupt"
    return CheckpointError(f"{path}: cannot load checkpoint: {why} ({msg.splitlines()[0] if msg else type(e).__name__})")


def recognise(sd: StateDict, path: PathLike = "<state dict>") -> Recognised:
    _ensure_converters()
    for fn in _RECOGNISERS:
        found = fn(sd)
        if found is not None:
            return found
    sample = ", ".join(list(sd)[:4])
    raise CheckpointError(f"{path}: not a known architecture ({len(sd)} tensors; first keys: {sample})")


def metadata_pixel_range(meta: Mapping[str, str]) -> Tuple[float, float]:
    """The pixel range our safetensors metadata records (``distillsr.pixel_range``; [0, 1] if absent)."""
    lo, hi = json.loads(meta.get("distillsr.pixel_range", "[0, 1]"))
    return float(lo), float(hi)


def _from_metadata(meta: Mapping[str, str], sd: StateDict, path: Path) -> Recognised:
    """What our own metadata says the file holds; unreadable metadata is a CheckpointError."""
    try:
        options = json.loads(meta.get("distillsr.options") or "{}")
        if not isinstance(options, dict):
            raise ValueError(f"distillsr.options {options!r} is not a mapping")
        scale = int(meta.get("distillsr.scale", ""))
        pixel_range = metadata_pixel_range(meta)
    except (ValueError, TypeError) as e:
        raise CheckpointError(f"{path}: unreadable distillsr metadata ({e})") from e
    return Recognised(meta["distillsr.arch"], scale, sd, options, pixel_range, "distillsr")


def _build_checked(rec: Recognised, path: Path) -> torch.nn.Module:
    """The network for ``rec``, built first without memory ("meta" tensors) to compare its
    tensors with the file's: options from a file can then never allocate more than the file
    holds."""
    try:
        with torch.device("meta"):
            shell = create_model(rec.arch, rec.scale, **rec.options)
        want = {k: tuple(v.shape) for k, v in shell.state_dict().items()}
    except Exception as e:  # unknown arch, bad scale or options: any error of a builder
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from e
    have = {k: tuple(v.shape) for k, v in rec.state_dict.items()}
    if want != have:
        missing = [k for k in want if k not in have]
        extra = [k for k in have if k not in want]
        shapes = [f"{k} {have[k]} (needs {want[k]})" for k in want if k in have and have[k] != want[k]]
        detail = "; ".join(part for part in (
            f"missing {', '.join(missing[:3])}" if missing else "",
            f"unexpected {', '.join(extra[:3])}" if extra else "",
            f"shapes {', '.join(shapes[:3])}" if shapes else "") if part)
        raise CheckpointError(f"{path}: weights do not fit {rec.arch} x{rec.scale}: {detail}")
    try:
        return create_model(rec.arch, rec.scale, **rec.options)
    except Exception as e:
        raise CheckpointError(f"{path}: {type(e).__name__}: {e}") from e


def load_model(path: PathLike, device: Union[str, torch.device] = "cpu") -> torch.nn.Module:
    """Load any supported checkpoint into a ready model (eval mode, [0, 1] in/out)."""
    path = Path(path)
    sd, meta = read_state_dict(path)
    if "distillsr.arch" in meta:
        rec = _from_metadata(meta, sd, path)
    else:
        rec = recognise(sd, path)
    model = _build_checked(rec, path)
    try:
        model.load_state_dict(rec.state_dict, strict=True)
    except RuntimeError as e:
        detail = " ".join(line.strip() for line in str(e).splitlines()[1:3])
        raise CheckpointError(f"{path}: weights do not fit {rec.arch} x{rec.scale}: {detail}") from e
    model.set_pixel_range(*rec.pixel_range)
    model.checkpoint_source = rec.source or "distillsr"
    return model.to(device).eval()


def save_model(model: torch.nn.Module, path: PathLike, metadata: Optional[Dict[str, str]] = None) -> Path:
    """Write the model's weights as safetensors with what ``load_model`` needs, atomically."""
    from safetensors.torch import save_file
    path = Path(path)
    meta = {
        "distillsr.arch": getattr(model, "arch_name"),
        "distillsr.scale": str(model.scale),
        "distillsr.options": json.dumps(getattr(model, "arch_options", {}), sort_keys=True),
        "distillsr.pixel_range": json.dumps(list(getattr(model, "pixel_range", (0.0, 1.0)))),
    }
    meta.update({str(k): str(v) for k, v in (metadata or {}).items()})
    sd = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    atomic_write(path, lambda tmp: save_file(sd, tmp, metadata=meta))
    return path
