"""The table of pretrained weights that ship inside the package.

Each entry is a pair of files in ``src/distillsr/weights/``: the weights
``<name>_x<scale>.safetensors`` (written by :func:`distillsr.save_model`) and its model
card ``<name>_x<scale>.json``::

    {"name": "asid", "scale": 4, "arch": "asid", "file": "asid_x4.safetensors",
     "sha256": "<hex digest of the file>", "params": 313104,
     "training": {"data": "...", "iterations": 5820, "hardware": "...", "wall_time_h": 8.4,
                  "commands": ["distillsr train ...", ...]},
     "scores": {"Set5": {"psnr": 30.41, "ssim": 0.8627}, "Set14": {...}, "B100": {...}},
     "protocol": "how the scores were measured", "notes": "..."}

Only ``name``, ``scale``, ``arch``, ``file`` and ``sha256`` are required; ``training`` may hold
any other keys too (``start``, ``history``, ...). Cards of the older form, with
``training_data`` (a string), ``psnr`` (``{set: psnr}``) and ``psnr_protocol``, are read as
well (:attr:`PretrainedEntry.training` is then ``{"data": training_data}``).

So adding weights needs no code change: drop both files there (:func:`save_pretrained`
writes them; ``distillsr ship`` evaluates a checkpoint and writes them). The folders searched
are those in the environment variable ``DISTILLSR_WEIGHTS_DIR`` (``os.pathsep``-separated,
searched first), the package's ``weights`` folder and the cache's ``weights`` folder (where
``distillsr weights pull`` puts the authors' releases, :mod:`distillsr.releases`); or only the
``weights_dir`` argument of the functions below.

For a name of the release table (``asid-release``, ``fdiwn-release``, ...) the scores come
from that table (measured here where possible, else published), and :func:`load_pretrained`
pulls the file on first use. With no name, :func:`choose_default` picks the best weights
present on this machine for the scale, by the Set5 PSNR on their card; it never uses the
network.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence, Union

import torch

from .checkpoint import CheckpointError, load_model, save_model
from .io import atomic_write, sha256_file

__all__ = ["PretrainedEntry", "PretrainedError", "list_pretrained", "get_pretrained",
           "load_pretrained", "save_pretrained", "choose_default", "weights_dirs", "sha256_file",
           "read_card", "PACKAGE_WEIGHTS_DIR"]

PACKAGE_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
ENV_VAR = "DISTILLSR_WEIGHTS_DIR"
RELEASE_TABLE = "releases.json"  # the release table lives beside the cards; it is not a card
_CARD_KEYS = ("name", "scale", "arch", "file", "sha256")

PathLike = Union[str, os.PathLike]
DirsArg = Optional[Union[PathLike, Sequence[PathLike]]]


class PretrainedError(LookupError, ValueError):
    """Pretrained weights that are not installed, or whose file does not match its card
    (caught by ``except LookupError`` and by ``except ValueError``)."""


@dataclass(frozen=True)
class PretrainedEntry:
    """One row of the pretrained-weights table (read from a model card).

    ``psnr`` and ``ssim`` map a benchmark set to its score; ``training`` is the card's
    training record (``data``, ``iterations``, ``hardware``, ``wall_time_h``, ``commands``, ...)
    and ``training_data`` its ``data``."""
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
    published: Dict[str, float] = field(default_factory=dict)  # PSNR the authors printed
    source: Dict[str, object] = field(default_factory=dict)    # where a release's file came from
    ssim: Dict[str, float] = field(default_factory=dict)
    training: Dict[str, object] = field(default_factory=dict)

    @property
    def installed(self) -> bool:
        return self.file.is_file()

    @property
    def bundled(self) -> bool:
        return self.file.parent == PACKAGE_WEIGHTS_DIR

    @property
    def set5(self) -> Optional[float]:
        """The Set5 PSNR that ranks these weights: measured here where possible, else published."""
        return self.psnr.get("Set5", self.published.get("Set5"))

    @property
    def set5_source(self) -> str:
        return "measured" if "Set5" in self.psnr else "published" if "Set5" in self.published else "unknown"


def weights_dirs(weights_dir: DirsArg = None) -> List[Path]:
    """Folders searched for model cards, first match wins."""
    if weights_dir is not None:
        items = [weights_dir] if isinstance(weights_dir, (str, os.PathLike)) else list(weights_dir)
        return [Path(d) for d in items]
    from .releases import cache_weights_dir
    env = os.environ.get(ENV_VAR, "")
    dirs = [Path(d) for d in env.split(os.pathsep) if d]
    return dirs + [PACKAGE_WEIGHTS_DIR, cache_weights_dir()]


# the types a card's training record must have, where it has these keys
_TRAINING_TYPES = {"data": (str,), "iterations": (int,), "hardware": (str,), "wall_time_h": (int, float),
                   "commands": (list,)}


def _card_training(card: dict, path: Path) -> Dict[str, object]:
    """The training record: the ``training`` object, or ``{"data": training_data}`` of an older card."""
    if card.get("training") is None:
        data = card.get("training_data")
        return {"data": str(data)} if data else {}
    training = card["training"]
    if not isinstance(training, dict):
        raise PretrainedError(f"{path}: 'training' must be an object (data, iterations, hardware, ...)")
    for key, types in _TRAINING_TYPES.items():
        value = training.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, types):
            raise PretrainedError(f"{path}: training.{key} must be {' or '.join(t.__name__ for t in types)}, "
                                  f"not {value!r}")
    if not all(isinstance(c, str) for c in training.get("commands") or []):
        raise PretrainedError(f"{path}: training.commands must be a list of strings")
    return dict(training)


def _card_scores(card: dict, path: Path) -> tuple:
    """``(psnr, ssim)``, each ``{set: score}``: from ``scores`` or an older card's ``psnr``."""
    if "scores" not in card:
        try:
            return {str(k): float(v) for k, v in (card.get("psnr") or {}).items()}, {}
        except (AttributeError, TypeError, ValueError):
            raise PretrainedError(f"{path}: 'psnr' must map each set to a number") from None
    scores = card["scores"] or {}
    if not isinstance(scores, dict) or not all(isinstance(v, dict) for v in scores.values()):
        raise PretrainedError(f"{path}: 'scores' must map each set to {{\"psnr\": .., \"ssim\": ..}}")
    found = ({}, {})
    for name, metric in zip(("psnr", "ssim"), found):
        for k, v in scores.items():
            if v.get(name) is None:
                continue
            if isinstance(v[name], bool) or not isinstance(v[name], (int, float)):
                raise PretrainedError(f"{path}: scores.{k}.{name} must be a number, not {v[name]!r}")
            metric[str(k)] = float(v[name])
    return found


def _read_card(path: Path) -> PretrainedEntry:
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise PretrainedError(f"{path}: unreadable model card ({e})") from e
    if not isinstance(card, dict):
        raise PretrainedError(f"{path}: a model card is a JSON object")
    missing = [k for k in _CARD_KEYS if k not in card]
    if missing:
        raise PretrainedError(f"{path}: model card lacks {', '.join(missing)}")
    training = _card_training(card, path)
    psnr, ssim = _card_scores(card, path)
    entry = PretrainedEntry(
        name=str(card["name"]).lower(), scale=int(card["scale"]), arch=str(card["arch"]),
        file=path.parent / card["file"], sha256=str(card["sha256"]).lower(),
        params=card.get("params"), training_data=str(training.get("data", "")), psnr=psnr, ssim=ssim,
        psnr_protocol=str(card.get("protocol", card.get("psnr_protocol", ""))),
        notes=str(card.get("notes", "")), card=path, source=dict(card.get("source") or {}),
        training=training)
    from .releases import find_release
    release = find_release(entry.name, entry.scale)
    if release is None:
        return entry
    # a release's scores are kept once, in the release table
    return replace(entry, psnr=release.measured_psnr, published=release.published_psnr,
                   ssim={k: float(v["ssim"]) for k, v in release.measured.items() if "ssim" in v},
                   psnr_protocol=release.protocol_text)


def read_card(path: PathLike) -> PretrainedEntry:
    """The entry of one model card file (either form); :class:`PretrainedError` if it is unreadable
    or malformed."""
    return _read_card(Path(path))


def list_pretrained(weights_dir: DirsArg = None) -> List[PretrainedEntry]:
    """Every pretrained entry found (sorted by name and scale); earlier folders win."""
    found: Dict[tuple, PretrainedEntry] = {}
    for d in weights_dirs(weights_dir):
        if not d.is_dir():
            continue
        for card in sorted(d.glob("*.json")):
            if card.name == RELEASE_TABLE:
                continue
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
                          f"available: {have}); `distillsr weights list` names the releases that can be "
                          f"pulled, or pass a checkpoint file instead (--weights PATH)")


def choose_default(scale: int, weights_dir: DirsArg = None) -> PretrainedEntry:
    """The best weights present on this machine for x``scale``: the highest Set5 PSNR on the
    cards (measured where possible, else published); ties go to the first name. Offline."""
    found = [e for e in list_pretrained(weights_dir) if e.scale == scale and e.installed]
    if not found:
        raise PretrainedError(f"no pretrained weights for x{scale} are installed; `distillsr weights pull "
                              f"NAME --scale {scale}` fetches a release, or pass --weights PATH")
    best = found[0]
    for e in found[1:]:  # sorted by name, so a tie keeps the first
        if (e.set5 or float("-inf")) > (best.set5 or float("-inf")):
            best = e
    return best


def load_pretrained(name: Optional[str] = None, scale: int = 4, device: Union[str, torch.device] = "cpu",
                    weights_dir: DirsArg = None, pull: bool = True) -> torch.nn.Module:
    """Load weights by name and scale, after checking the file's sha256.

    ``name=None``: :func:`choose_default` (the best present, never the network). A name of the
    release table that is not in the cache yet is pulled first (``pull=False`` refuses).
    """
    if name is None:
        entry = choose_default(scale, weights_dir)
    else:
        try:
            entry = get_pretrained(name, scale, weights_dir)
        except PretrainedError:
            entry = None
        if entry is None or not entry.installed:
            entry = _pull_release(name, scale, weights_dir, pull) or entry
        if entry is None:
            get_pretrained(name, scale, weights_dir)  # raises the message naming what is there
    if not entry.installed:
        raise PretrainedError(f"{entry.card}: names weight file {entry.file.name}, which is missing "
                              f"from {entry.file.parent}")
    digest = sha256_file(entry.file)
    if digest != entry.sha256:
        raise PretrainedError(f"{entry.file}: sha256 {digest} does not match the model card's "
                              f"{entry.sha256} (corrupt or replaced file)")
    from .releases import check_source
    check_source(entry)
    try:
        model = load_model(entry.file, device)
    except CheckpointError as e:
        raise PretrainedError(str(e)) from e
    got = (getattr(model, "arch_name", None), getattr(model, "scale", None))
    if got != (entry.arch, entry.scale):
        raise PretrainedError(f"{entry.file}: holds {got[0]} x{got[1]}, but its card says "
                              f"{entry.arch} x{entry.scale}")
    model.pretrained_name = entry.name
    model.pretrained_file = str(entry.file)
    return model


def _pull_release(name: str, scale: int, weights_dir: DirsArg, pull: bool) -> Optional[PretrainedEntry]:
    """Pull a release that is not in the cache yet; None when ``name`` is no release name."""
    from .releases import find_release, get_release, pull as pull_release
    if weights_dir is not None or find_release(name) is None:
        return None
    get_release(name, scale)  # a scale the release lacks: the error names those it has
    if not pull:
        raise PretrainedError(f"{name} x{scale} is not in the cache; `distillsr weights pull {name} "
                              f"--scale {scale}` fetches it")
    return pull_release(name, scale)


def save_pretrained(model: torch.nn.Module, name: str, weights_dir: PathLike = PACKAGE_WEIGHTS_DIR, *,
                    training_data: str = "", psnr: Optional[Dict[str, float]] = None,
                    psnr_protocol: str = "", notes: str = "",
                    source: Optional[Dict[str, object]] = None,
                    ssim: Optional[Dict[str, float]] = None,
                    training: Optional[Dict[str, object]] = None) -> PretrainedEntry:
    """Write ``<name>_x<scale>.safetensors`` and its model card into ``weights_dir``.

    ``training``: the card's training record (``data``, ``iterations``, ``hardware``,
    ``wall_time_h``, ``commands``, ...); ``training_data`` is its ``data`` (give one or the
    other, or both the same). ``psnr``/``ssim``: ``{set: score}``, kept as the card's
    ``scores``, measured as ``psnr_protocol`` says. ``source``: where a release's file came from.
    """
    record = dict(training or {})
    if training_data:
        if record.get("data") not in (None, training_data):
            raise ValueError(f"training_data {training_data!r} and training['data'] {record['data']!r} differ")
        record = {"data": training_data, **record}
    scores: Dict[str, Dict[str, float]] = {}
    for metric, values in (("psnr", psnr), ("ssim", ssim)):
        for k, v in (values or {}).items():
            scores.setdefault(str(k), {})[metric] = float(v)
    weights_dir = Path(weights_dir)
    stem = f"{name.lower()}_x{model.scale}"
    card_path = weights_dir / f"{stem}.json"
    _card_training({"training": record}, card_path)  # refuse what reading the card would refuse
    path = save_model(model, weights_dir / f"{stem}.safetensors", {"distillsr.pretrained": name.lower()})
    card = {"name": name.lower(), "scale": int(model.scale), "arch": model.arch_name,
            "file": path.name, "sha256": sha256_file(path),
            "params": sum(p.numel() for p in model.parameters()),
            "training": record, "scores": scores, "protocol": psnr_protocol, "notes": notes}
    if source:
        card["source"] = dict(source)
    text = json.dumps(card, indent=2, ensure_ascii=False) + "\n"
    atomic_write(card_path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
    return _read_card(card_path)


def _scores(measured: Dict[str, float], published: Dict[str, float]) -> List[str]:
    """'measured / published' PSNR cells for Set5, Set14, B100."""
    def num(v):
        return f"{v:.2f}" if v is not None else "-"
    return [f"{num(measured.get(k))} / {num(published.get(k))}" for k in ("Set5", "Set14", "B100")]


def format_table(header: Sequence[str], rows: Iterable[Sequence[str]]) -> List[str]:
    """Left-aligned text columns."""
    rows = [tuple(header)] + [tuple(r) for r in rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]


def describe(entries: Iterable[PretrainedEntry]) -> List[str]:
    """Text lines of the weights on this machine, as `distillsr models` prints them; ``*`` marks
    the default of each scale (:func:`choose_default`)."""
    entries = list(entries)
    defaults = set()
    for s in sorted({e.scale for e in entries if e.installed}):
        try:
            d = choose_default(s)
        except PretrainedError:
            continue
        defaults.add((d.name, d.scale, d.file))
    rows = []
    for e in entries:
        mark = "*" if (e.name, e.scale, e.file) in defaults else ""
        where = "bundled" if e.bundled else str(e.file.parent)
        rows.append((e.name + mark, f"x{e.scale}", e.arch, f"{e.params:,}" if e.params else "-",
                     *_scores(e.psnr, e.published), e.training_data or "-",
                     where + ("" if e.installed else f" ({e.file.name} missing)")))
    return format_table(("name", "scale", "arch", "params", "Set5 meas / pub", "Set14 meas / pub",
                         "B100 meas / pub", "training data", "where"), rows)
