"""Continue the bundled ASID x2/x3/x4 weights on one GPU for a few minutes each; ship only if better.

    python3 scripts/gpu_train_sprint.py --data .carry/train_photos --bench .carry/benchmark --out sprint
    python3 scripts/gpu_train_sprint.py --smoke --device cpu --out d       # seconds, any machine

For each scale: a batch-size probe (eager, bf16 autocast, forward + backward + AdamW step on
random patches; batch sizes doubling from ``--batches`` while samples/s grows by at least
``--min-gain``, at most ``--probe-s`` seconds), then ``distillsr.engine.train`` on the
``asid_x<s>_photos`` configuration started from the bundled weights (``init_from``), with
bf16 autocast, ``torch.compile`` and channels_last on CUDA, at the probed batch, EMA weights
validated on Set5. The iteration count is sized from the probe to fill ``--minutes`` (compile
time set aside); a run still going at its time limit stops and keeps its last checkpoint.

The weights kept (the best validated, else the last checkpoint's) are scored on the benchmark
sets (``--sets``, default Set5, Set14 and B100; fp32, TF32 off) by
:func:`distillsr.engine.ship.ship` with ``only_if_better``: against the bundled card's mean PSNR
over the same sets, so the rule is the one of ``distillsr ship``. Only an improvement is
written, as ``--out/weights/asid_x<s>.safetensors`` + ``asid_x<s>.json`` (the card updated:
scores, iterations, wall time, command), ready to be copied into ``src/distillsr/weights/``;
nothing in the package changes.

Also in ``--out``: ``runs/asid_x<s>_sprint/`` (the engine's config.yaml, log.csv, checkpoints,
best.safetensors), ``sprint.log`` and ``summary.json`` / ``summary.md`` (rewritten after each
step). One deadline covers the whole command (``--budget-min``): each scale gets an equal share
of what is left. ``--smoke``: the first ``--smoke-photos`` photos, 2 iterations, a tiny
probe, validation on one image and ship scoring on Set5 alone.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from distillsr.engine.config import ConfigError, load_config  # noqa: E402
from distillsr.engine.device import select_device  # noqa: E402
from distillsr.engine.ship import Run, ShipResult, ship  # noqa: E402
from distillsr.engine.train import TrainError, train  # noqa: E402
from distillsr.io import atomic_write, atomic_write_text  # noqa: E402
from distillsr.pretrained import PACKAGE_WEIGHTS_DIR, read_card  # noqa: E402
from distillsr.registry import create_model  # noqa: E402

NAME = "asid"
SETS = ("Set5", "Set14", "B100")
DEFAULT_DIRS = {"data": (REPO / ".carry" / "train_photos", REPO.parent / "shared" / "data" / "train_photos"),
                "bench": (REPO / ".carry" / "benchmark", REPO.parent / "shared" / "data" / "benchmark")}


class SprintError(RuntimeError):
    """The sprint cannot run as asked (the message says why)."""


# ----------------------------------------------------------------------------- batch probe
def probe_batch(scale: int, patch: int, batches: Sequence[int], device: torch.device, *, steps: int = 3,
                budget_s: float = 30.0, min_gain: float = 0.05, amp: bool = True,
                log: Callable[[str], None] = print) -> dict:
    """Samples/s of ASID x``scale`` training steps (forward, L1 loss, backward, AdamW step; bf16
    autocast when ``amp``) at each batch size of ``batches`` in turn, on random patches.

    Stops at the first size that runs out of memory, gains less than ``min_gain`` over the best
    so far, or would pass ``budget_s``. Returns ``{"batch": the size with the most samples/s,
    "samples_per_s": ..., "rows": [{"batch", "samples_per_s" | "status"}]}``."""
    model = create_model(NAME, scale).to(device).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    rows: List[dict] = []
    best: Optional[dict] = None
    t_end = time.monotonic() + budget_s
    for b in batches:
        if best is not None and time.monotonic() + best["step_s"] * b / best["batch"] * (steps + 1) > t_end:
            rows.append({"batch": b, "status": "not run (probe time)"})
            break
        try:
            x = torch.rand(b, 3, patch, patch, device=device)
            y = torch.rand(b, 3, patch * scale, patch * scale, device=device)

            def step():
                with torch.autocast(device.type, dtype=torch.bfloat16, enabled=amp):
                    out = model(x)
                loss = F.l1_loss(out.float(), y)
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()

            step()  # warm-up (allocations, cuDNN choices)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            t = time.perf_counter()
            for _ in range(steps):
                step()
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            step_s = (time.perf_counter() - t) / steps
        except torch.cuda.OutOfMemoryError:
            rows.append({"batch": b, "status": "out of memory"})
            break
        finally:
            x = y = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        row = {"batch": b, "samples_per_s": b / step_s, "step_s": step_s}
        rows.append(row)
        log(f"probe x{scale}: batch {b}: {row['samples_per_s']:.1f} samples/s ({step_s * 1e3:.1f} ms/step)")
        if best is not None and row["samples_per_s"] < best["samples_per_s"] * (1 + min_gain):
            if row["samples_per_s"] > best["samples_per_s"]:
                best = row
            break
        best = row if best is None or row["samples_per_s"] > best["samples_per_s"] else best
    if best is None:
        raise SprintError(f"x{scale}: not even batch {batches[0]} fits on {device}")
    return {"batch": best["batch"], "samples_per_s": best["samples_per_s"], "step_s": best["step_s"], "rows": rows}


# ----------------------------------------------------------------------------- ship
def ship_if_better(weights: Path, scale: int, bench: Path, sets: Sequence[str], out_dir: Path, *,
                   card_dir: Path = PACKAGE_WEIGHTS_DIR, run: Run = Run(), device: Optional[str] = None,
                   log: Callable[[str], None] = print) -> ShipResult:
    """Score ``weights`` on ``sets`` and, only if its mean PSNR beats the card ``asid_x<scale>.json``
    of ``card_dir`` (:func:`distillsr.engine.ship.ship`'s ``only_if_better`` rule), write the
    weights and the updated card into ``out_dir``. Nothing is written otherwise."""
    card = Path(card_dir) / f"{NAME}_x{scale}.json"
    if not card.is_file():
        raise SprintError(f"no card {card} to compare with")
    out_dir = Path(out_dir)
    with tempfile.TemporaryDirectory(prefix="sprint-ship-") as tmp:
        shutil.copyfile(card, Path(tmp) / card.name)  # ship compares with, and updates, this copy
        with _no_tf32():
            result = ship(weights, NAME, bench, to=tmp, datasets=list(sets), only_if_better=True, run=run,
                          device=device, log=log)
        if result.shipped:
            out_dir.mkdir(parents=True, exist_ok=True)
            for name in (f"{NAME}_x{scale}.safetensors", f"{NAME}_x{scale}.json"):  # weights before card
                atomic_write(out_dir / name, lambda t, src=Path(tmp) / name: shutil.copyfile(src, t))
    return result


def _no_tf32():
    from distillsr.engine.profile import tf32
    return tf32(False)


# ----------------------------------------------------------------------------- one scale
def kept_weights(run_dir: Path) -> Optional[Path]:
    """What a run leaves to ship: best.safetensors (best validation), else the final weights,
    else the last checkpoint's EMA (or plain) weights."""
    for p in (run_dir / "best.safetensors", run_dir / "model.safetensors"):
        if p.is_file():
            return p
    ckpts = sorted((run_dir / "checkpoints").glob("iter_*.safetensors"))
    ema = [p for p in ckpts if p.name.endswith("_ema.safetensors")]
    return (ema or ckpts or [None])[-1]


def _hardware(device: torch.device) -> str:
    if device.type == "cuda":
        return f"one {torch.cuda.get_device_name(device)} (scripts/gpu_train_sprint.py)"
    return f"CPU {platform.machine()}, {torch.get_num_threads()} threads (scripts/gpu_train_sprint.py)"


def sprint_scale(scale: int, args, device: torch.device, scale_end: float, log, state: dict) -> dict:
    """Probe, train until ``--minutes`` have passed or ``scale_end`` (``time.monotonic()``) less
    ``--ship-s`` is near, ship if better; returns the scale's summary."""
    entry = {"scale": scale, "status": "running"}
    state["scales"].append(entry)
    card = read_card(PACKAGE_WEIGHTS_DIR / f"{NAME}_x{scale}.json")
    init = PACKAGE_WEIGHTS_DIR / card.file.name
    cuda = device.type == "cuda"
    compile_net = cuda and not args.no_compile
    patch = args.patch
    probe = probe_batch(scale, patch, args.batches, device, steps=1 if args.smoke else 3,
                        budget_s=args.probe_s, log=log)
    entry["probe"] = probe
    train_s = min(args.minutes * 60, scale_end - time.monotonic() - args.ship_s)
    if train_s < (1 if args.smoke else 20):
        raise SprintError(f"x{scale}: only {train_s:.0f} s left for training after the probe")
    it_s = probe["samples_per_s"] / probe["batch"]
    setup_s = args.compile_s if compile_net else 0.0
    iters = 2 if args.smoke else max(20, int((train_s - setup_s) * it_s * 0.9))
    entry.update(batch=probe["batch"], iters_planned=iters, train_s_planned=train_s)
    log(f"x{scale}: batch {probe['batch']}, {iters} iterations planned for {train_s:.0f} s "
        f"({it_s:.2f} it/s eager in the probe)")
    run_name = f"{NAME}_x{scale}_sprint"
    overrides = [f"name={run_name}", f"out_dir={args.out / 'runs'}", f"init_from={init}", "init_strict=true",
                 "init_linear=false", "init_upsampler=false",
                 f"data.root={args.data_dir}", f"data.patch_size={patch}", f"data.batch_size={probe['batch']}",
                 f"val.dir={args.bench / args.val_set}", f"val.every={iters if args.smoke else max(1, iters // 4)}",
                 f"val.max_images={1 if args.smoke else 0}",
                 f"optim.lr={args.lr}", "sched.warmup_iters=" + str(min(50, max(1, iters // 10))),
                 f"sched.min_lr={args.lr / 40}", "train.ema_decay=0.999", f"train.iters={iters}",
                 "train.amp=bf16", f"train.compile={str(compile_net).lower()}",
                 f"train.channels_last={str(cuda).lower()}", f"train.device={device}",
                 f"train.threads={torch.get_num_threads()}", f"data.num_workers={args.workers if cuda else 0}",
                 f"train.log_every={1 if args.smoke else 20}",
                 f"train.ckpt_every={iters}", "train.keep_ckpts=1", "train.progress=log",
                 "train.tensorboard=false"]
    entry["overrides"] = overrides
    t0 = time.monotonic()
    stop_at = t0 + train_s

    def on_time(trainer, done):
        if time.monotonic() > stop_at:
            trainer.request_stop()

    try:
        result = train(load_config(f"{NAME}_x{scale}_photos", overrides), log=log, callbacks=[on_time])
    except (RuntimeError, ConfigError) as e:  # torch.compile failing on this build: once more, eager
        if not compile_net or isinstance(e, torch.cuda.OutOfMemoryError):
            raise
        log(f"x{scale}: training with torch.compile failed ({type(e).__name__}: {str(e)[:300]}); "
            f"going on without it")
        entry["compile_error"] = f"{type(e).__name__}: {str(e)[:300]}"
        overrides = [o for o in overrides if not o.startswith(("train.compile=", "name="))]
        overrides += ["train.compile=false", f"name={run_name}_eager"]
        entry["overrides"] = overrides
        result = train(load_config(f"{NAME}_x{scale}_photos", overrides), log=log, callbacks=[on_time])
    wall = time.monotonic() - t0
    done = result.iteration
    entry.update(iterations=done, completed=result.completed, train_wall_s=wall,
                 best_val_psnr=result.best_psnr, best_val_iter=result.best_iter,
                 last_loss=result.last_loss, it_per_s=done / max(wall, 1e-9))
    kept = kept_weights(result.run_dir)
    if kept is None:
        entry.update(status="no weights written", shipped=False)
        return entry
    entry["candidate"] = str(kept.relative_to(args.out))
    command = (f"python3 scripts/gpu_train_sprint.py {' '.join(args.argv)} "
               f"(x{scale}: batch {probe['batch']}, {done} iterations, lr {args.lr}, patch {patch})")
    old_hw = (card.training or {}).get("hardware")
    run = Run(iterations=done, wall_time_h=wall / 3600, command=command,
              hardware=f"{old_hw}; then {_hardware(device)}" if old_hw else _hardware(device))
    res = ship_if_better(kept, scale, args.bench, args.sets, args.out / "weights", run=run, device=str(device),
                         log=log)
    entry.update(status="done", shipped=res.shipped, new_psnr=res.psnr, new_ssim=res.ssim,
                 new_mean=res.new_mean, card_mean=res.old_mean,
                 card_psnr={s: card.psnr.get(s) for s in args.sets})
    log(f"x{scale}: {res.verdict}: " + ("shipped to " + str(args.out / "weights") if res.shipped
                                        else "not shipped (not better than the bundled card)"))
    return entry


# ----------------------------------------------------------------------------- report
def render_markdown(state: dict) -> str:
    lines = [f"# ASID training sprint ({'smoke, ' if state['smoke'] else ''}{state['hardware']})", "",
             f"Command: `{state['command']}`", "", f"Sets: {', '.join(state['sets'])}; "
             f"{state['elapsed_s']:.0f} s of a {state['budget_min']:g} min budget.", "",
             "| scale | batch | iterations | it/s | wall s | best val PSNR (Set5) | mean PSNR new | card | shipped |",
             "|---|---|---|---|---|---|---|---|---|"]
    for e in state["scales"]:
        def f(key, spec):
            v = e.get(key)
            return "-" if v is None else format(v, spec)
        lines.append(f"| x{e['scale']} | {e.get('batch', '-')} | {e.get('iterations', '-')} | {f('it_per_s', '.2f')} "
                     f"| {f('train_wall_s', '.0f')} | {f('best_val_psnr', '.4f')} | {f('new_mean', '.4f')} "
                     f"| {f('card_mean', '.4f')} | {e.get('shipped', e['status'])} |")
    for e in state["scales"]:
        if e.get("new_psnr"):
            lines.append("")
            lines.append(f"x{e['scale']} per set (new / card): " + ", ".join(
                f"{s} {e['new_psnr'][s]:.4f} / {e['card_psnr'].get(s) or float('nan'):.4f}" for s in e["new_psnr"]))
        if e.get("probe"):
            lines.append(f"x{e['scale']} batch probe: " + ", ".join(
                f"{r['batch']}: " + (f"{r['samples_per_s']:.0f}/s" if "samples_per_s" in r else r["status"])
                for r in e["probe"]["rows"]))
    return "\n".join(lines) + "\n"


def _default_dir(kind: str) -> Optional[Path]:
    return next((d for d in DEFAULT_DIRS[kind] if d.is_dir()), None)


def _smoke_photos(data: Path, n: int, into: Path) -> Path:
    """A folder of links to the first ``n`` images of ``data`` (the smoke run's training set)."""
    from distillsr.data.train_data import list_images
    into.mkdir(parents=True, exist_ok=True)
    for p in list_images(data)[:n]:
        link = into / p.name
        if not link.exists():
            link.symlink_to(p.resolve())
    return into


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--data", type=Path, default=None,
                   help="HR training photos (default: .carry/train_photos, then ../shared/data/train_photos)")
    p.add_argument("--bench", type=Path, default=None,
                   help="benchmark root with <Set>/HR (default: .carry/benchmark, then ../shared/data/benchmark)")
    p.add_argument("--sets", default=None, help="sets to score and compare on (default Set5,Set14,B100; "
                                                "--smoke: Set5)")
    p.add_argument("--val-set", default="Set5", help="the set validated on during training")
    p.add_argument("--scales", default="2,3,4")
    p.add_argument("--minutes", type=float, default=1.5, help="training minutes per scale (at most)")
    p.add_argument("--budget-min", type=float, default=8.0, help="deadline of the whole command")
    p.add_argument("--device", default="auto")
    p.add_argument("--batches", default=None, help="batch sizes the probe tries, in order "
                                                   "(default 16,32,...,512; --smoke: 2,4)")
    p.add_argument("--probe-s", type=float, default=None, help="probe time per scale (default 25; --smoke 60)")
    p.add_argument("--patch", type=int, default=None, help="LR patch side (default 64; --smoke 24)")
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--workers", type=int, default=6, help="data loader processes on CUDA (0 on the CPU)")
    p.add_argument("--compile-s", type=float, default=45.0, help="seconds set aside for torch.compile")
    p.add_argument("--no-compile", action="store_true")
    p.add_argument("--ship-s", type=float, default=40.0, help="seconds kept per scale for scoring and shipping")
    p.add_argument("--smoke", action="store_true")
    p.add_argument("--smoke-photos", type=int, default=4)
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke: 2)")
    args = p.parse_args(argv)
    if args.smoke and args.threads is None:
        args.threads = min(2, os.cpu_count() or 1)
    args.argv = argv
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        device = select_device(args.device)
        scales = [int(s) for s in args.scales.split(",") if s.strip()]
    except ValueError as e:
        p.error(str(e))
    if not scales or any(s not in (2, 3, 4) for s in scales):
        p.error(f"--scales {args.scales}: bundled ASID weights exist for 2, 3 and 4")
    args.data = args.data or _default_dir("data")
    args.bench = args.bench or _default_dir("bench")
    if args.data is None or not args.data.is_dir():
        p.error(f"--data {args.data}: no such folder of training photos")
    if args.bench is None or not args.bench.is_dir():
        p.error(f"--bench {args.bench}: no such benchmark folder")
    args.sets = [s for s in (args.sets or ("Set5" if args.smoke else ",".join(SETS))).split(",") if s]
    for s in {*args.sets, args.val_set}:
        if not (args.bench / s / "HR").is_dir():
            p.error(f"--bench {args.bench}: no {s}/HR folder")
    args.batches = [int(b) for b in (args.batches or ("2,4" if args.smoke else "16,32,64,128,256,512")).split(",")]
    args.probe_s = args.probe_s if args.probe_s is not None else (60.0 if args.smoke else 25.0)
    args.patch = args.patch or (24 if args.smoke else 64)
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a folder")
    if (args.out / "runs").is_dir() and any((args.out / "runs").iterdir()):
        p.error(f"--out {args.out}: already holds runs/; choose an empty folder")
    args.out.mkdir(parents=True, exist_ok=True)
    args.data_dir = _smoke_photos(args.data, args.smoke_photos, args.out / "smoke_photos") if args.smoke \
        else args.data

    t_start = time.monotonic()
    deadline = t_start + args.budget_min * 60
    lines: List[str] = []
    state = {"command": "python3 scripts/gpu_train_sprint.py " + " ".join(argv), "smoke": args.smoke,
             "device": str(device), "hardware": _hardware(device), "torch": torch.__version__,
             "budget_min": args.budget_min, "sets": args.sets, "scales": [], "elapsed_s": 0.0}

    def flush():
        state["elapsed_s"] = time.monotonic() - t_start
        atomic_write_text(args.out / "sprint.log", "\n".join(lines) + "\n")
        atomic_write_text(args.out / "summary.json", json.dumps(state, indent=1, default=str) + "\n")
        atomic_write_text(args.out / "summary.md", render_markdown(state))

    def log(msg: str) -> None:
        line = f"[{time.monotonic() - t_start:6.1f}s] {msg}"
        print(line, flush=True)
        lines.append(line)
        if len(lines) % 20 == 0:
            flush()

    code = 0
    for i, scale in enumerate(scales):
        left = deadline - time.monotonic()
        share = left / (len(scales) - i)
        if share - args.ship_s < (5 if args.smoke else 45):
            state["scales"].append({"scale": scale, "status": f"not run: budget ({max(left, 0):.0f} s left)"})
            log(f"x{scale}: not run, {left:.0f} s left")
            flush()
            continue
        try:
            sprint_scale(scale, args, device, time.monotonic() + share, log, state)
        except (SprintError, TrainError, ValueError, OSError, RuntimeError) as e:
            state["scales"][-1].update(status=f"failed: {type(e).__name__}: {e}")
            log(f"x{scale}: failed: {e}")
            code = 1
        finally:
            if device.type == "cuda":
                torch._dynamo.reset()
                torch.cuda.empty_cache()
            flush()
    shipped = [e["scale"] for e in state["scales"] if e.get("shipped")]
    log(f"shipped: {', '.join(f'x{s}' for s in shipped) or 'none'}; summary in {args.out / 'summary.md'}")
    flush()
    return code


if __name__ == "__main__":
    sys.exit(main())
