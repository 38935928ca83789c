"""The table of pretrained weights that ship inside the package.

Each entry is a pair of files in ``src/distillsr/weights/``: the weights
``<name>_x<scale>.safetensors`` (written by :func:`distillsr.save_model`) and its model
card ``<name>_x<scale>.json``::

    {"name": "asid", "scale": 4, "arch": "asid", "file": "asid_x4.safetensors",
     "sha256": "<hex digest of the file>", "params": 313104,
     "training_data": "...", "psnr": {"Set5": 32.0, "Set14": 28.5, "B100": 27.5},
     "psnr_protocol": "...", "notes": "..."}

So adding weights needs no code change: drop both files there (:func:`save_pretrained`
writes them). The folder searched is the package's ``weights`` folder, or the folders in
the environment variable ``DISTILLSR_WEIGHTS_DIR`` (``os.pathsep``-separated, searched
first), or the ``weights_dir`` argument of the functions below.
"""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from .checkpoint import CheckpointError, load_model, save_model

__all__ = ["PretrainedEntry", "PretrainedError", "list_pretrained", "get_pretrained",
           "load_pretrained", "save_pretrained", "weights_dirs", "sha256_file",
           "DEFAULT_MODEL", "PACKAGE_WEIGHTS_DIR"]

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ENV_VAR = "DISTILLSR_WEIGHTS_DIR"
DEFAULT_MODEL = "asid"  # the weights `distillsr upscale` and `distillsr.upscale` use by default
_CARD_KEYS = ("name", "scale", "arch", "file", "sha256")

PathLike = Union[str, os.PathLike]
DirsArg = Optional[Union[PathLike, Sequence[PathLike]]]


class PretrainedError(LookupError, ValueError):
    """Pretrained weights that are not installed, or whose file does not match its card
    (caught by ``except LookupError`` and by ``except ValueError``)."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One row of the pretrained-weights table (read from a model card)."""
    name: str
    scale: int
    arch: str
    file: Path
    sha256: str
    params: Optional[int] = None
    training_data: str = ""
    psnr: Dict[str, float] = field(default_factory=dict)
    psnr_protocol: str = ""
    notes: str = ""
    card: Optional[Path] = None

    @property
    def installed(self) -> bool:
        return self.file.is_file()


def weights_dirs(weights_dir: DirsArg = None) -> List[Path]:
    """Folders searched for model cards, first match wins."""
    if weights_dir is not None:
        items = [weights_dir] if isinstance(weights_dir, (str, os.PathLike)) else list(weights_dir)
        return [Path(d) for d in items]
    env = os.environ.get(ENV_VAR, "")
    dirs = [Path(d) for d in env.split(os.pathsep) if d]
    return dirs + [PACKAGE_WEIGHTS_DIR]


def _read_card(path: Path) -> PretrainedEntry:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: unreadable model card ({e})") from e
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise PretrainedError(f"{path}: model card lacks {', '.join(missing)}")
    return PretrainedEntry(
        name=str(card["name"]).lower(), scale=int(card["scale"]), arch=str(card["arch"]),
        file=path.parent / card["file"], sha256=str(card["sha256"]).lower(),
        params=card.get("params"), training_data=str(card.get("training_data", "")),
        psnr={str(k): float(v) for k, v in (card.get("psnr") or {}).items()},
        psnr_protocol=str(card.get("psnr_protocol", "")), notes=str(card.get("notes", "")),
        card=path)


def list_pretrained(weights_dir: DirsArg = None) -> List[PretrainedEntry]:
    """Every pretrained entry found (sorted by name and scale); earlier folders win."""
    found: Dict[tuple, PretrainedEntry] = {}
    for d in weights_dirs(weights_dir):
        if not d.is_dir():
            continue
        for card in sorted(d.glob("*.json")):
            entry = _read_card(card)
            found.setdefault((entry.name, entry.scale), entry)
    return sorted(found.values(), key=lambda e: (e.name, e.scale))


def get_pretrained(name: str, scale: int, weights_dir: DirsArg = None) -> PretrainedEntry:
    """The table entry for ``name`` at x``scale``; :class:`PretrainedError` if none ships."""
    entries = list_pretrained(weights_dir)
    for e in entries:
        if e.name == name.lower() and e.scale == scale:
            return e
    have = ", ".join(f"{e.name} x{e.scale}" for e in entries) or "none"
    where = ", ".join(str(d) for d in weights_dirs(weights_dir))
    raise PretrainedError(f"no pretrained weights {name!r} x{scale} are installed (looked in {where}; "
                          f"available: {have}); pass a checkpoint file instead (--weights PATH)")


def sha256_file(path: PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            h.update(block)
    return h.hexdigest()


def load_pretrained(name: str = DEFAULT_MODEL, scale: int = 4, device: Union[str, torch.device] = "cpu",
                    weights_dir: DirsArg = None) -> torch.nn.Module:
    """Load shipped weights by name and scale, after checking the file's sha256."""
    entry = get_pretrained(name, scale, weights_dir)
    if not entry.installed:
        raise PretrainedError(f"{entry.card}: names weight file {entry.file.name}, which is missing "
                              f"from {entry.file.parent}")
    digest = sha256_file(entry.file)
    if digest != entry.sha256:
        raise PretrainedError(f"{entry.file}: sha256 {digest} does not match the model card's "
                              f"{entry.sha256} (corrupt or replaced file)")
    try:
        model = load_model(entry.file, device)
    except CheckpointError as e:
        raise PretrainedError(str(e)) from e
    got = (getattr(model, "arch_name", None), getattr(model, "scale", None))
    if got != (entry.arch, entry.scale):
        raise PretrainedError(f"{entry.file}: holds {got[0]} x{got[1]}, but its card says "
                              f"{entry.arch} x{entry.scale}")
    model.pretrained_name = entry.name
    return model


def save_pretrained(model: torch.nn.Module, name: str, weights_dir: PathLike = PACKAGE_WEIGHTS_DIR, *,
                    training_data: str = "", psnr: Optional[Dict[str, float]] = None,
                    psnr_protocol: str = "", notes: str = "") -> PretrainedEntry:
    """Write ``<name>_x<scale>.safetensors`` and its model card into ``weights_dir``."""
    weights_dir = Path(weights_dir)
    stem = f"{name.lower()}_x{model.scale}"
    path = save_model(model, weights_dir / f"{stem}.safetensors", {"distillsr.pretrained": name.lower()})
    card = {"name": name.lower(), "scale": int(model.scale), "arch": model.arch_name,
            "file": path.name, "sha256": sha256_file(path),
            "params": sum(p.numel() for p in model.parameters()),
            "training_data": training_data, "psnr": dict(psnr or {}),
            "psnr_protocol": psnr_protocol, "notes": notes}
    card_path = weights_dir / f"{stem}.json"
    tmp = card_path.with_name(f".{card_path.name}.part")
    tmp.write_text(json.dumps(card, indent=2) + "\n", encoding="utf-8")
    os.replace(tmp, card_path)
    return _read_card(card_path)


def describe(entries: Iterable[PretrainedEntry]) -> List[str]:
    """Text lines of the table, as `distillsr models` prints it."""
    rows = [("name", "scale", "arch", "params", "Set5", "Set14", "B100", "training data", "file")]
    for e in entries:
        ps = [f"{e.psnr[k]:.2f}" if k in e.psnr else "-" for k in ("Set5", "Set14", "B100")]
        rows.append((e.name, f"x{e.scale}", e.arch, f"{e.params:,}" if e.params else "-", *ps,
                     e.training_data or "-", e.file.name + ("" if e.installed else " (missing)")))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)) + "  " + r[-1] for r in rows]
