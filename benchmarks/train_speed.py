"""Training speed (iterations/s) of a network on this machine: forward + L1 + backward + AdamW step.

    python3 benchmarks/train_speed.py                       # ASID x2, batch 16, 64x64 LR patches, CPU
    python3 benchmarks/train_speed.py --batch 16 --patch 48 --threads 2 --variants fp32 bf16 channels_last
    python3 benchmarks/train_speed.py --data ../shared/data/train_photos   # + the data pipeline (hr_folder)

Synthetic batches by default (the network's cost alone); with --data, batches come from the
training data pipeline (decoded photos and their LR cached in memory), as in a real run.
Prints a Markdown table.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from distillsr.registry import create_model  # noqa: E402


def measure(arch, scale, batch, patch, variant, iters, warmup, device, loader=None):
    torch.manual_seed(0)
    model = create_model(arch, scale).to(device)
    mf = torch.channels_last if variant == "channels_last" else torch.contiguous_format
    model = model.to(memory_format=mf).train()
    opt = torch.optim.AdamW(model.parameters(), lr=5e-4, weight_decay=1e-4)
    amp = torch.bfloat16 if variant == "bf16" else None
    x = torch.rand(batch, 3, patch, patch, device=device).contiguous(memory_format=mf)
    y = torch.rand(batch, 3, patch * scale, patch * scale, device=device).contiguous(memory_format=mf)
    it = iter(loader) if loader is not None else None

    def step():
        nonlocal x, y
        if it is not None:
            lr_u8, hr_u8 = next(it)
            x = lr_u8.to(device).float().div_(255).contiguous(memory_format=mf)
            y = hr_u8.to(device).float().div_(255).contiguous(memory_format=mf)
        with torch.autocast(device.type, dtype=amp, enabled=amp is not None):
            out = model(x)
        loss = F.l1_loss(out.float(), y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    for _ in range(warmup):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    t = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return iters / (time.perf_counter() - t)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--arch", default="asid")
    p.add_argument("--scale", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--patch", type=int, nargs="+", default=[64])
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--iters", type=int, default=10)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--device", default="cpu")
    p.add_argument("--variants", nargs="+", default=["fp32"], choices=["fp32", "bf16", "channels_last"])
    p.add_argument("--data", help="a folder of HR images: feed the steps from the training data pipeline")
    p.add_argument("--data-only", action="store_true",
                   help="with --data: time the data pipeline alone (batches/s, no network)")
    a = p.parse_args(argv)
    torch.set_num_threads(a.threads)
    device = torch.device(a.device)
    print(f"torch {torch.__version__}, {a.threads} threads, device {device}, "
          f"{'data pipeline: ' + a.data if a.data else 'synthetic batches'}")
    print("| network | scale | batch | LR patch | variant | it/s | patches/s |")
    print("|---|---|---|---|---|---|---|")
    for patch in a.patch:
        loader = None
        if a.data:
            from distillsr.data.train_data import PairStore, PatchDataset, build_train_loader, find_pairs
            t = time.perf_counter()
            store = PairStore(find_pairs("hr_folder", a.data, a.scale), a.scale).prepare(patch, log=lambda m: None)
            print(f"data: {len(store)} images decoded and their LR made in {time.perf_counter() - t:.1f} s "
                  f"({store.nbytes() / 2 ** 20:.0f} MiB in memory)")
            ds = PatchDataset(store, patch, seed=0)
            loader = build_train_loader(ds, a.batch, 0, a.iters + a.warmup + 1)
            if a.data_only:
                n = 200
                t = time.perf_counter()
                for _ in build_train_loader(ds, a.batch, 0, n):
                    pass
                bps = n / (time.perf_counter() - t)
                print(f"| data pipeline only | x{a.scale} | {a.batch} | {patch}x{patch} | - | {bps:.1f} | "
                      f"{bps * a.batch:.0f} |", flush=True)
                continue
        for v in a.variants:
            if loader is not None:
                ds_loader = build_train_loader(ds, a.batch, 0, a.iters + a.warmup + 1)
            ips = measure(a.arch, a.scale, a.batch, patch, v, a.iters, a.warmup, device,
                          ds_loader if loader is not None else None)
            print(f"| {a.arch} | x{a.scale} | {a.batch} | {patch}x{patch} | {v} | {ips:.3f} | {ips * a.batch:.1f} |",
                  flush=True)


if __name__ == "__main__":
    main()
