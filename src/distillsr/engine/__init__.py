"""Engine: inference strategies and benchmark evaluation."""
from .infer import make_forward, self_ensemble, tile_starts, tiled_forward

__all__ = ["make_forward", "self_ensemble", "tile_starts", "tiled_forward"]
