"""``distillsr profile``: parameters, MACs, latency and peak memory of a network."""
from __future__ import annotations

import json
import sys
from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser(
        "profile", help="parameters, MACs, latency and peak memory of a network",
        description="Count the parameters and multiply-accumulates of a network for a given OUTPUT "
                    "size (the input is ceil(size / scale), padded as the network pads it), then time "
                    "it: median latency after warm-up and peak memory (process RSS on the CPU, "
                    "max_memory_allocated on CUDA). MAC conventions: 'conv+linear' is the usual SR "
                    "papers' count; 'paper' adds bias additions and 2 per LayerNorm element (what the "
                    "ASID paper's tables count); 'with attention' adds the attention matmuls.")
    p.add_argument("--model",
                   help="an architecture (random init) or weights by name (see `distillsr models`)")
    p.add_argument("--scale", type=int, help="upscaling factor (with --weights, default the checkpoint's)")
    p.add_argument("--weights", help="a checkpoint that load_model accepts (default: random init)")
    p.add_argument("--size", default="1280x720", help="output size WIDTHxHEIGHT (default 1280x720)")
    p.add_argument("--device", default="cpu", help="cpu or cuda[:N] (default cpu)")
    p.add_argument("--dtype", default="fp32", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--repeats", type=int, default=5, help="timed runs after warm-up (default 5)")
    p.add_argument("--warmup", type=int, default=1, help="untimed runs first (default 1)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--count-only", action="store_true", help="only count parameters and MACs")
    p.add_argument("--compile", action="store_true",
                   help="time torch.compile(model) (CUDA: with CUDA graphs); compiling is not timed")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    p.set_defaults(func=run)


def _g(n: float) -> str:
    return f"{n / 1e9:.2f} G"


def _named_model(name: str, scale: int):
    """Weights by name (a release is pulled on first use), else the architecture at random init."""
    from ..pretrained import list_pretrained, load_pretrained
    from ..registry import create_model
    from ..releases import find_release
    if find_release(name) is not None or any(e.name == name.lower() for e in list_pretrained()):
        return load_pretrained(name, scale)
    return create_model(name, scale)


def run(args) -> int:
    import torch
    from ..checkpoint import CheckpointError, load_model
    from ..engine.device import select_device
    from ..engine.profile import parse_size, profile_model

    try:
        size = parse_size(args.size)
        if args.repeats < 1 or args.warmup < 0:
            raise ValueError("--repeats must be >= 1 and --warmup >= 0")
        device = select_device(args.device)
        if device.type not in ("cpu", "cuda"):
            raise ValueError(f"device must be cpu or cuda, not {args.device!r}")
        if args.threads is not None:
            if args.threads < 1:
                raise ValueError("--threads must be >= 1")
            torch.set_num_threads(args.threads)
        if args.weights:
            model = load_model(args.weights)
            if (args.model and model.arch_name != args.model.lower()) or (args.scale and model.scale != args.scale):
                raise ValueError(f"{args.weights}: holds {model.arch_name} x{model.scale}, "
                                 f"not {args.model or model.arch_name} x{args.scale or model.scale}")
        elif not args.model or not args.scale:
            raise ValueError("give --model NAME and --scale S, or --weights PATH")
        else:
            model = _named_model(args.model, args.scale)
        result = profile_model(model, size, device=device, dtype=args.dtype, repeats=args.repeats,
                               warmup=args.warmup, name=(args.model or model.arch_name).lower(),
                               time_it=not args.count_only,
                               compile=args.compile)
    except (ValueError, KeyError, TypeError, CheckpointError, RuntimeError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"error: {msg}", file=sys.stderr)
        return 2

    c = result.cost
    _, _, h, w = c.input_shape
    print(f"{result.model} x{result.scale}: output {c.output_shape[3]}x{c.output_shape[2]} from input {w}x{h}; "
          f"{result.device} {result.dtype}, {result.threads} threads")
    print(f"  parameters                {c.params:,}")
    print(f"  MACs conv+linear          {_g(c.macs)}   (SR papers' usual 'FLOPs')")
    print(f"  MACs paper convention     {_g(c.macs_paper)}   (+ bias adds, 2 x LayerNorm elements)")
    print(f"  MACs with attention       {_g(c.macs_total)}   (= {_g(c.flops)}FLOP)")
    if c.weight_norm_conv:
        print(f"  MACs without WN convs     {_g(c.macs_without_weight_norm)}   (less the {_g(c.weight_norm_conv)}"
              f" of weight-normalised convs: FDIWN's published mult-adds leave those out, its counter "
              f"skipped them)")
    if result.latency_s:
        t = result.latency_s
        print(f"  latency (median of {len(t)})    {result.median_s * 1e3:.1f} ms   "
              f"(min {t[0] * 1e3:.1f}, max {t[-1] * 1e3:.1f})")
        print(f"  achieved                  {result.gflops_per_s:.1f} GFLOP/s")
        if result.peak_memory_bytes is not None:
            what = "max_memory_allocated" if result.device.startswith("cuda") else "peak process RSS"
            print(f"  peak memory               {result.peak_memory_bytes / 2**20:.0f} MiB ({what})")
    if args.json:
        _write_json(Path(args.json), result.as_dict())
    return 0


def _write_json(path: Path, data: dict) -> None:
    from ..io import atomic_write_text
    atomic_write_text(path, json.dumps(data, indent=2) + "\n")
