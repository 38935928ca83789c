"""Built-in architectures; importing this package registers them."""
from .base import SRNet  # noqa: F401
from . import asid  # noqa: F401

# The CNN families register themselves when present.
try:  # pragma: no cover - only while a family is being added
    from . import rfdn  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.rfdn":
        raise
try:  # pragma: no cover
    from . import fdiwn  # noqa: F401
except ModuleNotFoundError as e:
    if e.name != f"{__name__}.fdiwn":
        raise
