"""Training checkpoints: weights as safetensors, everything else in a state file.

One checkpoint at iteration ``i`` in ``<run>/checkpoints/`` is
* ``iter_<i>.safetensors``      network weights (``distillsr.save_model``; ``load_model`` reads it)
* ``iter_<i>_ema.safetensors``  EMA weights, when EMA is on
* ``iter_<i>.state.pt``         optimizer, grad scaler, RNG states, iteration, best score,
                                and the sha256 of the weight files above.
Each file is written to a temp file, flushed to disk and renamed (with the user's umask,
through ``distillsr.io.atomic_write`` / ``save_model``); the state file
is written last, so a checkpoint exists only once all its parts do. A run killed
while writing leaves at most a temp file (removed on the next start) or weight
files without a state file (ignored); ``find_resumable`` picks the newest
checkpoint whose files are complete and match their recorded hashes.
"""
from __future__ import annotations

import os
import random
import re
import warnings
from pathlib import Path
from typing import Any, Dict, List, Optional, Tuple

import numpy as np
import torch

from ..checkpoint import save_model
from ..io import atomic_write, sha256_file

__all__ = ["CheckpointFiles", "write_checkpoint", "read_state", "find_resumable", "list_checkpoints",
           "prune_checkpoints", "capture_rng", "restore_rng", "sha256_file", "atomic_torch_save",
           "clean_temp_files", "StateError"]

STATE_FORMAT = "distillsr-train-state"
STATE_VERSION = 1
_STATE_RE = re.compile(r"^iter_(\d+)\.state\.pt$")
_TEMP_SUFFIXES = (".tmp", ".part")  # save_model's and atomic_write's temp files


class StateError(ValueError):
    """A training-state file that cannot be resumed from."""


def _fsync_dir(path: Path) -> None:
    try:
        fd = os.open(str(path), os.O_RDONLY)
    except OSError:  # pragma: no cover - e.g. Windows
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)


def atomic_torch_save(obj: Any, path: Path) -> None:
    """``torch.save`` to ``path`` through :func:`distillsr.io.atomic_write` (a temp file beside it,
    flushed to disk, then renamed; the file gets the user's umask like every file we write)."""
    path = Path(path)

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())

    atomic_write(path, write)
    _fsync_dir(path.parent)


def _fsync_file(path: Path) -> None:
    with open(path, "rb") as f:
        os.fsync(f.fileno())


# ----------------------------------------------------------------------------- RNG

def capture_rng() -> Dict[str, Any]:
    """RNG states of python, numpy (legacy global) and torch, as tensors / plain values."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    out = {
        "python": random.getstate(),
        "numpy": {"kind": kind, "keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        out["cuda"] = torch.cuda.get_rng_state_all()
    return out


def restore_rng(state: Dict[str, Any]) -> None:
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    n = state["numpy"]
    np.random.set_state((n["kind"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"],
                         n["cached_gaussian"]))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        cuda = state["cuda"]
        if len(cuda) == torch.cuda.device_count():
            torch.cuda.set_rng_state_all(cuda)


# ----------------------------------------------------------------------------- files

class CheckpointFiles:
    def __init__(self, ckpt_dir: Path, iteration: int):
        self.dir = Path(ckpt_dir)
        self.iteration = int(iteration)
        stem = f"iter_{self.iteration:08d}"
        self.model = self.dir / f"{stem}.safetensors"
        self.ema = self.dir / f"{stem}_ema.safetensors"
        self.state = self.dir / f"{stem}.state.pt"

    def all(self) -> List[Path]:
        return [self.model, self.ema, self.state]


def write_checkpoint(ckpt_dir: Path, iteration: int, model: torch.nn.Module, ema: Optional[torch.nn.Module],
                     state: Dict[str, Any], metadata: Optional[Dict[str, str]] = None) -> CheckpointFiles:
    """Write weights (+ EMA), then the state file that commits the checkpoint."""
    files = CheckpointFiles(ckpt_dir, iteration)
    files.dir.mkdir(parents=True, exist_ok=True)
    meta = {"distillsr.iteration": str(iteration), **(metadata or {})}
    save_model(model, files.model, metadata=meta)
    _fsync_file(files.model)
    hashes = {"model": sha256_file(files.model)}
    if ema is not None:
        save_model(ema, files.ema, metadata={**meta, "distillsr.ema": "true"})
        _fsync_file(files.ema)
        hashes["ema"] = sha256_file(files.ema)
    elif files.ema.exists():
        files.ema.unlink()
    full = {"format": STATE_FORMAT, "version": STATE_VERSION, "iteration": int(iteration),
            "files": {"model": files.model.name, **({"ema": files.ema.name} if ema is not None else {})},
            "sha256": hashes, **state}
    atomic_torch_save(full, files.state)
    return files


def read_state(path) -> Dict[str, Any]:
    """Load a state file and check that the weight files it names are complete."""
    path = Path(path)
    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True)
    except Exception as e:
        raise StateError(f"{path}: unreadable training state ({str(e).splitlines()[0] if str(e) else e})") from e
    if not isinstance(state, dict) or state.get("format") != STATE_FORMAT:
        raise StateError(f"{path}: not a distillsr training-state file")
    if state.get("version", 0) > STATE_VERSION:
        raise StateError(f"{path}: written by a newer distillsr (state version {state['version']})")
    for role, name in state["files"].items():
        f = path.parent / name
        if not f.is_file():
            raise StateError(f"{path}: its {role} weights {f.name} are missing")
        if sha256_file(f) != state["sha256"][role]:
            raise StateError(f"{path}: its {role} weights {f.name} do not match the recorded sha256 "
                             f"(changed or truncated)")
    state["paths"] = {role: path.parent / name for role, name in state["files"].items()}
    state["state_path"] = path
    return state


def list_checkpoints(ckpt_dir) -> List[Tuple[int, Path]]:
    """(iteration, state file) of the checkpoints in a folder, oldest first."""
    ckpt_dir = Path(ckpt_dir)
    if not ckpt_dir.is_dir():
        return []
    out = []
    for p in ckpt_dir.iterdir():
        m = _STATE_RE.match(p.name)
        if m:
            out.append((int(m.group(1)), p))
    return sorted(out)


def find_resumable(ckpt_dir, log=print) -> Optional[Dict[str, Any]]:
    """The newest checkpoint that reads back completely, or None; broken ones are reported and skipped."""
    for it, path in reversed(list_checkpoints(ckpt_dir)):
        try:
            return read_state(path)
        except StateError as e:
            log(f"resume: skipping checkpoint at iteration {it}: {e}")
    return None


def prune_checkpoints(ckpt_dir, keep: int, protect: Tuple[int, ...] = ()) -> None:
    """Delete all but the newest ``keep`` checkpoints (``keep`` 0: keep all)."""
    if keep <= 0:
        return
    ckpts = list_checkpoints(ckpt_dir)
    for it, state_path in ckpts[:-keep]:
        if it in protect:
            continue
        files = CheckpointFiles(Path(ckpt_dir), it)
        # the state file goes first: without it, the rest is no checkpoint
        for p in (files.state, files.model, files.ema):
            try:
                p.unlink()
            except FileNotFoundError:
                pass


def clean_temp_files(ckpt_dir) -> int:
    """Remove temp files left by a run killed while writing; returns how many."""
    ckpt_dir = Path(ckpt_dir)
    n = 0
    if ckpt_dir.is_dir():
        for p in ckpt_dir.iterdir():
            if p.name.startswith(".") and p.name.endswith(_TEMP_SUFFIXES):
                try:
                    p.unlink()
                    n += 1
                except OSError as e:  # pragma: no cover
                    warnings.warn(f"could not remove {p}: {e}")
    return n
