"""Validation during training: Y-channel PSNR / SSIM on a benchmark set (the papers' protocol),
computed as ``distillsr eval`` computes them (the same quantiser, scores and means)."""
from __future__ import annotations

from typing import List, Sequence, Tuple

import numpy as np
import torch

from ..metrics import mean_scores, to_uint8

__all__ = ["evaluate_pairs"]


def _scores(sr: np.ndarray, hr: np.ndarray, scale: int, ssim_variant: str) -> Tuple[float, float]:
    from ..metrics import psnr_ssim  # Y channel, crop = scale; greyscale HR: the 'replicate' convention
    p, s = psnr_ssim(sr, hr, crop=scale, ssim_variant=ssim_variant)
    return float(p), float(s)


@torch.no_grad()
def evaluate_pairs(model: torch.nn.Module, pairs: Sequence[Tuple[str, np.ndarray, np.ndarray]], scale: int,
                   device: torch.device, ssim_variant: str = "matlab",
                   channels_last: bool = False) -> Tuple[float, float, List[Tuple[str, float, float]]]:
    """Whole-image inference on every (name, LR, HR) uint8 pair; mean PSNR, mean SSIM (Y channel,
    ``scale`` border pixels cut, via :func:`distillsr.metrics.psnr_ssim`) and per-image scores."""
    from ..kernels import is_prepared, prepare_for_inference, restore_paper_modules
    was_training, was_prepared = model.training, is_prepared(model)
    prepare_for_inference(model)  # eval mode, fused CPU kernels; undone below
    rows = []
    try:
        for name, lr, hr in pairs:
            if lr.ndim == 2 or lr.shape[2] == 1:  # greyscale test image: replicated to RGB
                lr = np.repeat(lr.reshape(lr.shape[0], lr.shape[1], 1), 3, axis=2)
            x = torch.from_numpy(np.ascontiguousarray(lr)).permute(2, 0, 1)[None].to(device).float().div_(255)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            sr = to_uint8(model(x)[0].permute(1, 2, 0))  # as distillsr eval: metrics.quantise
            if sr.shape[:2] != hr.shape[:2]:
                raise RuntimeError(f"validation image {name}: output {sr.shape} does not match HR {hr.shape}")
            p, s = _scores(sr, hr, scale, ssim_variant)
            rows.append((name, p, s))
    finally:
        if not was_prepared:
            restore_paper_modules(model)
        model.train(was_training)
    mean = mean_scores((r[1], r[2]) for r in rows)  # the means distillsr eval reports
    return mean["psnr"], mean["ssim"], rows
