"""Built-in architectures; importing this package registers them."""
from .base import SRNet  # noqa: F401
from . import asid, fdiwn, rfdn  # noqa: F401
