"""GPU speed and memory of ASID, ASID-D8, E-RFDN and FDIWN, and the PSNR cost of bf16 / fp16.

    python3 benchmarks/gpu.py --out gpu_bench --bench .carry/benchmark            # one H100/H200, < 9 min
    python3 benchmarks/gpu.py --out d --models asid --sizes 4k --variants eager-fp32,compile-bf16
    python3 benchmarks/gpu.py --smoke --device cpu --out d                        # seconds, any machine

Every cell times one network (x``--scale``, random weights: speed does not depend on their
values) producing one frame of 720p, 1080p or 4K, batch 1, prepared as the CLI runs it
(``distillsr.kernels.prepare_for_inference``), and reports frames per second (1 / median
latency, ``distillsr.engine.profile.measure_latency``), achieved TFLOP/s (FLOPs counted by
``count_cost``), peak memory (``peak_memory``: ``torch.cuda.max_memory_allocated`` on CUDA,
the process's peak resident size on the CPU) and the ratio to the eager fp32 cell of the same
network and size, measured in the same run. Variants:

  eager-fp32            the reference: fp32 weights and input, TF32 off
  eager-tf32            fp32 with TF32 convolutions and matmuls allowed (CUDA)
  eager-bf16/-fp16      weights and input cast to the half type
  cl-fp32/-bf16/-fp16   the same in channels_last memory format
  graph-fp32/-bf16      one CUDA graph captured from the eager network, replayed (CUDA)
  compile-fp32/-bf16    torch.compile(dynamic=False), default mode (CUDA)
  compile-graphs-bf16   torch.compile(mode="reduce-overhead"): compiled and CUDA graphs (CUDA)

Cells run cheapest first (eager, channels_last and graph cells of every network and size, then
the PSNR cost, then the compile cells: 720p first, compile-graphs first), under one deadline (``--budget-min``): a
cell that would start too close to it is recorded as not run, and a cell still running at the
deadline plus ``--grace-s`` is stopped. An out-of-memory cell is recorded as ``oom``. After
every cell ``results.json`` and ``results.md`` are rewritten (atomically) in ``--out``.

PSNR cost: ``distillsr.engine.evaluate`` on Set5 (``--bench DIR``/Set5) of the weights that ship
in the package (ASID x4 trained on the training photos; E-RFDN x4, the authors' release), with
weights and input in fp32 (TF32 off), bf16 and fp16; the cost is the half-type PSNR minus fp32.
"""
from __future__ import annotations

import argparse
import copy
import gc
import json
import math
import os
import platform
import signal
import statistics
import sys
import tempfile
import time
import traceback
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "src"))

import torch  # noqa: E402

from distillsr.engine.device import select_device  # noqa: E402
from distillsr.engine.profile import (DTYPES, count_cost, input_size_for_output, measure_latency,  # noqa: E402
                                      peak_memory)
from distillsr.io import atomic_write_text  # noqa: E402
from distillsr.kernels import prepare_for_inference  # noqa: E402
from distillsr.registry import create_model  # noqa: E402

MODELS = ("asid", "asid-d8", "e-rfdn", "fdiwn")
SIZES = {"720p": (1280, 720), "1080p": (1920, 1080), "4k": (3840, 2160)}
SMOKE_SIZES = {"tiny": (96, 64)}
PSNR_WEIGHTS = (("asid", "bundled ASID x4, trained on the training photos"),
                ("e-rfdn-release", "bundled E-RFDN x4, the authors' released weights"))
WEIGHTS_NAMES = tuple(n for n, _ in PSNR_WEIGHTS)
PSNR_DTYPES = ("fp32", "bf16", "fp16")
REFERENCE = "eager-fp32"


@dataclass(frozen=True)
class Variant:
    name: str
    dtype: str                  # fp32 | tf32 | bf16 | fp16
    channels_last: bool = False
    mode: str = "eager"         # eager | graph | compile | compile-graphs

    @property
    def needs_cuda(self) -> bool:
        return self.mode != "eager" or self.dtype == "tf32"

    @property
    def compiles(self) -> bool:
        return self.mode.startswith("compile")


VARIANTS = (Variant("eager-fp32", "fp32"), Variant("eager-tf32", "tf32"),
            Variant("eager-bf16", "bf16"), Variant("eager-fp16", "fp16"),
            Variant("cl-fp32", "fp32", True), Variant("cl-bf16", "bf16", True), Variant("cl-fp16", "fp16", True),
            Variant("graph-fp32", "fp32", mode="graph"), Variant("graph-bf16", "bf16", mode="graph"),
            Variant("compile-fp32", "fp32", mode="compile"), Variant("compile-bf16", "bf16", mode="compile"),
            Variant("compile-graphs-bf16", "bf16", mode="compile-graphs"))
VARIANT_NAMES = tuple(v.name for v in VARIANTS)
# --smoke: every kind of cell once (half types on the CPU are slow: bf16 only)
SMOKE_VARIANTS = ("eager-fp32", "eager-tf32", "eager-bf16", "cl-fp32", "graph-fp32", "compile-bf16",
                  "compile-graphs-bf16")


class BudgetExceeded(BaseException):
    """The deadline passed while a cell ran (BaseException: no library handler swallows it)."""


# ----------------------------------------------------------------------------- plan
@dataclass
class Plan:
    device: torch.device
    models: List[str]
    sizes: Dict[str, tuple]
    variants: List[Variant]
    scale: int
    cell_seconds: float         # timing time per cell (repeats follow from one run's time)
    min_repeats: int
    max_repeats: int
    warmup: int
    deadline: float             # time.monotonic() at which no cell starts any more
    compile_reserve_s: float    # a compile cell starts only with this much left


def _skip_reason(v: Variant, device: torch.device) -> Optional[str]:
    if device.type == "cuda" or not v.needs_cuda:
        return None
    if v.compiles:
        return "runs on CUDA only (on the CPU: distillsr profile --compile)"
    if v.mode == "graph":
        return "CUDA graphs need a CUDA device"
    return "TF32 is a CUDA mode"


def _tf32(allowed: bool):
    from distillsr.engine.profile import tf32
    return tf32(allowed)


def _capture_graph(net: torch.nn.Module, x: torch.Tensor, warmup: int) -> Callable[[], object]:
    """A CUDA graph of ``net(x)`` (warmed up on a side stream first); returns its replay."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(max(1, warmup)):
            net(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        net(x)
    return graph.replay


def _free(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.empty_cache()


def run_cell(base: torch.nn.Module, v: Variant, out_size, plan: Plan) -> dict:
    """Time one variant of ``base`` (fp32, prepared, on the device) at ``out_size``."""
    dev = plan.device
    w, h = input_size_for_output(*out_size, plan.scale)
    dtype = DTYPES["fp32" if v.dtype == "tf32" else v.dtype]
    fmt = torch.channels_last if v.channels_last else torch.contiguous_format
    net = prepare_for_inference(copy.deepcopy(base).to(dtype=dtype, memory_format=fmt))
    x = torch.rand(1, 3, h, w, device=dev, dtype=dtype).contiguous(memory_format=fmt)
    with _tf32(v.dtype == "tf32"), torch.inference_mode():
        t0 = time.perf_counter()
        if v.mode == "graph":
            fn = _capture_graph(net, x, plan.warmup)
        else:
            model = net
            if v.compiles:
                model = torch.compile(net, dynamic=False,
                                      mode="reduce-overhead" if v.mode == "compile-graphs" else None)

            def fn():
                return model(x)
        for _ in range(plan.warmup if v.mode != "graph" else 1):
            fn()
        repeats = plan.min_repeats
        if plan.cell_seconds > 0:  # as many runs as fit in cell_seconds
            once = measure_latency(fn, dev, repeats=1, warmup=0)[0]
            repeats = max(plan.min_repeats, min(plan.max_repeats, int(plan.cell_seconds / max(once, 1e-6))))
        setup_s = time.perf_counter() - t0
        times: List[float] = []
        # the peak over the timed runs themselves
        peak = peak_memory(lambda: times.extend(measure_latency(fn, dev, repeats=repeats, warmup=0)), dev)
    median = statistics.median(times)
    return {"status": "ok", "median_ms": median * 1e3, "fps": 1.0 / median, "repeats": repeats,
            "peak_memory_bytes": peak, "setup_s": setup_s}


# ----------------------------------------------------------------------------- PSNR cost
def _subset(bench: Path, n: int, into: Path, scale: int) -> Path:
    """A benchmark root whose Set5 holds links to the first ``n`` images (HR and LR) of ``bench``'s."""
    from distillsr.data.benchmark import lr_path
    src = bench / "Set5"
    for hr in sorted((src / "HR").iterdir())[:n]:
        links = [(hr, into / "Set5" / "HR" / hr.name)]
        lr = lr_path(src, hr.stem, scale)
        if lr.is_file():
            links.append((lr, lr_path(into / "Set5", hr.stem, scale)))
        for target, link in links:
            link.parent.mkdir(parents=True, exist_ok=True)
            link.symlink_to(target.resolve())
    return into


def psnr_cost(bench: Optional[Path], device: torch.device, log, *, weights: Sequence[str] = WEIGHTS_NAMES,
              dtypes: Sequence[str] = PSNR_DTYPES, images: int = 0) -> dict:
    """Set5 PSNR of the bundled x4 weights in fp32 and each of ``dtypes`` (see the module doc);
    ``images``: only the first few images of Set5 (0 = all)."""
    if bench is None or not (bench / "Set5" / "HR").is_dir():
        return {"status": "not measured", "reason": f"no Set5/HR under --bench {bench}"}
    from distillsr.engine.evaluate import evaluate
    from distillsr.pretrained import load_pretrained
    dtypes = ["fp32"] + [d for d in dtypes if d != "fp32"]
    rows = []
    with tempfile.TemporaryDirectory(prefix="gpu-bench-") as tmp:
        root = _subset(bench, images, Path(tmp), 4) if images else bench
        for name in weights:
            row = {"weights": name, "scale": 4, "what": dict(PSNR_WEIGHTS)[name], "psnr": {}, "errors": {}}
            for dt in dtypes:
                try:
                    model = load_pretrained(name, 4, pull=False).to(DTYPES[dt])
                    with _tf32(False):
                        res = evaluate(model, 4, root, ["Set5"], device=str(device), weights=name,
                                       log=lambda m: None)
                    row["psnr"][dt] = res["results"][0]["psnr"]
                    row["images"] = res["results"][0]["num_images"]
                except Exception as e:  # an op without a kernel for the type, a missing file
                    row["errors"][dt] = f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}"
                finally:
                    _free(device)
            if "fp32" in row["psnr"]:
                row["cost_db"] = {dt: row["psnr"][dt] - row["psnr"]["fp32"] for dt in dtypes[1:]
                                  if dt in row["psnr"]}
            log(f"PSNR Set5 x4 {name}: " + ", ".join(f"{k} {v:.4f}" for k, v in row["psnr"].items()))
            rows.append(row)
    return {"status": "ok", "set": "Set5", "dtypes": dtypes, "rows": rows}


# ----------------------------------------------------------------------------- report
def _environment(device: torch.device) -> dict:
    env = {"torch": torch.__version__, "python": platform.python_version(), "device": str(device),
           "cpu_threads": torch.get_num_threads()}
    if device.type == "cuda":
        p = torch.cuda.get_device_properties(device)
        env.update(gpu=p.name, gpu_memory_gib=round(p.total_memory / 2 ** 30, 1),
                   capability=f"{p.major}.{p.minor}", cuda=torch.version.cuda,
                   cudnn=torch.backends.cudnn.version())
    else:
        env["cpu"] = platform.processor() or platform.machine()
    return env


def _fmt(v, spec: str, none: str = "-") -> str:
    return none if v is None else format(v, spec)


def render_markdown(res: dict) -> str:
    cells = res["cells"]
    lines = [f"# GPU benchmark ({'smoke, ' if res['smoke'] else ''}{res['environment'].get('gpu', res['device'])})",
             "", f"Command: `{res['command']}`", "",
             f"Environment: {json.dumps(res['environment'])}", "",
             f"x{res['scale']}, batch 1, random weights; {res['elapsed_s']:.0f} s of a "
             f"{res['budget_min']:g} min budget; {'finished' if res['finished'] else 'running / stopped'}.", "",
             "## Frames per second (x eager fp32 of the same network and size, this run)", ""]
    names = [v for v in res["variants"]]
    lines.append("| network | output | " + " | ".join(names) + " |")
    lines.append("|---|---|" + "---|" * len(names))
    by_key = {(c["model"], c["size"], c["variant"]): c for c in cells}
    for m in res["models"]:
        for s in res["sizes"]:
            row = []
            for n in names:
                c = by_key.get((m, s, n))
                if c is None:
                    row.append("")
                elif c["status"] == "ok":
                    ratio = f" ({c['ratio']:.2f}x)" if c.get("ratio") is not None else ""
                    row.append(f"{c['fps']:.1f}{ratio}")
                else:
                    row.append(c["status"])
            lines.append(f"| {m} | {s} | " + " | ".join(row) + " |")
    lines += ["", "## Every cell", "",
              "| network | output | variant | status | ms | fps | x eager fp32 | GFLOP/s | peak memory MiB "
              "| setup s | note |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in cells:
        mem = c.get("peak_memory_bytes")
        lines.append(f"| {c['model']} | {c['size']} | {c['variant']} | {c['status']} | "
                     f"{_fmt(c.get('median_ms'), '.2f')} | {_fmt(c.get('fps'), '.1f')} | "
                     f"{_fmt(c.get('ratio'), '.2f')} | {_fmt(c.get('gflops'), '.1f')} | "
                     f"{'n/a' if c['status'] == 'ok' and mem is None else _fmt(mem and mem / 2 ** 20, '.0f')} | "
                     f"{_fmt(c.get('setup_s'), '.1f')} | {c.get('reason', '')} |")
    lines += ["", "Peak memory: " + ("torch.cuda.max_memory_allocated during one run."
                                     if res["device"].startswith("cuda") else
                                     "the process's peak resident size during one run (whole process)."),
              "", "## PSNR cost of bf16 / fp16 (Set5, x4, distillsr.engine.evaluate)", ""]
    p = res.get("psnr")
    if not p:
        lines.append("not run yet")
    elif p["status"] != "ok":
        lines.append(f"{p['status']}: {p['reason']}")
    else:
        lines += ["| weights | fp32 PSNR | bf16 PSNR | bf16 cost dB | fp16 PSNR | fp16 cost dB | note |",
                  "|---|---|---|---|---|---|---|"]
        for r in p["rows"]:
            ps, cost = r["psnr"], r.get("cost_db", {})
            lines.append(f"| {r['weights']} ({r['what']}) | {_fmt(ps.get('fp32'), '.4f')} | "
                         f"{_fmt(ps.get('bf16'), '.4f')} | {_fmt(cost.get('bf16'), '+.4f')} | "
                         f"{_fmt(ps.get('fp16'), '.4f')} | {_fmt(cost.get('fp16'), '+.4f')} | "
                         f"{'; '.join(f'{k}: {v}' for k, v in r['errors'].items())} |")
    return "\n".join(lines) + "\n"


def write_results(out: Path, res: dict, t_start: float) -> None:
    res["elapsed_s"] = time.monotonic() - t_start
    atomic_write_text(out / "results.json", json.dumps(res, indent=1) + "\n")
    atomic_write_text(out / "results.md", render_markdown(res))


# ----------------------------------------------------------------------------- main
def _parse_list(text: str, allowed, what: str) -> List[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    bad = [t for t in items if t not in allowed]
    if bad or not items:
        raise SystemExit(f"error: --{what}: unknown {', '.join(bad) or '(empty)'}; choose from {', '.join(allowed)}")
    return items


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True, help="folder for results.json and results.md")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--bench", type=Path, default=None,
                   help="benchmark root holding Set5/HR (for the PSNR cost; default: .carry/benchmark, "
                        "then ../shared/data/benchmark)")
    p.add_argument("--models", default=",".join(MODELS))
    p.add_argument("--sizes", default=None, help=f"from {', '.join(SIZES)} (default: all; --smoke: tiny)")
    p.add_argument("--variants", default=None, help="default: all (--smoke: one of each kind)")
    p.add_argument("--scale", type=int, default=4)
    p.add_argument("--budget-min", type=float, default=8.0, help="no cell starts after this many minutes")
    p.add_argument("--grace-s", type=float, default=30.0, help="a cell still running this long after the "
                                                                "deadline is stopped")
    p.add_argument("--compile-reserve-s", type=float, default=75.0,
                   help="a compile cell starts only with this much of the budget left")
    p.add_argument("--cell-seconds", type=float, default=0.5, help="timing time per cell")
    p.add_argument("--no-psnr", action="store_true", help="skip the bf16/fp16 PSNR cost")
    p.add_argument("--psnr-weights", default=None, help=f"from {', '.join(WEIGHTS_NAMES)} (default: both; "
                                                         f"--smoke: asid)")
    p.add_argument("--psnr-dtypes", default=None, help="default bf16,fp16 (--smoke: bf16); fp32 always runs")
    p.add_argument("--psnr-images", type=int, default=None, help="first N images of Set5 (default all; --smoke 1)")
    p.add_argument("--smoke", action="store_true", help="a tiny output size, 1-2 runs per cell: seconds")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's; --smoke: 2)")
    args = p.parse_args(argv)
    if args.smoke and args.threads is None:
        args.threads = min(2, os.cpu_count() or 1)
    if args.threads:
        torch.set_num_threads(args.threads)

    try:
        device = select_device(args.device)
    except ValueError as e:
        p.error(str(e))
    if args.out.exists() and not args.out.is_dir():
        p.error(f"--out {args.out}: exists and is not a folder")
    models = _parse_list(args.models, MODELS, "models")
    size_table = {**SIZES, **SMOKE_SIZES}
    sizes = _parse_list(args.sizes, size_table, "sizes") if args.sizes else list(SMOKE_SIZES if args.smoke else SIZES)
    chosen = _parse_list(args.variants or ",".join(SMOKE_VARIANTS if args.smoke else VARIANT_NAMES), VARIANT_NAMES,
                         "variants")
    if REFERENCE not in chosen:
        chosen.insert(0, REFERENCE)  # every ratio needs it
    variants = [v for v in VARIANTS if v.name in chosen]
    psnr_args = dict(
        weights=_parse_list(args.psnr_weights or ("asid" if args.smoke else ",".join(WEIGHTS_NAMES)),
                            WEIGHTS_NAMES, "psnr-weights"),
        dtypes=_parse_list(args.psnr_dtypes or ("bf16" if args.smoke else "bf16,fp16"), DTYPES, "psnr-dtypes"),
        images=args.psnr_images if args.psnr_images is not None else (1 if args.smoke else 0))
    args.out.mkdir(parents=True, exist_ok=True)
    bench = args.bench
    if bench is None:
        bench = next((b for b in (HERE.parent / ".carry" / "benchmark", HERE.parent.parent / "shared" / "data" /
                                  "benchmark") if (b / "Set5").is_dir()), None)
    t_start = time.monotonic()
    plan = Plan(device, models, {s: size_table[s] for s in sizes}, variants, args.scale,
                cell_seconds=0.0 if args.smoke else args.cell_seconds, min_repeats=1 if args.smoke else 5,
                max_repeats=1 if args.smoke else 200, warmup=1 if args.smoke else 2,
                deadline=t_start + args.budget_min * 60, compile_reserve_s=args.compile_reserve_s)
    res = {"command": " ".join(["python3", "benchmarks/gpu.py", *(argv if argv is not None else sys.argv[1:])]),
           "smoke": args.smoke, "device": str(device), "scale": args.scale, "budget_min": args.budget_min,
           "environment": _environment(device), "models": models, "sizes": sizes,
           "variants": [v.name for v in variants], "cells": [], "psnr": None, "finished": False}

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f}s] {msg}", flush=True)

    def on_alarm(signum, frame):
        raise BudgetExceeded()

    hard_stop = max(1, math.ceil(args.budget_min * 60 + args.grace_s))
    if hasattr(signal, "SIGALRM"):
        signal.signal(signal.SIGALRM, on_alarm)
        signal.alarm(hard_stop)
    torch.manual_seed(0)
    nets: Dict[str, torch.nn.Module] = {}
    flops: Dict[tuple, int] = {}
    baseline: Dict[tuple, float] = {}

    def cell(m: str, s: str, v: Variant) -> None:
        c = {"model": m, "size": s, "output": list(plan.sizes[s]), "variant": v.name, "dtype": v.dtype,
             "channels_last": v.channels_last, "mode": v.mode}
        reason = _skip_reason(v, device)
        left = plan.deadline - time.monotonic()
        if reason:
            c.update(status="skipped", reason=reason)
        elif left < (plan.compile_reserve_s if v.compiles else 0):
            c.update(status="not run", reason=f"budget: {max(left, 0):.0f} s left")
        else:
            try:
                if m not in nets:
                    nets[m] = prepare_for_inference(create_model(m, plan.scale).to(device))
                if (m, s) not in flops:
                    w, h = input_size_for_output(*plan.sizes[s], plan.scale)
                    flops[(m, s)] = count_cost(nets[m], (1, 3, h, w)).flops
                c.update(run_cell(nets[m], v, plan.sizes[s], plan))
                c["gflops"] = flops[(m, s)] / (c["median_ms"] / 1e3) / 1e9
                if v.name == REFERENCE:
                    baseline[(m, s)] = c["fps"]
                if (m, s) in baseline:
                    c["ratio"] = c["fps"] / baseline[(m, s)]
            except torch.cuda.OutOfMemoryError as e:
                c.update(status="oom", reason=str(e).splitlines()[0][:160])
            except BudgetExceeded:
                c.update(status="stopped", reason=f"still running {args.grace_s:g} s after the deadline")
                res["cells"].append(c)
                raise
            except Exception as e:  # a variant this build cannot run: recorded, the others go on
                c.update(status="error", reason=f"{type(e).__name__}: {(str(e).splitlines() or [''])[0][:200]}")
                traceback.print_exc()
            finally:
                if v.compiles:
                    torch._dynamo.reset()
                _free(device)
        res["cells"].append(c)
        write_results(args.out, res, t_start)
        log(f"{m} {s} {v.name}: {c['status']}" + (f" {c['fps']:.2f} fps" if c["status"] == "ok" else
                                                 f" ({c.get('reason', '')})"))

    cheap = [v for v in variants if not v.compiles]
    # CUDA graphs first: at batch 1 these small networks are bound by kernel launches
    compiled = sorted((v for v in variants if v.compiles), key=lambda v: v.mode != "compile-graphs")
    code = 0
    try:
        for m in models:
            for s in sizes:
                for v in cheap:
                    cell(m, s, v)
        if not args.no_psnr:
            if plan.deadline - time.monotonic() > 0:
                res["psnr"] = psnr_cost(bench, device, log, **psnr_args)
            else:
                res["psnr"] = {"status": "not measured", "reason": "budget"}
            write_results(args.out, res, t_start)
        for s in sizes:
            for m in models:
                for v in compiled:
                    cell(m, s, v)
        res["finished"] = True
    except BudgetExceeded:
        log("the deadline passed: stopped; the results so far are written")
        code = 0
    finally:
        if hasattr(signal, "SIGALRM"):
            signal.alarm(0)
        write_results(args.out, res, t_start)
    log(f"wrote {args.out / 'results.md'} and results.json")
    return code


if __name__ == "__main__":
    sys.exit(main())
