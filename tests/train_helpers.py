"""Small things the training tests share: a tiny registered network and tiny datasets."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from distillsr.models.base import SRNet
from distillsr.registry import list_models, register_model

TINY = "tiny-sr-test"


class TinySR(SRNet):
    """conv -> ReLU -> conv -> pixel shuffle, plus a bilinear skip: learns fast, runs fast."""

    def __init__(self, scale: int, channels: int = 8):
        super().__init__()
        self.scale = scale
        self.head = nn.Conv2d(3, channels, 3, padding=1)
        self.body = nn.Conv2d(channels, channels, 3, padding=1)
        self.tail = nn.Conv2d(channels, 3 * scale * scale, 3, padding=1)
        self.up = nn.PixelShuffle(scale)

    def forward_native(self, x):
        base = nn.functional.interpolate(x, scale_factor=self.scale, mode="bilinear", align_corners=False)
        f = torch.relu(self.head(x))
        f = torch.relu(self.body(f)) + f
        return base + self.up(self.tail(f))


if TINY not in list_models():
    @register_model(TINY, scales=(2, 3, 4), description="test-only network")
    def _tiny(scale, channels: int = 8):
        return TinySR(scale, channels)


def smooth_image(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """A random image with structure at several scales (so SR is learnable), uint8 HxWx3."""
    img = np.zeros((h, w, 3), np.float64)
    yy, xx = np.mgrid[0:h, 0:w]
    for _ in range(6):
        fy, fx = rng.uniform(0.02, 0.4, 2)
        ph = rng.uniform(0, 2 * np.pi, 3)
        amp = rng.uniform(20, 50, 3)
        for c in range(3):
            img[..., c] += amp[c] * np.sin(fy * yy + fx * xx + ph[c])
    img = 128 + img / 2
    return np.clip(img, 0, 255).astype(np.uint8)


def make_paired(root: Path, n: int = 6, size: int = 48, scale: int = 2, seed: int = 0):
    """HR images in root/HR and bicubic (PIL, for test data only) LR in root/LR."""
    from PIL import Image
    rng = np.random.default_rng(seed)
    (root / "HR").mkdir(parents=True, exist_ok=True)
    (root / "LR").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        hr = smooth_image(rng, size, size)
        Image.fromarray(hr).save(root / "HR" / f"img{i:02d}.png")
        lr = Image.fromarray(hr).resize((size // scale, size // scale), Image.BICUBIC)
        lr.save(root / "LR" / f"img{i:02d}x{scale}.png")
    return root / "HR", root / "LR"


def tiny_config(tmp: Path, data_root: Path, **over):
    """Overrides for a tiny, fast CPU run on make_paired data."""
    base = {
        "name": "run", "out_dir": str(tmp / "runs"), "seed": 3,
        "model.arch": TINY, "model.scale": 2,
        "data.kind": "paired", "data.root": str(data_root / "HR"), "data.lr_root": str(data_root / "LR"),
        "data.patch_size": 12, "data.batch_size": 4, "data.num_workers": 0,
        "optim.name": "adamw", "optim.lr": 2e-3, "optim.weight_decay": 1e-4,
        "sched.name": "step", "sched.milestones": [0.5],
        "train.iters": 8, "train.log_every": 2, "train.ckpt_every": 4, "train.ema_decay": 0.9,
        "train.progress": "none", "train.tensorboard": False, "train.device": "cpu",
    }
    base.update(over)
    return [f"{k}={v}" for k, v in base.items()]
