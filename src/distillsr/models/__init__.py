"""Built-in architectures; importing this package registers them."""
import importlib

from .base import SRNet  # noqa: F401

for _family in ("asid", "rfdn", "fdiwn"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # pragma: no cover - a family not yet added
        if e.name != f"{__name__}.{_family}":
            raise
