"""Ship a trained checkpoint as pretrained weights, with its measured scores (``distillsr ship``).

:func:`ship` evaluates the checkpoint on Set5, Set14 and B100 with ``distillsr eval``'s defaults
(whole image, Y channel, border = scale, Wang SSIM, grey replicate), then writes
``<name>_x<scale>.safetensors`` and its model card into a weights folder
(:func:`distillsr.pretrained.save_pretrained`): PSNR and SSIM per set in the card's ``scores``.

A card already there is brought up to date rather than replaced: its training record and notes
are kept, the run's iterations and wall time are added to the totals, its command is appended to
``commands``, and a new data or hardware text replaces the old one (:class:`Run`).
``replace=True`` starts a new card from the run alone. ``only_if_better=True`` writes nothing
unless the mean PSNR over the sets beats the card already there.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Iterable, Optional, Sequence, Union

from ..pretrained import PACKAGE_WEIGHTS_DIR, PretrainedEntry, read_card, save_pretrained

__all__ = ["ShipError", "Run", "ShipResult", "DEFAULT_DATASETS", "mean_psnr", "update_training", "ship"]

DEFAULT_DATASETS = ("Set5", "Set14", "B100")
PathLike = Union[str, os.PathLike]


class ShipError(RuntimeError):
    """The checkpoint cannot be shipped as asked (no card to compare with, a card of another
    network, a release's name, ...)."""


@dataclass(frozen=True)
class Run:
    """What one training run adds to a card's training record; ``None`` adds nothing."""
    iterations: Optional[int] = None       # added to the card's total
    wall_time_h: Optional[float] = None    # added to the card's total
    command: Optional[str] = None          # appended to the card's commands
    data: Optional[str] = None             # replaces the card's training data
    hardware: Optional[str] = None         # replaces the card's hardware


@dataclass(frozen=True)
class ShipResult:
    shipped: bool
    result: dict                 # what distillsr.engine.evaluate.evaluate returned
    psnr: Dict[str, float]
    ssim: Dict[str, float]
    new_mean: float
    old_mean: Optional[float]    # the card's mean PSNR over the same sets, with only_if_better
    entry: Optional[PretrainedEntry] = None  # the card written, when shipped

    @property
    def verdict(self) -> str:
        if self.old_mean is None:
            return f"mean PSNR {self.new_mean:.4f} dB"
        return (f"mean PSNR {self.new_mean:.4f} dB vs {self.old_mean:.4f} dB shipped "
                f"({self.new_mean - self.old_mean:+.4f})")


def mean_psnr(psnr: Dict[str, float], datasets: Iterable[str]) -> float:
    """Mean PSNR over ``datasets``; a card that lacks one of them cannot be compared (KeyError)."""
    datasets = list(datasets)
    missing = [d for d in datasets if d not in psnr]
    if missing:
        raise KeyError(f"no PSNR for {', '.join(missing)}")
    return sum(psnr[d] for d in datasets) / len(datasets)


def update_training(old: Optional[Dict[str, object]], run: Run,
                    log: Callable[[str], None] = print) -> Dict[str, object]:
    """The training record after ``run``: ``old`` (None: a new card) with the run's totals added,
    its command appended, and its data and hardware in place of the old ones.

    A total the old record lacks stays unknown (the run's share alone would understate it).
    """
    record = dict(old or {})
    for key in ("data", "hardware"):
        if getattr(run, key) is not None:
            record[key] = getattr(run, key)
    for key in ("iterations", "wall_time_h"):
        value = getattr(run, key)
        if value is None:
            continue
        if old is None:
            record[key] = value
        elif record.get(key) is not None:
            record[key] = record[key] + value
        else:
            log(f"the card records no {key}, so the total stays unknown (this run: {value})")
            continue
        if key == "wall_time_h":
            record[key] = round(float(record[key]), 2)
    if run.command:
        record["commands"] = list(record.get("commands") or []) + [run.command]
    return record


def _protocol(device: str) -> str:
    where = "CPU" if device == "cpu" else device
    return (f"Y channel, border = scale, whole image, fp32 {where}, SSIM wang, grey replicate "
            f"(distillsr eval defaults)")


def ship(checkpoint: PathLike, name: str, data_root: PathLike, *, to: PathLike = PACKAGE_WEIGHTS_DIR,
         datasets: Sequence[str] = DEFAULT_DATASETS, only_if_better: bool = False, replace: bool = False,
         run: Run = Run(), notes: Optional[str] = None, device: Optional[str] = None,
         json_path: Optional[PathLike] = None, log: Callable[[str], None] = print) -> ShipResult:
    """Evaluate ``checkpoint`` and write it, with its card, as ``name`` into the folder ``to``.

    ``notes``: the card's notes (default: the existing card's, or none). Raises
    :class:`ShipError` when asked to compare with a card that is not there or lacks a set, when
    the card there is of another architecture (unless ``replace``), or when ``name`` is a name of
    the release table. Returns whether it shipped, the scores and the card written.
    """
    from ..checkpoint import load_model
    from ..releases import find_release
    from .evaluate import evaluate, format_table, write_json

    datasets = list(datasets)
    if not datasets:
        raise ShipError("no benchmark sets to evaluate on")
    if find_release(name) is not None:
        raise ShipError(f"{name!r} names authors' weights of the release table; ship under another name")
    model = load_model(checkpoint)
    folder = Path(to)
    card_path = folder / f"{name.lower()}_x{model.scale}.json"
    old = read_card(card_path) if card_path.is_file() else None
    if old is not None and old.arch != model.arch_name and not replace:
        raise ShipError(f"{card_path} is a card of {old.arch}, but {checkpoint} holds {model.arch_name}; "
                        f"replace=True (--replace) starts a new card")
    old_mean = None
    if only_if_better:
        if old is None:
            raise ShipError(f"no card {card_path.name} in {folder} to compare with")
        try:
            old_mean = mean_psnr(old.psnr, datasets)
        except KeyError as e:
            raise ShipError(f"{card_path} cannot be compared: {e.args[0]}") from None

    result = evaluate(model, model.scale, data_root, datasets, device=device, progress=False,
                      weights=str(checkpoint))
    log(format_table(result))
    if json_path is not None:
        write_json(result, json_path)
    psnr = {r["dataset"]: round(r["psnr"], 4) for r in result["results"]}
    ssim = {r["dataset"]: round(r["ssim"], 5) for r in result["results"]}
    new_mean = mean_psnr(psnr, datasets)
    if old_mean is not None and new_mean <= old_mean:
        return ShipResult(False, result, psnr, ssim, new_mean, old_mean)

    keep = old is not None and not replace
    training = update_training(old.training if keep else None, run, log)
    if notes is None:
        notes = old.notes if keep else ""
    entry = save_pretrained(model, name, folder, psnr=psnr, ssim=ssim, psnr_protocol=_protocol(result["device"]),
                            notes=notes, training=training)
    return ShipResult(True, result, psnr, ssim, new_mean, old_mean, entry)
