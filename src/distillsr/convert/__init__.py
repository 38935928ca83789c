"""Converters from the authors' checkpoint layouts to ours (kept apart from the models).

Importing this package registers one recogniser per released format.
"""
from typing import Optional

import torch


def scale_from_upsampler(weight: torch.Tensor, colours: int = 3) -> Optional[int]:
    """The factor s of the conv that feeds a PixelShuffle(s): its output channels are
    ``colours * s * s``; None when they are not."""
    out = int(weight.shape[0])
    s = round((out / colours) ** 0.5)
    return s if s >= 1 and colours * s * s == out else None


from . import asid, fdiwn, rfdn  # noqa: E402,F401  (after the helper they import)
