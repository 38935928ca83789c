"""What the report measures, and its cache: benchmark scores, cost and speed per model.

Scores come from :func:`distillsr.engine.evaluate.evaluate`, the function behind
``distillsr eval``, called per model, scale, set and protocol (``default``: eval's
defaults; ``release``: ``eval --protocol release``), so a row of ``results.json`` is the
number ``distillsr eval`` prints for the same arguments. Parameters and MACs come from
:func:`distillsr.engine.profile.count_cost`, latency and memory from
:func:`~distillsr.engine.profile.profile_model`.

Every measurement is cached as one JSON file under ``<out>/cache/``, named by a digest
of what determines it: the weights (sha256 of the state dict), the scale, the set's
files (content hashes), the protocol, the device and the code (the sources of the
package outside ``report`` and ``cli``). A rerun with one more model computes only it.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..io import atomic_write_text, sha256_file

PathLike = Union[str, os.PathLike]
OUTPUT_720P = (1280, 720)

# eval's defaults (``distillsr eval`` without --protocol)
DEFAULT_PROTOCOL = {"tile": None, "tile_overlap": 24, "chop": False, "ssim": "wang"}


class ReportError(RuntimeError):
    """The report cannot be made (bad arguments, missing data, unusable weights)."""


# ----------------------------------------------------------------------------- models
@dataclass
class ModelSpec:
    """One model at one scale: ``name`` as ``eval --model`` takes it (None for a file),
    ``weights`` a checkpoint path (None for a name), ``label`` for people."""
    label: str
    scale: int
    name: Optional[str] = None
    weights: Optional[str] = None
    arch: str = "bicubic"
    _identity: Optional[str] = field(default=None, repr=False)

    @property
    def is_network(self) -> bool:
        return self.arch != "bicubic"

    def eval_model(self, device: str = "cpu"):
        """A fresh :class:`~distillsr.engine.evaluate.EvalModel`, resolved exactly as
        ``distillsr eval --model NAME`` / ``--weights PATH`` resolves it."""
        from ..engine.evaluate import load_eval_model
        return load_eval_model(self.name, self.weights, scale=self.scale, device=device)

    def module(self) -> Optional[torch.nn.Module]:
        """A fresh network (not prepared for inference); None for bicubic."""
        return self.eval_model("cpu").module

    @property
    def identity(self) -> str:
        """``bicubic`` or ``arch:sha256 of the weights`` (the same only for the same computation)."""
        if self._identity is None:
            if not self.is_network:
                self._identity = "bicubic"
            else:
                from ..engine.backends import weights_digest
                self._identity = f"{self.arch}:{weights_digest(self.module())}"
        return self._identity


def resolve_models(models: Optional[Sequence[str]], weights: Sequence[PathLike], scales: Sequence[int],
                   log: Callable[[str], None]) -> Tuple[List[ModelSpec], List[str]]:
    """The models to report, per scale, and notes on those left out. Nothing is downloaded:
    a release that is not in the cache is left out with a note saying how to pull it."""
    from ..checkpoint import CheckpointError, load_model
    from ..pretrained import list_pretrained
    from ..registry import list_models
    from ..releases import find_release
    installed = {(e.name, e.scale): e for e in list_pretrained() if e.installed}
    known = {e.name for e in list_pretrained()}
    if models is None:
        models = ["bicubic"] + ([] if weights else sorted({n for n, _ in installed}))
    specs: List[ModelSpec] = []
    notes: List[str] = []
    for raw in models:
        name = raw.lower()
        for s in scales:
            if name == "bicubic":
                specs.append(ModelSpec("bicubic", s, name="bicubic"))
            elif (name, s) in installed:
                e = installed[(name, s)]
                specs.append(ModelSpec(name, s, name=name, weights=None, arch=e.arch))
            elif find_release(name) is not None or name in known:
                notes.append(f"{name} x{s}: weights not on this machine (left out; "
                             f"`distillsr weights pull {name} --scale {s}` fetches a release)")
            elif name in list_models():
                notes.append(f"{name} x{s}: no weights of this architecture ship (left out; "
                             f"give a checkpoint with --weights FILE)")
            else:
                raise ReportError(f"unknown model {raw!r}: give 'bicubic', a weights name "
                                  f"(`distillsr models`) or --weights FILE")
    for w in weights:
        path = Path(w)
        try:
            net = load_model(path)
        except (CheckpointError, OSError) as e:
            raise ReportError(f"--weights {w}: {e}") from None
        arch = getattr(net, "arch_name", type(net).__name__)
        if net.scale not in scales:
            notes.append(f"{path.name}: a x{net.scale} {arch} checkpoint, not at the scales asked for "
                         f"({', '.join(f'x{s}' for s in scales)}); left out")
            continue
        specs.append(ModelSpec(f"{arch} ({path.name})", net.scale, weights=str(path), arch=arch))
    for n in notes:
        log(n)
    return specs, notes


# ----------------------------------------------------------------------------- cache keys
_CODE_VERSION: Optional[str] = None


def code_version() -> str:
    """The package version and a digest of the sources that compute the numbers (all of
    ``distillsr`` but ``report`` and ``cli``)."""
    global _CODE_VERSION
    if _CODE_VERSION is None:
        from .. import __version__
        root = Path(__file__).resolve().parents[1]
        h = hashlib.sha256()
        for p in sorted(root.rglob("*")):
            rel = p.relative_to(root)
            if rel.parts[0] in ("report", "cli") or p.suffix not in (".py", ".c") or not p.is_file():
                continue
            h.update(str(rel).encode())
            h.update(p.read_bytes())
        _CODE_VERSION = f"{__version__}+{h.hexdigest()[:16]}"
    return _CODE_VERSION


def data_fingerprint(root: Path, dataset: str, scale: int) -> str:
    """sha256 of the names and contents of a set's HR and x``scale`` LR files."""
    h = hashlib.sha256()
    base = Path(root) / dataset
    for sub in ("HR", f"LR_bicubic/X{scale}"):
        d = base / sub
        if not d.is_dir():
            h.update(f"{sub}: absent".encode())
            continue
        for p in sorted(d.iterdir()):
            if p.is_file():
                h.update(f"{sub}/{p.name}:{sha256_file(p)}".encode())
    return h.hexdigest()


def cache_key(**parts) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True, default=str).encode()).hexdigest()[:32]


class Cache:
    """JSON files under one folder, written atomically; ``hits`` / ``misses`` count lookups."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.hits = 0
        self.misses = 0

    def path(self, kind: str, key: str) -> Path:
        return self.folder / f"{kind}-{key}.json"

    def get(self, kind: str, key: str) -> Optional[dict]:
        p = self.path(kind, key)
        try:
            data = json.loads(p.read_text())
        except (OSError, ValueError):
            self.misses += 1
            return None
        self.hits += 1
        return data

    def put(self, kind: str, key: str, value: dict) -> None:
        atomic_write_text(self.path(kind, key), json.dumps(value, indent=1) + "\n")


# ----------------------------------------------------------------------------- measuring
def protocols_for(spec: ModelSpec) -> Dict[str, dict]:
    """``{"default": settings, "release": settings}`` (bicubic: default only). Where the
    release's settings are the default ones (RFDN: whole image, Wang SSIM) both rows share
    one cache entry, so the model is evaluated once."""
    out = {"default": dict(DEFAULT_PROTOCOL)}
    if spec.is_network:
        from ..engine.evaluate import release_protocol_for
        rel = release_protocol_for(spec.eval_model("cpu"))
        out["release"] = {k: rel[k] for k in ("tile", "tile_overlap", "chop", "ssim")}
    return out


def measure_scores(spec: ModelSpec, dataset: str, protocol: str, settings: dict, data_root: Path,
                   cache: Cache, device: str, sr_root: Path) -> Tuple[dict, Optional[Path]]:
    """``evaluate`` of one model on one set under one protocol (cached); returns the result
    dict of ``distillsr eval --json`` and, for the default protocol, the folder holding its
    SR images (``<Set>/X<s>/<name>.png``)."""
    from ..engine import evaluate as ev
    key = cache_key(kind="scores", model=spec.identity, scale=spec.scale, dataset=dataset,
                    data=data_fingerprint(data_root, dataset, spec.scale), protocol=settings,
                    device=device, code=code_version())
    images = sr_root / key if protocol == "default" else None
    hit = cache.get("scores", key)
    if hit is not None and (images is None or (images / dataset).is_dir()):
        return hit, images
    if hit is not None:  # the SR images of the entry are gone: measure again
        cache.hits, cache.misses = cache.hits - 1, cache.misses + 1
    if images is not None and images.exists():
        shutil.rmtree(images)
    try:
        result = ev.evaluate(spec.eval_model(device), spec.scale, data_root, [dataset], tile=settings["tile"],
                             tile_overlap=settings["tile_overlap"], chop=settings["chop"],
                             ssim_variant=settings["ssim"], device=device, save_images=images, progress=False,
                             log=lambda m: None)
    except ev.EvalError as e:
        raise ReportError(f"{spec.label} x{spec.scale} on {dataset}: {e}") from None
    result["protocol"] = None if protocol == "default" else protocol
    cache.put("scores", key, result)
    return result, images


def measure_cost(spec: ModelSpec, cache: Cache, output: Tuple[int, int] = OUTPUT_720P) -> Optional[dict]:
    """Parameters and MACs (conv + linear; and the ASID paper's convention) for an output
    of ``output`` (cached); None for bicubic."""
    if not spec.is_network:
        return None
    from ..engine.profile import count_cost, input_size_for_output
    key = cache_key(kind="cost", model=spec.identity, scale=spec.scale, output=list(output), code=code_version())
    hit = cache.get("cost", key)
    if hit is not None:
        return hit
    w, h = input_size_for_output(*output, spec.scale)
    c = count_cost(spec.module(), (1, 3, h, w))
    value = {"params": c.params, "macs": c.macs, "macs_paper": c.macs_paper, "macs_total": c.macs_total,
             "output": list(output)}
    cache.put("cost", key, value)
    return value


def variant_cost(arch: str, scale: int, options: dict, cache: Cache,
                 output: Tuple[int, int] = OUTPUT_720P) -> dict:
    """Parameters and MACs of a registered architecture with ``options`` (random init; cached)."""
    from ..engine.profile import count_cost, input_size_for_output
    from ..registry import create_model
    key = cache_key(kind="variant", arch=arch, scale=scale, options=options, output=list(output),
                    code=code_version())
    hit = cache.get("cost", key)
    if hit is not None:
        return hit
    w, h = input_size_for_output(*output, scale)
    c = count_cost(create_model(arch, scale, **options), (1, 3, h, w))
    value = {"params": c.params, "macs": c.macs, "macs_paper": c.macs_paper, "output": list(output)}
    cache.put("cost", key, value)
    return value


_SGEMM: Dict[str, float] = {}


def measure_speed(spec: ModelSpec, cache: Cache, device: str, output: Tuple[int, int],
                  repeats: int) -> dict:
    """Latency (median of ``repeats``) and peak memory of the network for an output of
    ``output``, with the fp32 sgemm rate measured in the same run (cached with it)."""
    from ..engine.profile import measure_sgemm, profile_model
    key = cache_key(kind="speed", model=spec.identity, scale=spec.scale, output=list(output), device=device,
                    threads=torch.get_num_threads(), repeats=repeats, code=code_version())
    hit = cache.get("speed", key)
    if hit is not None:
        return hit
    if device not in _SGEMM:
        _SGEMM[device] = measure_sgemm(device, n=512 if repeats < 3 else 2048, repeats=3)
    r = profile_model(spec.module(), output, device=device, repeats=repeats, warmup=1)
    value = {"device": device, "threads": r.threads, "output": list(output), "latency_s": r.median_s,
             "peak_memory_bytes": r.peak_memory_bytes, "achieved_gflops_per_s": r.gflops_per_s,
             "sgemm_gflops_per_s": _SGEMM[device], "macs": r.cost.macs, "params": r.cost.params}
    cache.put("speed", key, value)
    return value


# ----------------------------------------------------------------------------- quick data
def quick_data(root: Path, datasets: Sequence[str], scales: Sequence[int], out: Path, per_set: int = 2) -> Path:
    """A small copy of the sets for ``--quick``: the ``per_set`` smallest HR images of each
    set (by pixels; ties by name) with their LR files. Returns its root."""
    from PIL import Image
    from ..data.benchmark import _list_images, lr_path
    for ds in datasets:
        hr_dir = Path(root) / ds / "HR"
        if not hr_dir.is_dir():
            raise ReportError(f"{hr_dir}: no such folder (expected <data>/{ds}/HR/*.png)")
        sizes = []
        for p in _list_images(hr_dir):
            with Image.open(p) as im:
                sizes.append((im.size[0] * im.size[1], p.name, p))
        chosen = [p for _, _, p in sorted(sizes)[:per_set]]
        dst = out / ds
        if dst.exists():
            shutil.rmtree(dst)
        (dst / "HR").mkdir(parents=True)
        for p in chosen:
            shutil.copyfile(p, dst / "HR" / p.name)
            for s in scales:
                lr = lr_path(Path(root) / ds, p.stem, s)
                if lr.is_file():
                    target = lr_path(dst, p.stem, s)
                    target.parent.mkdir(parents=True, exist_ok=True)
                    shutil.copyfile(lr, target)
    return out
