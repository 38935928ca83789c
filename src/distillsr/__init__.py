"""distillsr: lightweight single-image super-resolution (ASID, RFDN/E-RFDN, FDIWN/FDIWN-M)."""
from .registry import create_model, list_models, model_info, register_model
from .checkpoint import CheckpointError, load_model, save_model
from . import pretrained, releases
from .pretrained import list_pretrained, load_pretrained
from .api import upscale
from .kernels import prepare_for_inference

__version__ = "0.1.0"

__all__ = ["create_model", "list_models", "model_info", "register_model", "load_model", "save_model",
           "CheckpointError", "pretrained", "releases", "list_pretrained", "load_pretrained", "upscale",
           "prepare_for_inference", "__version__"]
