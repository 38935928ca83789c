"""The training loop: one process on a CPU up to many GPUs on many nodes (torchrun + DDP).

``train(cfg, resume=None)`` runs a :class:`~distillsr.engine.config.Config`.
Outputs in ``<out_dir>/<name>/``:

* ``config.yaml``  the resolved configuration;
* ``log.csv``      iteration, epoch, learning rate, mean loss, it/s, elapsed seconds (of the whole
                   run: a resumed run goes on from the time its checkpoint recorded), validation scores;
* ``tb/``          TensorBoard events (when tensorboard is installed);
* ``checkpoints/`` periodic checkpoints (see :mod:`distillsr.engine.state`);
* ``best.safetensors``   the weights with the best validation PSNR so far;
* ``model.safetensors``  the final weights (the EMA weights when EMA is on).

Resuming (``resume="auto"`` or a path) continues exactly: on CPU an interrupted
and resumed run ends with bitwise the same weights as an uninterrupted one.
A checkpoint of another network (another architecture or scale, or options its
weights do not fit) is refused, saying what differs. SIGINT / SIGTERM stop the run at the end of the current
iteration and write a checkpoint (a second SIGINT stops at once). Every file is
written through :func:`distillsr.io.atomic_write` (or ``save_model``): complete
or absent, with the user's umask.
"""
from __future__ import annotations

import copy
import csv
import errno
import math
import os
import signal
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Union

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from ..checkpoint import CheckpointError, metadata_pixel_range, read_state_dict, recognise, save_model
from ..io import FileWriteError, atomic_write, place_error, remove_stale_temp_files, try_file_lock
from ..registry import create_model
from .config import Config, ConfigError, check_data_paths, config_to_dict, dump_config
from . import state as st

__all__ = ["train", "Trainer", "TrainResult", "lr_at", "ModelEMA", "init_from_checkpoint", "setup_distributed",
           "DistInfo", "TrainError"]


class TrainError(RuntimeError):
    """A run that cannot start or go on (the message says why)."""


# ----------------------------------------------------------------------------- schedule

def milestone_iters(cfg: Config) -> List[int]:
    total = cfg.train.iters
    return sorted(int(round(m * total)) if m < 1 else int(m) for m in cfg.sched.milestones)


def lr_at(cfg: Config, it: int) -> float:
    """Learning rate for (0-based) iteration ``it``: a pure function, so nothing to save for resuming."""
    base = cfg.optim.lr
    s = cfg.sched
    warm = s.warmup_iters
    if warm and it < warm:
        factor_w = (it + 1) / warm
    else:
        factor_w = 1.0
    if s.name == "constant":
        lr = base
    elif s.name == "step":
        lr = base * s.gamma ** sum(1 for m in milestone_iters(cfg) if it >= m)
    else:  # cosine over the iterations after warm-up
        span = max(1, cfg.train.iters - warm)
        t = min(max(it - warm, 0), span) / span
        lr = s.min_lr + (base - s.min_lr) * 0.5 * (1 + math.cos(math.pi * t))
    return lr * factor_w


# ----------------------------------------------------------------------------- EMA

class ModelEMA:
    """Exponential moving average of the weights: ``ema = d * ema + (1 - d) * w`` after each step.

    The decay is ``min(decay, (1 + n) / (10 + n))`` at update ``n`` so that the
    average is not dominated by the random initialisation early in training.
    """

    def __init__(self, model: nn.Module, decay: float):
        self.module = copy.deepcopy(model).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.decay = float(decay)

    @torch.no_grad()
    def update(self, model: nn.Module, num_updates: int) -> None:
        d = min(self.decay, (1 + num_updates) / (10 + num_updates))
        for e, p in zip(self.module.parameters(), model.parameters()):
            e.lerp_(p.detach(), 1.0 - d)
        for e, b in zip(self.module.buffers(), model.buffers()):
            e.copy_(b)


# ----------------------------------------------------------------------------- init from a checkpoint

def init_from_checkpoint(model: nn.Module, path: Union[str, Path], strict: bool = True,
                         log: Callable[[str], None] = print) -> Dict[str, List[str]]:
    """Load weights from ``path`` (ours or any format ``load_model`` recognises) into ``model``.

    With ``strict=False`` every tensor whose name and shape match is loaded and
    the others are reported (e.g. the upsampler when starting x3/x4 from x2).
    Returns ``{"loaded": [...], "shape_mismatch": [...], "missing": [...], "unexpected": [...]}``.
    """
    path = Path(path)
    sd, meta = read_state_dict(path)
    pixel_range = None
    if "distillsr.arch" not in meta:
        try:
            rec = recognise(sd, path)
            sd, pixel_range = rec.state_dict, tuple(rec.pixel_range)
            log(f"init: {path.name} recognised as {rec.source or rec.arch} x{rec.scale}")
        except CheckpointError:
            pass  # plain state dict: match by name
    else:
        pixel_range = metadata_pixel_range(meta)
    own = model.state_dict()
    report = {"loaded": [], "shape_mismatch": [], "missing": [], "unexpected": []}
    new_sd = {}
    for k, v in own.items():
        if k not in sd:
            report["missing"].append(k)
        elif tuple(sd[k].shape) != tuple(v.shape):
            report["shape_mismatch"].append(f"{k} {tuple(sd[k].shape)} -> {tuple(v.shape)}")
        else:
            new_sd[k] = sd[k].to(v.dtype)
            report["loaded"].append(k)
    report["unexpected"] = [k for k in sd if k not in own]
    skipped = report["shape_mismatch"] + report["missing"] + report["unexpected"]
    if strict and skipped:
        raise TrainError(f"init_from {path}: does not fit the network exactly ({len(report['missing'])} missing, "
                         f"{len(report['shape_mismatch'])} of another shape, {len(report['unexpected'])} unexpected; "
                         f"first: {skipped[0]}); set init_strict: false to load only the matching tensors")
    if not report["loaded"]:
        raise TrainError(f"init_from {path}: no tensor matches the network by name and shape")
    model.load_state_dict(new_sd, strict=False)
    if pixel_range is not None and hasattr(model, "set_pixel_range") and \
            tuple(getattr(model, "pixel_range", (0.0, 1.0))) != pixel_range:
        model.set_pixel_range(*pixel_range)
        log(f"init: using the checkpoint's pixel range {pixel_range}")
    log(f"init: loaded {len(report['loaded'])} tensors from {path}")
    for kind in ("shape_mismatch", "missing", "unexpected"):
        if report[kind]:
            log(f"init: skipped ({kind.replace('_', ' ')}): {', '.join(report[kind])}")
    return report


# ----------------------------------------------------------------------------- distributed

@dataclass
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    initialized_here: bool = False

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world_size > 1


def _pick_device(pref: str, local_rank: int) -> torch.device:
    if pref == "auto":
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(pref)
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise TrainError(f"train.device {pref!r}: CUDA is not available here")
        if dev.index is None:
            dev = torch.device(f"cuda:{local_rank}")
    return dev


def setup_distributed(device_pref: str = "auto") -> DistInfo:
    """Read torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT); start the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    device = _pick_device(device_pref, local)
    info = DistInfo(rank, world, local, device)
    if world > 1:
        if device.type == "cuda":
            torch.cuda.set_device(device)
        if not dist.is_initialized():
            backend = "nccl" if device.type == "cuda" else "gloo"
            dist.init_process_group(backend=backend)
            info.initialized_here = True
    return info


# ----------------------------------------------------------------------------- logging

class _CsvLog:
    FIELDS = ["iter", "epoch", "lr", "loss", "it_per_s", "elapsed_s", "val_psnr", "val_ssim"]

    def __init__(self, path: Path, start_iter: int):
        self.path = path
        rows = []
        if path.exists() and start_iter > 0:  # keep what the resumed run had done, drop the rest
            with open(path, newline="") as f:
                rows = [r for r in csv.DictReader(f) if r.get("iter", "").isdigit() and int(r["iter"]) <= start_iter]
        self.last_elapsed = None  # elapsed_s of the last row kept
        for r in rows:
            try:
                self.last_elapsed = float(r.get("elapsed_s") or "")
            except ValueError:
                pass

        def write(tmp: str) -> None:
            with open(tmp, "w", newline="") as f:
                w = csv.DictWriter(f, fieldnames=self.FIELDS)
                w.writeheader()
                for r in rows:
                    w.writerow({k: r.get(k, "") for k in self.FIELDS})

        atomic_write(path, write)

    def write(self, **row) -> None:
        try:
            with open(self.path, "a", newline="") as f:
                csv.DictWriter(f, fieldnames=self.FIELDS).writerow({k: row.get(k, "") for k in self.FIELDS})
        except OSError as e:
            code = place_error(e, self.path.parent)
            if code is None:
                raise
            raise FileWriteError(self.path, code, outcome="the rows written before are kept") from e


def _tensorboard(path: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # tensorboard not installed
        return None
    return SummaryWriter(str(path))


def _fmt_time(s: float) -> str:
    s = int(max(0, s))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _model_mismatch(meta: Dict[str, str], cfg_model) -> List[str]:
    """How the network a checkpoint's weights were saved from differs from the config's model
    section, as 'checkpoint has X, config has Y' phrases (empty when the metadata does not say)."""
    import json
    out = []
    arch, scale = meta.get("distillsr.arch"), meta.get("distillsr.scale")
    if arch is not None and arch.lower() != cfg_model.arch.lower():
        out.append(f"checkpoint has arch={arch}, config has arch={cfg_model.arch}")
    if scale is not None and int(scale) != cfg_model.scale:
        out.append(f"checkpoint has scale={scale}, config has scale={cfg_model.scale}")
    try:
        opts = json.loads(meta["distillsr.options"]) if "distillsr.options" in meta else None
    except ValueError:
        opts = None
    if isinstance(opts, dict):
        new = cfg_model.options
        for k in sorted(set(opts) | set(new)):
            if k in opts and k in new and opts[k] == new[k]:
                continue
            a = f"{k}={opts[k]}" if k in opts else f"no {k} (the default)"
            b = f"{k}={new[k]}" if k in new else f"no {k} (the default)"
            out.append(f"checkpoint has {a}, config has {b}")
    return out


@dataclass
class _Progress:
    """What the loop carries from one iteration to the next."""
    done: int                   # iterations completed
    last_ckpt: int              # iteration of the last checkpoint written
    elapsed_before: float       # seconds of training before this process took over (resume)
    t_start: float              # time.time() at the start of this process's loop
    win_loss: torch.Tensor      # sum of the losses since the last log row (on the device: no sync)
    bad: torch.Tensor           # a loss was NaN / inf since the last check
    win_n: int = 0              # iterations in that sum
    t_win: float = 0.0          # time and iteration of the last log row
    it_win0: int = 0

    def elapsed(self, now: Optional[float] = None) -> float:
        """Training seconds of the whole run so far, the time before a resume included."""
        return self.elapsed_before + (time.time() if now is None else now) - self.t_start


@dataclass
class _Outputs:
    """Where a run reports: the CSV log, TensorBoard, a progress bar (main process only)."""
    csv: Optional[_CsvLog] = None
    tb: Any = None
    bar: Any = None
    mode: str = "none"

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()


# ----------------------------------------------------------------------------- trainer

@dataclass
class TrainResult:
    run_dir: Path
    iteration: int
    completed: bool
    last_loss: float = float("nan")
    best_psnr: Optional[float] = None
    best_iter: Optional[int] = None
    final_weights: Optional[Path] = None
    history: List[Dict[str, float]] = field(default_factory=list)
    start_iter: int = 0          # the iteration this call started from (> 0 after a resume)
    elapsed_s: float = 0.0       # training seconds of the whole run, resumed parts included


class Trainer:
    """Builds everything a run needs from a config and runs it (see :func:`train`)."""

    def __init__(self, cfg: Config, resume: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
                 callbacks: Optional[List[Callable[["Trainer", int], None]]] = None):
        self.cfg = cfg
        check_data_paths(cfg)
        self.dist = setup_distributed(cfg.train.device)
        self._log = log or print
        self.callbacks = list(callbacks or [])
        self._stop_requested = False
        name = cfg.name or f"{cfg.model.arch}_x{cfg.model.scale}"
        self.run_dir = Path(cfg.out_dir) / name
        self.ckpt_dir = self.run_dir / "checkpoints"
        if cfg.train.threads:
            torch.set_num_threads(cfg.train.threads)
        self._run_lock = self._lock_run_dir()
        try:
            self.resume_state = self._resolve_resume(resume)
            self._build()
        except BaseException:
            self._release_run_lock()
            for d in self._made_dirs:  # deepest first; only while still empty
                try:
                    d.rmdir()
                except OSError:
                    break
            raise

    # -- small helpers
    def log(self, msg: str) -> None:
        if self.dist.is_main:
            self._log(msg)

    def request_stop(self) -> None:
        """Stop at the end of the current iteration and write a checkpoint."""
        self._stop_requested = True

    def _barrier(self) -> None:
        if self.dist.enabled:
            dist.barrier()

    def _lock_run_dir(self):
        """One training per run folder: the main process holds a lock on it for the run's life
        (dropped when the process ends, however it ends)."""
        self._made_dirs = []  # folders made here, removed again if the run cannot start
        if not self.dist.is_main:
            return None
        p = self.run_dir.absolute()
        while not p.exists() and p != p.parent:
            self._made_dirs.append(p)
            p = p.parent
        try:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            if not os.access(self.run_dir, os.W_OK | os.X_OK):
                raise OSError(errno.EACCES, "read-only file system" if os.statvfs(self.run_dir).f_flag & os.ST_RDONLY
                              else "no write permission")
            lock = try_file_lock(self.run_dir)
        except OSError as e:
            raise TrainError(f"run folder {self.run_dir} cannot be written ({(e.strerror or str(e)).lower()})") from e
        if lock is None:
            raise TrainError(f"run folder {self.run_dir} is in use by another training (it holds the folder's "
                             f"lock); wait for it to end, or choose another name (name=...) or out_dir")
        for p in remove_stale_temp_files(self.run_dir):  # model / config / log writes of a killed run
            self._log(f"removed {p.name}, the temp file of a run killed while writing")
        return lock

    def _release_run_lock(self) -> None:
        if getattr(self, "_run_lock", None) is not None:
            self._run_lock.release()
            self._run_lock = None

    def _resolve_resume(self, resume: Optional[str]):
        state = None
        if self.dist.is_main:
            if self.ckpt_dir.is_dir():
                n = st.clean_temp_files(self.ckpt_dir)
                if n:
                    self._log(f"removed {n} temp file(s) left by an interrupted checkpoint write")
            if resume in (None, "", "none"):
                if st.list_checkpoints(self.ckpt_dir):
                    raise TrainError(f"{self.run_dir} already holds checkpoints; continue it with --resume auto, "
                                     f"or choose another name (name=...) or out_dir")
            elif resume == "auto":
                state = st.find_resumable(self.ckpt_dir, log=self._log)
                if state is None:
                    self._log(f"resume auto: no checkpoint in {self.ckpt_dir}, starting from scratch")
            else:
                state = self._read_resume_path(Path(resume))
        if self.dist.enabled:  # every rank resumes from what rank 0 found
            box = [None if state is None else str(state["state_path"])]
            dist.broadcast_object_list(box, src=0)
            if not self.dist.is_main and box[0] is not None:
                state = st.read_state(box[0])
        return state

    def _read_resume_path(self, p: Path):
        if p.is_dir():
            d = p / "checkpoints" if (p / "checkpoints").is_dir() else p
            state = st.find_resumable(d, log=self._log)
            if state is None:
                raise TrainError(f"--resume {p}: no usable checkpoint there")
            return state
        if not p.is_file():
            raise TrainError(f"--resume {p}: no such file or folder")
        if p.suffix == ".safetensors":
            weights = p
            p = p.with_name(p.name.replace("_ema.safetensors", ".safetensors").replace(".safetensors", ".state.pt"))
            if not p.is_file():
                raise TrainError(f"--resume {weights}: no training state {p.name} next to it "
                                 f"(only checkpoints/iter_*.safetensors have one)")
        try:
            return st.read_state(p)
        except st.StateError as e:
            raise TrainError(str(e)) from e

    # -- construction, step by step
    def _build(self) -> None:
        self._check_setup()
        self._seed_everything()
        self._build_model()
        self._build_optimizer()
        self.start_iter, self.elapsed_before = 0, 0.0  # elapsed_before None: unknown, ask the CSV log
        self.best: Dict[str, Any] = {"psnr": None, "ssim": None, "iter": None}
        if self.resume_state is not None:
            self._restore_training_state()
        store = self._build_data()
        self._fit_init(store)
        self._load_validation()

    def _check_setup(self) -> None:
        cfg, dev = self.cfg, self.dist.device
        if cfg.data.batch_size % self.dist.world_size:
            raise TrainError(f"data.batch_size {cfg.data.batch_size} is not divisible by the "
                             f"{self.dist.world_size} processes")
        if cfg.train.amp == "fp16" and dev.type != "cuda":
            raise TrainError("train.amp fp16 needs a CUDA device; use bf16 on CPU")

    def _seed_everything(self) -> None:
        import random
        seed = self.cfg.seed
        torch.manual_seed(seed)
        np.random.seed(seed % 2 ** 32)
        random.seed(seed)

    def _create_network(self) -> nn.Module:
        m = self.cfg.model
        try:
            return create_model(m.arch, m.scale, **m.options)
        except (ValueError, TypeError) as e:  # an option's value the architecture refuses
            opts = ", ".join(f"{k}={v}" for k, v in m.options.items())
            raise ConfigError(f"model.options: {m.arch} x{m.scale} cannot be built with {opts or 'no options'}: "
                              f"{e}") from None

    def _build_model(self) -> None:
        """The network (from init_from or the resumed checkpoint's weights), its EMA, the DDP /
        compiled wrapper the loop runs."""
        cfg, dev = self.cfg, self.dist.device
        model = self._create_network()
        if cfg.init_from and self.resume_state is None:
            init_from_checkpoint(model, cfg.init_from, cfg.init_strict, log=self.log)
        if self.resume_state is not None:
            self._load_resumed_weights(model)
        mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        self.model = model.to(dev, memory_format=mf)
        self.ema = ModelEMA(self.model, cfg.train.ema_decay) if cfg.train.ema_decay > 0 else None
        if self.ema is not None and self.resume_state is not None and "ema" in self.resume_state["paths"]:
            sd, _ = read_state_dict(self.resume_state["paths"]["ema"])
            self.ema.module.load_state_dict(sd, strict=True)

        net: nn.Module = self.model
        if self.dist.enabled:
            net = nn.parallel.DistributedDataParallel(
                net, device_ids=[dev.index] if dev.type == "cuda" else None)
        if cfg.train.compile:
            net = torch.compile(net)
        self.net = net

    def _load_resumed_weights(self, model: nn.Module) -> None:
        """Load the checkpoint's weights; a checkpoint of another network is refused, saying how
        its network and the config's differ."""
        path = self.resume_state["paths"]["model"]
        sd, meta = read_state_dict(path)
        where = f"--resume {self.resume_state['state_path']}"
        differences = _model_mismatch(meta, self.cfg.model)
        arch_or_scale = [d for d in differences if d.startswith(("checkpoint has arch=", "checkpoint has scale="))]
        if arch_or_scale:
            raise ConfigError(f"{where}: the checkpoint is of another network: {'; '.join(differences)}")
        try:
            model.load_state_dict(sd, strict=True)
        except RuntimeError:
            if differences:
                raise ConfigError(f"{where}: the checkpoint is of another network: {'; '.join(differences)}") \
                    from None
            own = model.state_dict()
            missing = [k for k in own if k not in sd]
            unexpected = [k for k in sd if k not in own]
            shape = [f"{k} {tuple(sd[k].shape)} vs {tuple(v.shape)}" for k, v in own.items()
                     if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
            first = (missing + unexpected + shape + ["?"])[0]
            raise ConfigError(f"{where}: the checkpoint's weights do not fit the config's network "
                              f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shape)} of another "
                              f"shape; first: {first})") from None
        if "distillsr.pixel_range" in meta and hasattr(model, "set_pixel_range"):
            model.set_pixel_range(*metadata_pixel_range(meta))

    def _build_optimizer(self) -> None:
        cfg = self.cfg
        params = [p for p in self.model.parameters() if p.requires_grad]
        o = cfg.optim
        opt_cls = torch.optim.AdamW if o.name == "adamw" else torch.optim.Adam
        self.optimizer = opt_cls(params, lr=o.lr, betas=tuple(o.betas), eps=o.eps, weight_decay=o.weight_decay)
        self.scaler = torch.amp.GradScaler("cuda", enabled=cfg.train.amp == "fp16")

    def _restore_training_state(self) -> None:
        """Optimizer, grad scaler, iteration, best score, elapsed time and RNG states of the checkpoint."""
        s = self.resume_state
        self.optimizer.load_state_dict(s["optimizer"])
        if s.get("scaler"):
            self.scaler.load_state_dict(s["scaler"])
        self.start_iter = int(s["iteration"])
        self.elapsed_before = float(s["elapsed_s"]) if "elapsed_s" in s else None  # None: ask the CSV log
        self.best = dict(s.get("best", self.best))
        rngs = s["rng"]
        if len(rngs) != self.dist.world_size:
            self.log(f"resume: saved with {len(rngs)} processes, now {self.dist.world_size}; "
                     f"every process takes the RNG state of process 0")
            st.restore_rng(rngs[0])
        else:
            st.restore_rng(rngs[self.dist.rank])
        diff = _dict_diff(s.get("config", {}), config_to_dict(self.cfg))
        if diff:
            self.log("resume: config differs from the checkpoint's: " + "; ".join(diff))
        self.log(f"resuming from iteration {self.start_iter} ({s['paths']['model']})")

    def _build_data(self):
        from ..data.train_data import PairStore, PatchDataset, find_pairs
        cfg, d = self.cfg, self.cfg.data
        specs = find_pairs(d.kind, d.root, cfg.model.scale, d.lr_root, d.split, d.recursive)
        store = PairStore(specs, cfg.model.scale, cache=d.cache).prepare(d.patch_size, d.num_workers, log=self.log)
        if d.cache:
            self.log(f"data: {len(store)} images, {store.nbytes() / 2 ** 20:.0f} MiB in memory")
        self.dataset = PatchDataset(store, d.patch_size, cfg.seed, d.flip, d.rot90, d.repeat)
        return store

    def _fit_init(self, store) -> None:
        """init_linear / init_upsampler: least-squares fits on the training pairs (new runs only)."""
        cfg = self.cfg
        if self.resume_state is not None or not (cfg.init_linear or cfg.init_upsampler):
            return
        from .linear_init import fit_upsampler, linear_init_from_pairs
        pairs = (store.load(i) for i in range(len(store)))
        if cfg.init_linear:
            linear_init_from_pairs(self.model, pairs, cfg.model.scale, seed=cfg.seed)
            what = "linear path fitted by least squares on the training pairs"
        else:
            fit_upsampler(self.model, pairs, cfg.model.scale, seed=cfg.seed)
            what = "upsampler fitted by least squares on the body's features of the training pairs"
        if self.ema is not None:
            self.ema.module.load_state_dict(self.model.state_dict())
        self.log(f"init: {what}")

    def _load_validation(self) -> None:
        cfg = self.cfg
        self.val_pairs = None
        if cfg.val.dir and self.dist.is_main:
            from ..data.train_data import load_benchmark
            self.val_pairs = load_benchmark(cfg.val.dir, cfg.model.scale, cfg.val.max_images)
            self.log(f"validation: {len(self.val_pairs)} images from {cfg.val.dir}")

    # -- checkpoints
    def _save_checkpoint(self, done: int, elapsed: float) -> None:
        rngs = [st.capture_rng()]
        if self.dist.enabled:
            gathered = [None] * self.dist.world_size
            dist.all_gather_object(gathered, rngs[0])
            rngs = gathered
        if self.dist.is_main:
            state = {"optimizer": self.optimizer.state_dict(),
                     "scaler": self.scaler.state_dict() if self.scaler.is_enabled() else {},
                     "rng": rngs, "best": self.best, "world_size": self.dist.world_size,
                     "samples_seen": done * self.cfg.data.batch_size, "elapsed_s": float(elapsed),
                     "config": config_to_dict(self.cfg)}
            files = st.write_checkpoint(self.ckpt_dir, done, self.model,
                                        self.ema.module if self.ema else None, state)
            st.prune_checkpoints(self.ckpt_dir, self.cfg.train.keep_ckpts)
            self.log(f"checkpoint: {files.state}")
        self._barrier()

    def _weights_for_eval(self) -> nn.Module:
        return self.ema.module if (self.ema is not None and self.cfg.val.use_ema) else self.model

    def _validate(self, done: int) -> Optional[Dict[str, float]]:
        out = None
        if self.dist.is_main and self.val_pairs:
            from .validate import evaluate_pairs
            m = self._weights_for_eval()
            t = time.time()
            psnr, ssim, _ = evaluate_pairs(m, self.val_pairs, self.cfg.model.scale, self.dist.device,
                                           self.cfg.val.ssim, self.cfg.train.channels_last)
            out = {"psnr": psnr, "ssim": ssim}
            improved = self.best["psnr"] is None or psnr > self.best["psnr"]
            if improved:
                self.best = {"psnr": psnr, "ssim": ssim, "iter": done}
                save_model(m, self.run_dir / "best.safetensors",
                           metadata={"distillsr.iteration": str(done), "distillsr.val_psnr": f"{psnr:.4f}",
                                     "distillsr.val_ssim": f"{ssim:.5f}", "distillsr.val_set": self.cfg.val.dir})
            self.log(f"validation @ {done}: PSNR {psnr:.3f} dB  SSIM {ssim:.4f} ({self.cfg.val.ssim})"
                     f"{'  (best)' if improved else ''}  best {self.best['psnr']:.3f} @ {self.best['iter']}"
                     f"  [{time.time() - t:.1f}s]")
        self._barrier()
        return out

    # -- the loop
    def _install_signals(self):
        if threading.current_thread() is not threading.main_thread():
            return {}
        old = {}

        def handler(signum, frame):
            if self._stop_requested and signum == signal.SIGINT:
                raise KeyboardInterrupt
            self._stop_requested = True
            self.log(f"\n{signal.Signals(signum).name}: stopping after this iteration and writing a checkpoint "
                     f"(Ctrl-C again to stop at once)")

        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                old[sig] = signal.signal(sig, handler)
            except (ValueError, OSError):  # pragma: no cover
                pass
        return old

    def fit(self) -> TrainResult:
        """Train from ``start_iter`` to ``train.iters`` (or until asked to stop); see :func:`train`."""
        total = self.cfg.train.iters
        result = TrainResult(self.run_dir, self.start_iter, False, start_iter=self.start_iter)
        self._write_run_config()
        if self.start_iter >= total:
            return self._nothing_to_do(result)
        out = self._open_outputs()
        prog = self._start_progress(out)
        loader = self._make_loader()
        self.net.train()
        old_handlers = self._install_signals()
        try:
            for it, batch in zip(range(self.start_iter, total), loader):
                lr_now = self._train_step(it, batch, prog)
                if out.bar is not None:
                    out.bar.update(1)
                self._check_finite(prog)
                row = self._log_row(prog, lr_now, out, result)
                row = self._validation_row(prog.done, row, out)
                if row is not None and out.csv is not None:
                    out.csv.write(**row)
                for cb in self.callbacks:
                    cb(self, prog.done)
                stop = self._all_agree_to_stop()
                if prog.done % self.cfg.train.ckpt_every == 0 or prog.done == total or stop:
                    self._save_checkpoint(prog.done, prog.elapsed())
                    prog.last_ckpt = prog.done
                if stop:
                    break
        finally:
            out.close()
            for sig, h in old_handlers.items():
                signal.signal(sig, h)
            del loader
        return self._finish(result, prog)

    def _write_run_config(self) -> None:
        if self.dist.is_main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            text = dump_config(self.cfg)
            atomic_write(self.run_dir / "config.yaml", lambda tmp: Path(tmp).write_text(text))
        self._barrier()

    def _nothing_to_do(self, result: TrainResult) -> TrainResult:
        self.log(f"nothing to do: the checkpoint is at iteration {self.start_iter} >= "
                 f"train.iters {self.cfg.train.iters}")
        result.completed = True
        result.elapsed_s = self.elapsed_before or 0.0
        result.final_weights = self._write_final(self.start_iter)
        return result

    def _open_outputs(self) -> _Outputs:
        cfg = self.cfg
        out = _Outputs(mode=cfg.train.progress)
        if out.mode == "auto":
            import sys
            out.mode = "bar" if sys.stderr.isatty() else "log"
        if not self.dist.is_main:
            return out
        out.csv = _CsvLog(self.run_dir / "log.csv", self.start_iter)
        if cfg.train.tensorboard:
            out.tb = _tensorboard(self.run_dir / "tb")
        if out.mode == "bar":
            from tqdm import tqdm
            out.bar = tqdm(total=cfg.train.iters, initial=self.start_iter, unit="it", dynamic_ncols=True,
                           smoothing=0.05)
        return out

    def _start_progress(self, out: _Outputs) -> _Progress:
        before = self.elapsed_before
        if before is None:  # a checkpoint without the time: the CSV log's last kept row has it
            before = (out.csv.last_elapsed if out.csv is not None else None) or 0.0
        dev = self.dist.device
        now = time.time()
        return _Progress(done=self.start_iter, last_ckpt=self.start_iter, elapsed_before=before, t_start=now,
                         win_loss=torch.zeros((), dtype=torch.float64, device=dev),
                         bad=torch.zeros((), dtype=torch.bool, device=dev), t_win=now, it_win0=self.start_iter)

    def _make_loader(self):
        from ..data.train_data import build_train_loader
        cfg, dev = self.cfg, self.dist.device
        return build_train_loader(self.dataset, cfg.data.batch_size, self.start_iter, cfg.train.iters,
                                  self.dist.rank, self.dist.world_size, cfg.data.num_workers,
                                  pin_memory=dev.type == "cuda")

    def _train_step(self, it: int, batch, prog: _Progress) -> float:
        """One optimisation step on a (LR, HR) uint8 batch; returns the learning rate used."""
        cfg, dev = self.cfg, self.dist.device
        mf = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
        amp_dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(cfg.train.amp)
        lr_u8, hr_u8 = batch
        x = lr_u8.to(dev, non_blocking=True).float().div_(255).contiguous(memory_format=mf)
        y = hr_u8.to(dev, non_blocking=True).float().div_(255).contiguous(memory_format=mf)
        lr_now = lr_at(cfg, it)
        for g in self.optimizer.param_groups:
            g["lr"] = lr_now
        with torch.autocast(dev.type, dtype=amp_dtype, enabled=amp_dtype is not None):
            out = self.net(x)
        loss_fn = F.l1_loss if cfg.train.loss == "l1" else F.mse_loss
        loss = loss_fn(out.float(), y)
        prog.bad |= ~torch.isfinite(loss.detach())  # checked when logging / checkpointing (no sync here)
        self.optimizer.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        if cfg.optim.grad_clip > 0:
            self.scaler.unscale_(self.optimizer)
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.optim.grad_clip)
        self.scaler.step(self.optimizer)
        self.scaler.update()
        prog.done = it + 1
        if self.ema is not None:
            self.ema.update(self.model, prog.done)
        prog.win_loss += loss.detach().double()
        prog.win_n += 1
        return lr_now

    def _check_finite(self, prog: _Progress) -> None:
        """Stop before a log row or a checkpoint if a loss since the last check was NaN / inf."""
        done, t = prog.done, self.cfg.train
        at_ckpt = done % t.ckpt_every == 0 or done == t.iters or self._stop_requested
        if (at_ckpt or done % t.log_every == 0) and bool(prog.bad):
            raise TrainError(f"the loss became NaN or infinite between iterations {prog.last_ckpt} and {done}; "
                             f"the last checkpoint ({prog.last_ckpt}) in {self.ckpt_dir} is from before it: "
                             f"resume from it with a lower optim.lr or with optim.grad_clip")

    def _log_row(self, prog: _Progress, lr_now: float, out: _Outputs, result: TrainResult) -> Optional[dict]:
        """Every train.log_every iterations (and at the end): the mean loss of the window, as a CSV
        row, a log line or the progress bar's note, and TensorBoard scalars."""
        cfg, done, total = self.cfg, prog.done, self.cfg.train.iters
        if not (done % cfg.train.log_every == 0 or done == total):
            return None
        mean = prog.win_loss.clone()
        if self.dist.enabled:
            dist.all_reduce(mean)
            mean /= self.dist.world_size
        mean_loss = float(mean) / max(1, prog.win_n)
        now = time.time()
        ips = (done - prog.it_win0) / max(now - prog.t_win, 1e-9)
        row = {"iter": done, "epoch": f"{done * cfg.data.batch_size / self.dataset.epoch_length:.3f}",
               "lr": f"{lr_now:.4g}", "loss": f"{mean_loss:.6f}", "it_per_s": f"{ips:.3f}",
               "elapsed_s": f"{prog.elapsed(now):.1f}"}
        result.last_loss = mean_loss
        result.history.append({"iter": done, "loss": mean_loss})
        prog.win_loss.zero_()
        prog.win_n, prog.t_win, prog.it_win0 = 0, now, done
        if out.bar is not None:
            out.bar.set_postfix(loss=f"{mean_loss:.4f}", lr=f"{lr_now:.2e}", refresh=False)
        elif out.mode == "log":
            eta = (total - done) / max(ips, 1e-9)
            self.log(f"iter {done}/{total}  loss {mean_loss:.5f}  lr {lr_now:.3g}  {ips:.2f} it/s  "
                     f"ETA {_fmt_time(eta)}")
        if out.tb is not None:
            out.tb.add_scalar("train/loss", mean_loss, done)
            out.tb.add_scalar("train/lr", lr_now, done)
            out.tb.add_scalar("train/it_per_s", ips, done)
        return row

    def _validation_row(self, done: int, row: Optional[dict], out: _Outputs) -> Optional[dict]:
        """Validate every val.every iterations (and at the end); the scores join the CSV row."""
        cfg = self.cfg
        if not (cfg.val.dir and (done % cfg.val.every == 0 or done == cfg.train.iters)):
            return row
        scores = self._validate(done)
        if scores is None:
            return row
        row = row or {"iter": done}
        row.update(val_psnr=f"{scores['psnr']:.4f}", val_ssim=f"{scores['ssim']:.5f}")
        if out.tb is not None:
            out.tb.add_scalar("val/psnr", scores["psnr"], done)
            out.tb.add_scalar("val/ssim", scores["ssim"], done)
        return row

    def _all_agree_to_stop(self) -> bool:
        """A stop asked for in any process stops every process at the same iteration."""
        stop = self._stop_requested
        if self.dist.enabled:
            flag = torch.tensor([1.0 if stop else 0.0], device=self.dist.device)
            dist.all_reduce(flag)
            stop = bool(flag.item() > 0)
        return stop

    def _finish(self, result: TrainResult, prog: _Progress) -> TrainResult:
        done, start = prog.done, self.start_iter
        result.iteration = done
        result.elapsed_s = prog.elapsed()
        result.best_psnr, result.best_iter = self.best["psnr"], self.best["iter"]
        here = (f" (resumed at iteration {start}: {done - start} iterations, "
                f"{_fmt_time(time.time() - prog.t_start)} in this run)") if start else ""
        if done >= self.cfg.train.iters:
            result.completed = True
            result.final_weights = self._write_final(done)
            self.log(f"done: {done} iterations in {_fmt_time(result.elapsed_s)}{here}; "
                     f"weights {result.final_weights}")
        else:
            self.log(f"stopped at iteration {done} after {_fmt_time(result.elapsed_s)}{here} "
                     f"(checkpoint at {prog.last_ckpt}); continue with --resume auto")
        return result

    def _write_final(self, done: int) -> Path:
        path = self.run_dir / "model.safetensors"
        if self.dist.is_main:
            m = self.ema.module if self.ema is not None else self.model
            save_model(m, path, metadata={"distillsr.iteration": str(done),
                                          "distillsr.ema": str(self.ema is not None).lower()})
        self._barrier()
        return path

    def close(self) -> None:
        self._release_run_lock()
        if self.dist.initialized_here and dist.is_initialized():
            dist.destroy_process_group()


def _dict_diff(old: Dict[str, Any], new: Dict[str, Any], prefix: str = "") -> List[str]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict) and k != "options":
            out += _dict_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def train(cfg: Config, resume: Optional[str] = None, log: Optional[Callable[[str], None]] = None,
          callbacks=None) -> TrainResult:
    """Run a training configuration (see the module docstring); returns a :class:`TrainResult`."""
    trainer = Trainer(cfg, resume=resume, log=log, callbacks=callbacks)
    try:
        return trainer.fit()
    finally:
        trainer.close()
