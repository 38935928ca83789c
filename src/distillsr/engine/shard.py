"""Collections of images and videos, in one process or many: :func:`upscale_collection`
gathers the inputs once (images and videos, ``distillsr.io``'s tables), keeps this process's
share, and runs images through ``engine.batch`` and videos through ``engine.video``.

Under ``torchrun`` (which sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``,
``LOCAL_WORLD_SIZE``) each process takes the inputs whose output name hashes to its rank
(:func:`owner`): the share depends on the file's relative output path only, so every process
agrees on it without talking, and two inputs that could map to one output always fall to the
same process. Each process uses its own GPU (``cuda:LOCAL_RANK``) or its part of the CPU
cores (:func:`rank_device`, :func:`split_cpu_threads`); at the end the reports are gathered on
every process over ``torch.distributed`` (gloo), and rank 0 prints the merged summary.
A rerun skips finished outputs through the output folder's record (``engine.records``),
which all processes share under a file lock.
"""
from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Tuple, Union

import torch

from .. import io as imgio
from .batch import BatchReport, upscale_files
from .inputs import OwnOutputs, check_output_dir, check_suffix, collect_inputs
from .records import OutputRecord
from .upscaler import Upscaler

__all__ = ["Ranks", "owner", "shard_key", "rank_device", "split_cpu_threads", "upscale_collection",
           "start_group", "stop_group", "gather_reports", "report_to_dict", "GROUP_TIMEOUT"]

PathArg = Union[str, os.PathLike]

# how long a process that finished waits for the others at the end (a collection of videos
# can keep one process busy for days longer than another)
GROUP_TIMEOUT = timedelta(days=7)


@dataclass(frozen=True)
class Ranks:
    """Which process this is among how many (torchrun's environment; one process by default)."""
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    local_world: int = 1

    @classmethod
    def from_env(cls, env: Optional[Mapping[str, str]] = None) -> "Ranks":
        env = os.environ if env is None else env

        def get(name: str, default: int) -> int:
            value = env.get(name)
            if value is None or value == "":
                return default
            try:
                return int(value)
            except ValueError:
                raise ValueError(f"environment variable {name}={value!r} is not a number") from None
        world = get("WORLD_SIZE", 1)
        rank = get("RANK", 0)
        local_rank = get("LOCAL_RANK", rank)
        local_world = get("LOCAL_WORLD_SIZE", world)
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"RANK={rank} with WORLD_SIZE={world}: need 0 <= RANK < WORLD_SIZE")
        if local_world < 1 or not 0 <= local_rank < local_world:
            raise ValueError(f"LOCAL_RANK={local_rank} with LOCAL_WORLD_SIZE={local_world}: need "
                             "0 <= LOCAL_RANK < LOCAL_WORLD_SIZE")
        return cls(rank, world, local_rank, local_world)

    @property
    def distributed(self) -> bool:
        return self.world > 1


def shard_key(rel: Path) -> str:
    """What decides an input's process: its relative path without the extension (inputs that
    can share an output, ``a.png`` and ``a.jpg`` with ``--format``, share the key)."""
    return (Path(rel).parent / Path(rel).stem).as_posix()


def owner(key: str, world: int) -> int:
    """The rank that does the input with this key (a hash: the same on every machine)."""
    return int.from_bytes(hashlib.sha256(key.encode("utf-8")).digest()[:8], "big") % world


def rank_device(device: str, ranks: Ranks) -> str:
    """The device of this process: with several processes, ``auto`` and ``cuda`` become
    ``cuda:LOCAL_RANK`` (one GPU each) when torch sees GPUs; others are used as given."""
    if not ranks.distributed or device not in ("auto", "cuda") or not torch.cuda.is_available():
        return device
    count = torch.cuda.device_count()
    if ranks.local_rank >= count:
        raise ValueError(f"LOCAL_RANK {ranks.local_rank} has no GPU of its own (this machine has {count}); "
                         f"start at most {count} processes per node, or use --device cpu")
    return f"cuda:{ranks.local_rank}"


def split_cpu_threads(ranks: Ranks) -> int:
    """Share this machine's cores between the processes on it; returns the threads taken."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not on Linux
        cores = os.cpu_count() or 1
    threads = max(1, cores // ranks.local_world)
    torch.set_num_threads(threads)
    return threads


def start_group(ranks: Ranks) -> None:
    """Join the process group (gloo, CPU) for the final gathering of reports."""
    import torch.distributed as dist
    if ranks.distributed and not dist.is_initialized():
        dist.init_process_group("gloo", rank=ranks.rank, world_size=ranks.world, timeout=GROUP_TIMEOUT)


def stop_group() -> None:
    """Leave the process group joined by :func:`start_group`, if any."""
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def report_to_dict(report: BatchReport, rank: int = 0) -> dict:
    """A report as plain data (the summary file's form; ``rank`` is recorded on each entry)."""
    return {"done": [{"input": str(a), "output": str(b), "rank": rank} for a, b in report.done],
            "skipped": [{"input": str(a), "output": str(b), "rank": rank, "why": report.skip_reasons.get(b, "")}
                        for a, b in report.skipped],
            "failed": [{"input": a, "message": m, "rank": rank} for a, m in report.failed],
            "skip_kinds": dict(report._skip_kinds), "seconds": report.seconds}


def _merge(parts: List[dict]) -> Tuple[BatchReport, dict]:
    merged = BatchReport()
    summary = {"processes": len(parts), "done": [], "skipped": [], "failed": [], "seconds": 0.0}
    for part in parts:
        for key in ("done", "skipped", "failed"):
            summary[key] += part[key]
        summary["seconds"] = max(summary["seconds"], part["seconds"])
        merged.done += [(Path(e["input"]), Path(e["output"])) for e in part["done"]]
        merged.skipped += [(Path(e["input"]), Path(e["output"])) for e in part["skipped"]]
        merged.failed += [(e["input"], e["message"]) for e in part["failed"]]
        merged._skip_kinds.update(part["skip_kinds"])
    merged.seconds = summary["seconds"]
    summary["ok"] = merged.ok
    return merged, summary


def gather_reports(report: BatchReport, ranks: Ranks) -> Tuple[BatchReport, dict]:
    """Every process's report merged (a collective call: all processes make it), and the
    summary as plain data (``processes``, ``ok``, ``done`` / ``skipped`` / ``failed`` with the
    rank of each entry, ``seconds`` of the slowest process)."""
    part = report_to_dict(report, ranks.rank)
    if not ranks.distributed:
        return _merge([part])
    import torch.distributed as dist
    parts: List[Optional[dict]] = [None] * ranks.world
    dist.all_gather_object(parts, part)
    return _merge(parts)


def write_summary(path: PathArg, summary: dict) -> Path:
    """The summary as JSON, written atomically."""
    return imgio.atomic_write_text(path, json.dumps(summary, indent=1))


def upscale_collection(inputs: Iterable[PathArg], out_dir: PathArg, upscaler: Upscaler, *,
                       ranks: Ranks = Ranks(), video=None, format: Optional[str] = None, suffix: str = "",
                       overwrite: bool = False, recursive: bool = False, quality: int = 95,
                       max_pixels: Optional[int] = imgio.DEFAULT_MAX_PIXELS, progress: Optional[bool] = None,
                       log: Optional[Callable[[str], None]] = None) -> BatchReport:
    """Upscale the images and videos among files / folders / globs into ``out_dir`` (this
    process's share of them, by :func:`owner`), keeping relative paths. ``video``: the
    ``engine.video.VideoOptions`` (None: defaults). Inputs that match nothing are reported by
    rank 0 only. Returns this process's :class:`BatchReport`."""
    from .batch import _default_log
    from .video import is_video, upscale_videos
    start = time.perf_counter()
    out_dir = check_output_dir(out_dir)
    check_suffix(suffix)
    log = log or _default_log
    report = BatchReport()
    own = OwnOutputs(out_dir, suffix, OutputRecord(out_dir, log).outputs())
    items, problems = collect_inputs(inputs, recursive, own_outputs=own,
                                     extensions=imgio.INPUT_EXTENSIONS | set(imgio.VIDEO_EXTENSIONS))
    if ranks.rank == 0:
        report.left_out = own.left_out
        if own.left_out:
            log(f"note: left out {len(own.left_out)} file(s) under {out_dir} that are outputs of upscale")
        for item, msg in problems:
            report.failed.append((item, msg))
            log(f"error: {item}: {msg}")
    mine = [it for it in items if owner(shard_key(it[1]), ranks.world) == ranks.rank]
    videos = [it for it in mine if is_video(it[0])]
    images = [it for it in mine if not is_video(it[0])]
    if images:
        part = upscale_files([], out_dir, upscaler, format=format, suffix=suffix, overwrite=overwrite,
                             quality=quality, max_pixels=max_pixels, progress=progress, log=log, items=images)
        report.done += part.done
        report.skipped += part.skipped
        report.failed += part.failed
        report.skip_reasons.update(part.skip_reasons)
        report.redone.update(part.redone)
        report._skip_kinds.update(part._skip_kinds)
    if videos:
        upscale_videos(videos, out_dir, upscaler, report, video, suffix=suffix, overwrite=overwrite,
                       progress=progress, log=log)
    report.seconds = time.perf_counter() - start
    return report
