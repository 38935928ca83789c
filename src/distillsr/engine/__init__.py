"""Inference and training engines (tiling, chop, training loop)."""
