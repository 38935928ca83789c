"""Data: MATLAB-compatible bicubic resizing and benchmark test sets."""
from .imresize import imresize, imresize_torch
from .benchmark import (BenchmarkItem, BenchmarkSet, ImageError, degrade_folder, find_sets, make_lr,
                        modcrop, read_image, write_png)

__all__ = ["imresize", "imresize_torch", "BenchmarkItem", "BenchmarkSet", "ImageError", "degrade_folder",
           "find_sets", "make_lr", "modcrop", "read_image", "write_png"]
