"""Inference (and training) speed on this machine, measured side by side in one run.

    python3 benchmarks/inference.py                              # everything (slow on 2 cores)
    python3 benchmarks/inference.py --models asid --scales 4 --repeats 3
    python3 benchmarks/inference.py --rows asid:4:fast,asid:4:plain --threads 1
    python3 benchmarks/inference.py --raw                        # the call as a user embeds it

``--raw`` measures ASID x2 and x4 at a 1280x720 output called as a program that embeds
the library calls it, each in a fresh process with the environment's allocator settings
(``MALLOC_*`` variables removed, no ``tune_cpu_allocator``)::

    m = distillsr.prepare_for_inference(distillsr.create_model("asid", s).eval())
    with torch.inference_mode():
        m(x)

against the best of 6 runs of a 2048^3 ``torch.mm`` in the same process (3 before the
model's runs, 3 after), next to the paper model (no preparation) for reference, with the
page faults per call and the largest difference from the ASID fixtures (``--fixtures``).

Each row runs in a fresh worker process (so that peak memory is that row's), which
measures the machine's fp32 sgemm rate (2048^3 matrix product) interleaved with the
model's runs: "% sgemm" is achieved GFLOP/s over that rate, both medians from the same
minutes. FLOPs count every conv, linear and attention matmul (2 x MACs, see
``distillsr.engine.profile``) for a 1280x720 output (x3: 1281x720).

Implementations:
  fast   distillsr's model after ``prepare_for_inference()`` (NHWC, algebraic merges,
         fused C kernels and oneDNN post-ops on the CPU, its workspace; the default
         allocator), as the CLI runs it
  paper  distillsr's model without preparation (its paper modules, NHWC, op by op;
         allocator tuned): what training and export run
  plain  benchmarks/asid_plain.py: the release's way (NCHW, rearrange copies), same
         weights and outputs, default allocator
  onnx   the exported graph (distillsr export) in onnxruntime
Also: ASID x4 at a 3840x2160 output with tiled inference (engine.infer.tiled_forward),
and training iterations/s of ASID x2 (fast path vs the plain forward).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
SRC = HERE.parent / "src"
ASID_SCALES = {"asid": (2, 3, 4), "asid-d8": (4,)}
CNN = ("rfdn", "e-rfdn", "fdiwn", "fdiwn-m")


# ----------------------------------------------------------------------------- worker side
def _setup(threads):
    sys.path[:0] = [str(SRC), str(HERE)]
    import torch
    if threads:
        torch.set_num_threads(threads)
    return torch


def _sgemm_once(torch, a, b):
    t = time.perf_counter()
    torch.mm(a, b)
    return 2 * a.shape[0] ** 3 / (time.perf_counter() - t) / 1e9


def _interleaved(torch, fn, repeats, warmup):
    """Model times and sgemm rates, alternating, after warm-up."""
    n = 2048
    a, b = torch.randn(n, n), torch.randn(n, n)
    with torch.inference_mode():
        torch.mm(a, b)
        for _ in range(warmup):
            fn()
        times, rates = [], []
        for _ in range(repeats):
            rates.append(max(_sgemm_once(torch, a, b) for _ in range(2)))
            t = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t)
        rates.append(max(_sgemm_once(torch, a, b) for _ in range(2)))
    return sorted(times), rates


def worker_infer(spec):
    torch = _setup(spec["threads"])
    import distillsr
    from distillsr.engine.profile import count_cost, input_size_for_output, peak_memory, tune_cpu_allocator
    name, scale, impl = spec["model"], spec["scale"], spec["impl"]
    if impl == "paper":
        tune_cpu_allocator()
    torch.manual_seed(0)
    model = distillsr.create_model(name, scale).eval()
    out_w, out_h = spec["size"]
    w, h = input_size_for_output(out_w, out_h, scale)
    cost = count_cost(model, (1, 3, h, w))
    x = torch.rand(1, 3, h, w)
    rss0 = _rss()
    if impl == "fast":
        model.prepare_for_inference()
        fn = lambda: model(x)  # noqa: E731
    elif impl == "paper":
        fn = lambda: model(x)  # noqa: E731
    elif impl == "plain":
        import asid_plain
        fn = lambda: asid_plain.forward(model, x)  # noqa: E731
    elif impl == "onnx":
        from distillsr.engine.onnx_backend import OnnxModel, cached_export
        runner = OnnxModel(cached_export(model), threads=torch.get_num_threads())
        fn = lambda: runner(x)  # noqa: E731
    else:
        raise ValueError(impl)
    if spec.get("tiled"):
        from distillsr.engine.infer import tiled_forward
        tile, overlap = spec["tiled"]
        fn = lambda: tiled_forward(model, x, scale, tile, overlap)  # noqa: E731
    times, rates = _interleaved(torch, fn, spec["repeats"], spec["warmup"])
    with torch.inference_mode():
        peak = peak_memory(fn)
    med_t, med_r = statistics.median(times), statistics.median(rates)
    return {"model": name, "scale": scale, "impl": impl, "threads": torch.get_num_threads(),
            "input": [w, h], "output": list(cost.output_shape[2:][::-1]), "flops": cost.flops,
            "macs": cost.macs, "times": times, "median_s": med_t, "sgemm_gflops": rates,
            "sgemm_median": med_r, "gflops": cost.flops / med_t / 1e9,
            "pct_sgemm": 100 * cost.flops / med_t / 1e9 / med_r, "peak_rss": peak, "rss_before": rss0,
            "tiled": spec.get("tiled")}


def worker_raw(spec):
    """One ``--raw`` row: the model called as a user's program calls it (see the doc)."""
    torch = _setup(spec["threads"])
    import resource
    import distillsr
    scale, impl, (out_w, out_h) = spec["scale"], spec["impl"], spec["size"]
    if impl == "tuned":  # for comparison: the glibc settings the CLI used to make
        from distillsr.engine.profile import tune_cpu_allocator
        tune_cpu_allocator()
    torch.manual_seed(0)
    model = distillsr.create_model("asid", scale).eval()
    if impl in ("fast", "tuned"):
        model = distillsr.prepare_for_inference(model)
    from distillsr.engine.profile import count_cost, input_size_for_output
    w, h = input_size_for_output(out_w, out_h, scale)
    x = torch.rand(1, 3, h, w)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    rates = [_sgemm_once(torch, a, b) for _ in range(3)]
    times, faults = [], []
    with torch.inference_mode():
        for i in range(spec["warmup"] + spec["repeats"]):
            f0 = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
            t = time.perf_counter()
            y = model(x)
            if i >= spec["warmup"]:
                times.append(time.perf_counter() - t)
                faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - f0)
    rates += [_sgemm_once(torch, a, b) for _ in range(3)]
    torch.save(y, spec["out"])
    flops = count_cost(distillsr.create_model("asid", scale), (1, 3, h, w)).flops
    peak = max(rates)
    result = {"model": "asid", "scale": scale, "impl": impl, "threads": torch.get_num_threads(),
              "input": [w, h], "output": list(y.shape[2:][::-1]), "flops": flops, "times": sorted(times),
              "best_s": min(times), "median_s": statistics.median(times), "sgemm_gflops": rates,
              "peak_gflops": peak, "ratio_best": flops / min(times) / 1e9 / peak,
              "ratio_median": flops / statistics.median(times) / 1e9 / peak,
              "faults_per_call": statistics.median(faults),
              "malloc_env": sorted(k for k in os.environ if k.startswith("MALLOC_"))}
    if spec.get("fixtures"):
        result["fixture_diff"] = _fixture_diff(torch, distillsr, Path(spec["fixtures"]), scale, impl)
    return result


def _fixture_diff(torch, distillsr, folder, scale, impl):
    """Largest |output - fixture| of the official random ASID x``scale`` on both fixture
    inputs, called twice each (the second call on the first one's workspace buffers, which
    here are used for maps of every size)."""
    import numpy as np
    from distillsr.kernels import workspace
    model = distillsr.load_model(folder / f"asid_x{scale}_official_random.pth")
    if impl != "paper":
        distillsr.prepare_for_inference(model)
    workspace.MIN_BYTES, diff = 0, 0.0
    with torch.inference_mode():
        for inp, out in [("input_37x45.npy", f"asid_x{scale}_out_37x45.npy"),
                         ("input_b2_24x32.npy", f"asid_x{scale}_out_b2_24x32.npy")]:
            x, ref = (torch.from_numpy(np.load(folder / n)) for n in (inp, out))
            for _ in range(2):
                diff = max(diff, (model.forward_native(x) - ref).abs().max().item())
    return diff


def worker_export(spec):
    """Export (or find in the cache) the ONNX file of a row, apart from the timed worker."""
    torch = _setup(spec["threads"])
    import distillsr
    from distillsr.engine.onnx_backend import cached_export
    torch.manual_seed(0)
    t = time.perf_counter()
    path = cached_export(distillsr.create_model(spec["model"], spec["scale"]).eval())
    return {"path": str(path), "seconds": time.perf_counter() - t}


def worker_train(spec):
    torch = _setup(spec["threads"])
    import distillsr
    import torch.nn.functional as F
    from distillsr.engine.profile import tune_cpu_allocator
    impl, batch, iters = spec["impl"], spec["batch"], spec["repeats"]
    if impl != "plain":
        tune_cpu_allocator()
    torch.manual_seed(0)
    model = distillsr.create_model("asid", 2).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, betas=(0.9, 0.999), weight_decay=1e-4)
    x = torch.rand(batch, 3, 64, 64)
    y = torch.rand(batch, 3, 128, 128)
    if impl == "plain":
        import asid_plain
        forward = lambda inp: asid_plain.forward(model, inp)  # noqa: E731
    else:
        forward = model

    def step():
        opt.zero_grad(set_to_none=True)
        loss = F.l1_loss(forward(x), y)
        loss.backward()
        opt.step()

    for _ in range(spec["warmup"]):
        step()
    times = []
    for _ in range(iters):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    med = statistics.median(times)
    return {"impl": impl, "batch": batch, "threads": torch.get_num_threads(), "times": sorted(times),
            "median_s": med, "iters_per_s": 1 / med}


def _rss():
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError):
        return None


# ----------------------------------------------------------------------------- driver side
def run_worker(spec, omp_wait="", timeout=3600):
    cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", json.dumps(spec)]
    env = dict(os.environ, PYTHONPATH=str(SRC))
    if spec.get("raw"):  # the allocator as a user's program gets it
        env = {k: v for k, v in env.items() if not k.startswith("MALLOC_")}
    if omp_wait:
        env["OMP_WAIT_POLICY"] = omp_wait
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        tail = (proc.stderr or proc.stdout).strip().splitlines()[-3:]
        return {"error": " | ".join(tail), **spec}
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _mb(n):
    return "-" if n is None else f"{n / 2**20:,.0f}"


def _load():
    try:
        return os.getloadavg()
    except OSError:
        return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="asid,asid-d8,cnn",
                   help="comma list: asid, asid-d8, cnn (all CNN models present), or model names")
    p.add_argument("--scales", default=None, help="comma list of scales for asid (default 2,3,4)")
    p.add_argument("--impls", default="fast,plain,onnx", help="comma list of fast, paper, plain, onnx")
    p.add_argument("--rows", default=None, help="explicit rows model:scale:impl,... (overrides the above)")
    p.add_argument("--repeats", type=int, default=3, help="timed runs per row (median)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--size", default="1280x720", help="output size (default 1280x720)")
    p.add_argument("--train-batch", type=int, default=16, help="training benchmark batch (0: skip)")
    p.add_argument("--train-iters", type=int, default=3)
    p.add_argument("--no-4k", action="store_true", help="skip the tiled 3840x2160 x4 row")
    p.add_argument("--tile", type=int, default=256, help="LR tile side for the 4K row (default 256)")
    p.add_argument("--omp-wait", default="",
                   help="OMP_WAIT_POLICY of the workers (default '': the environment's, what users get; "
                        "PASSIVE helps on a busy shared machine, where spinning OpenMP threads wait "
                        "for descheduled ones at every op)")
    p.add_argument("--raw", action="store_true",
                   help="only the raw-call rows: ASID x2 and x4 as a user's program calls them (see above)")
    p.add_argument("--raw-repeats", type=int, default=5, help="timed calls per --raw row (default 5)")
    p.add_argument("--raw-tuned", action="store_true",
                   help="--raw also times the prepared model after tune_cpu_allocator() (glibc settings)")
    p.add_argument("--fixtures", default=str(HERE.parent.parent / "shared" / "fixtures" / "asid"),
                   help="ASID fixtures folder for --raw's equality check (default ../shared/fixtures/asid)")
    p.add_argument("--json", help="write all results as JSON")
    p.add_argument("--worker", help=argparse.SUPPRESS)
    args = p.parse_args(argv)

    if args.worker:
        spec = json.loads(args.worker)
        kind = ("train" if spec.get("train") else "export" if spec.get("export") else
                "raw" if spec.get("raw") else "infer")
        result = {"train": worker_train, "export": worker_export, "infer": worker_infer,
                  "raw": worker_raw}[kind](spec)
        print(json.dumps(result))
        return 0

    sys.path[:0] = [str(SRC)]
    import distillsr
    from distillsr.engine.profile import parse_size
    size = parse_size(args.size)
    if args.raw:
        return raw(args, size)
    known = set(distillsr.list_models())
    impls = [i for i in args.impls.split(",") if i]
    rows = []
    if args.rows:
        for r in args.rows.split(","):
            m, s, i = r.split(":")
            rows.append((m, int(s), i))
    else:
        for m in [m.strip() for m in args.models.split(",") if m.strip()]:
            if m == "cnn":
                rows += [(c, 4, "fast") for c in CNN if c in known]
                continue
            if m not in known:
                print(f"skipping {m}: not in this build", file=sys.stderr)
                continue
            scales = ([int(s) for s in args.scales.split(",")] if args.scales and m == "asid"
                      else ASID_SCALES.get(m, (4,)))
            for s in scales:
                rows += [(m, s, i) for i in impls if i != "plain" or m in ASID_SCALES]
    load0 = _load()
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads "
          f"{args.threads or 'default'}, OMP_WAIT_POLICY={args.omp_wait or os.environ.get('OMP_WAIT_POLICY')}, "
          f"load average at start {load0}", flush=True)
    results = []
    for m, s, i in rows:
        spec = {"model": m, "scale": s, "impl": i, "threads": args.threads, "repeats": args.repeats,
                "warmup": args.warmup, "size": list(size)}
        if i == "onnx":
            e = run_worker({**spec, "export": True}, args.omp_wait)
            if "error" in e:
                print(f"{m} x{s} export: ERROR {e['error']}", flush=True)
            elif e["seconds"] > 1:
                print(f"exported {m} x{s} to {e['path']} in {e['seconds']:.0f} s", flush=True)
        results.append(run_worker(spec, args.omp_wait))
        _print_row(results[-1])
    if not args.no_4k and "asid" in known:
        spec = {"model": "asid", "scale": 4, "impl": "fast", "threads": args.threads, "repeats": 1,
                "warmup": 0, "size": [3840, 2160], "tiled": [args.tile, 24]}
        results.append(run_worker(spec, args.omp_wait))
        _print_row(results[-1])
    train = []
    if args.train_batch:
        for i in ("fast", "plain"):
            spec = {"train": True, "impl": i, "threads": args.threads, "batch": args.train_batch,
                    "repeats": args.train_iters, "warmup": 1}
            train.append(run_worker(spec, args.omp_wait))
            t = train[-1]
            if "error" in t:
                print(f"train {i}: ERROR {t['error']}", flush=True)
            else:
                print(f"train ASID x2 {i:5s} batch {t['batch']} 64x64: {t['iters_per_s']:.3f} it/s "
                      f"({t['median_s']:.2f} s/it)", flush=True)
    print(f"# load average at end {_load()}")
    print()
    print(markdown(results, train))
    if args.json:
        Path(args.json).write_text(json.dumps({"load_start": load0, "load_end": _load(), "rows": results,
                                               "train": train}, indent=1))
    return 0


def raw(args, size):
    """The ``--raw`` rows, each in a fresh process; prints them and a markdown table."""
    import tempfile
    import torch
    fixtures = args.fixtures if Path(args.fixtures).is_dir() else None
    print(f"# {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, threads "
          f"{args.threads or 'default'}, load average at start {_load()}", flush=True)
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in (2, 4):
            outs = {}
            for impl in ("fast", "paper") + (("tuned",) if args.raw_tuned else ()):
                out = str(Path(tmp) / f"x{scale}_{impl}.pt")
                spec = {"raw": True, "scale": scale, "impl": impl, "threads": args.threads, "size": list(size),
                        "repeats": args.raw_repeats if impl != "paper" else max(2, args.raw_repeats // 2),
                        "warmup": 1, "out": out, "fixtures": fixtures}
                r = run_worker(spec)
                results.append(r)
                if "error" in r:
                    print(f"asid x{scale} {impl}: ERROR {r['error']}", flush=True)
                    continue
                if impl != "tuned":
                    outs[impl] = torch.load(out)
                print(f"asid x{scale} {impl:5s}: best {r['best_s']:.3f} s, median {r['median_s']:.3f} s, "
                      f"sgemm peak {r['peak_gflops']:.1f} GFLOP/s -> {r['ratio_best']:.2f} of it "
                      f"(median {r['ratio_median']:.2f}), {r['faults_per_call']:,.0f} page faults/call, "
                      f"fixtures {_diff(r.get('fixture_diff'))}", flush=True)
            if len(outs) == 2:
                d = (outs["fast"] - outs["paper"]).abs().max().item()
                next(r for r in results if r.get("scale") == scale and r.get("impl") == "fast")["vs_paper"] = d
                print(f"asid x{scale}: prepared vs paper output at {size[0]}x{size[1]}: max |diff| {d:.1e}")
    print(f"# load average at end {_load()}")
    print()
    print(raw_markdown(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"rows": results}, indent=1))
    ok = all("error" not in r and (r.get("fixture_diff") is None or r["fixture_diff"] <= 2e-6) for r in results)
    return 0 if ok else 1


def _diff(d):
    return "not checked" if d is None else f"max |diff| {d:.1e} ({'<=' if d <= 2e-6 else '>'} 2e-6)"


def raw_markdown(results):
    lines = ["| model | output | call | threads | best (s) | median (s) | sgemm peak GFLOP/s | "
             "best / peak | median / peak | page faults per call | fixtures max abs diff |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        call = {"fast": "prepare_for_inference", "paper": "paper model",
                "tuned": "prepare_for_inference + tune_cpu_allocator"}[r["impl"]]
        if "error" in r:
            lines.append(f"| asid x{r['scale']} | | {call} | | error | | | | | | |")
            continue
        fx = "-" if r.get("fixture_diff") is None else f"{r['fixture_diff']:.1e}"
        lines.append(f"| asid x{r['scale']} | {r['output'][0]}x{r['output'][1]} | {call} | {r['threads']} | "
                     f"{r['best_s']:.3f} | {r['median_s']:.3f} | {r['peak_gflops']:.1f} | "
                     f"{r['ratio_best']:.2f} | {r['ratio_median']:.2f} | {r['faults_per_call']:,.0f} | {fx} |")
    return "\n".join(lines)


def _print_row(r):
    if "error" in r:
        print(f"{r['model']} x{r['scale']} {r['impl']}: ERROR {r['error']}", flush=True)
        return
    tiled = f" tiled {r['tiled'][0]}" if r.get("tiled") else ""
    print(f"{r['model']} x{r['scale']} {r['impl']}{tiled} ({r['threads']} thr): {r['median_s']:.3f} s, "
          f"{r['gflops']:.1f} GFLOP/s, sgemm {r['sgemm_median']:.1f} -> {r['pct_sgemm']:.0f}%, "
          f"peak RSS {_mb(r['peak_rss'])} MiB", flush=True)


def markdown(results, train):
    lines = ["| model | output | impl | threads | latency (s) | GFLOP/s | sgemm GFLOP/s | % of sgemm | "
             "speed-up vs plain | peak RSS (MiB) |", "|---|---|---|---|---|---|---|---|---|---|"]
    plain = {(r["model"], r["scale"]): r["median_s"] for r in results
             if "error" not in r and r["impl"] == "plain" and not r.get("tiled")}
    for r in results:
        if "error" in r:
            lines.append(f"| {r['model']} x{r['scale']} | | {r['impl']} | | error | | | | | |")
            continue
        base = plain.get((r["model"], r["scale"]))
        up = f"{base / r['median_s']:.2f}x" if base and not r.get("tiled") else ""
        impl = r["impl"] + (f", tiles {r['tiled'][0]}" if r.get("tiled") else "")
        lines.append(f"| {r['model']} x{r['scale']} | {r['output'][0]}x{r['output'][1]} | {impl} | {r['threads']} | "
                     f"{r['median_s']:.3f} | {r['gflops']:.1f} | {r['sgemm_median']:.1f} | {r['pct_sgemm']:.0f}% | "
                     f"{up} | {_mb(r['peak_rss'])} |")
    if train:
        lines += ["", "| training ASID x2, 64x64 LR | batch | threads | s/iter | iters/s | speed-up |",
                  "|---|---|---|---|---|---|"]
        base = next((t["median_s"] for t in train if t.get("impl") == "plain" and "error" not in t), None)
        for t in train:
            if "error" in t:
                continue
            up = f"{base / t['median_s']:.2f}x" if base else ""
            lines.append(f"| {t['impl']} | {t['batch']} | {t['threads']} | {t['median_s']:.2f} | "
                         f"{t['iters_per_s']:.3f} | {up} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
