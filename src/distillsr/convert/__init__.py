"""Converters from the authors' checkpoint layouts to ours (kept apart from the models).

Importing this package registers one recogniser per released format.
"""
import importlib

for _family in ("asid", "rfdn", "fdiwn"):
    try:
        importlib.import_module(f"{__name__}.{_family}")
    except ModuleNotFoundError as e:  # pragma: no cover - a family not yet added
        if e.name != f"{__name__}.{_family}":
            raise
