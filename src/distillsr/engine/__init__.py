"""Engines: inference (tiling), upscaling of image files, training."""
