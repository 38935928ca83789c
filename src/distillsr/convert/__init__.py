"""Converters from the authors' checkpoint layouts to ours (kept apart from the models).

Importing this package registers one recogniser per released format.
"""
from . import asid  # noqa: F401

for _name in ("rfdn", "fdiwn"):
    try:  # pragma: no cover - while a family is being added
        __import__(f"{__name__}.{_name}")
    except ModuleNotFoundError as e:
        if e.name != f"{__name__}.{_name}":
            raise
