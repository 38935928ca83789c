"""Converters from the authors' checkpoint layouts to ours (kept apart from the models).

Importing this package registers one recogniser per released format.
"""
from . import asid, fdiwn, rfdn  # noqa: F401
