"""Training engine: typed configs, the training loop, checkpoints and resuming."""
from .config import Config, ConfigError, load_config, packaged_configs
from .train import TrainError, TrainResult, Trainer, train

__all__ = ["Config", "ConfigError", "load_config", "packaged_configs", "train", "Trainer", "TrainResult",
           "TrainError"]
