"""Engine: training (typed configs, the loop, checkpoints, resuming), inference strategies
and benchmark evaluation."""
from .config import Config, ConfigError, load_config, packaged_configs
from .infer import make_forward, self_ensemble, tile_starts, tiled_forward
from .train import TrainError, TrainResult, Trainer, train

__all__ = ["Config", "ConfigError", "load_config", "packaged_configs", "train", "Trainer", "TrainResult",
           "TrainError", "make_forward", "self_ensemble", "tile_starts", "tiled_forward"]
