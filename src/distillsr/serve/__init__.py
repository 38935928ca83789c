"""``distillsr serve``: upscaling over HTTP, with a web page.

:func:`create_app` builds the ASGI app (FastAPI), to run with any ASGI server or mount inside
another app; ``distillsr serve`` runs it with uvicorn. FastAPI, uvicorn and python-multipart
come with the ``serve`` extra (``pip install "distillsr[serve]"``); the rest of the package
works without them.
"""
from __future__ import annotations

__all__ = ["create_app", "ServeDependencyError", "require_serve_deps"]

_NEEDED = (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("multipart", "python-multipart"))


class ServeDependencyError(ImportError):
    """A package of the ``serve`` extra is missing."""


def require_serve_deps(modules=_NEEDED) -> None:
    """Raise :class:`ServeDependencyError` naming the extra when FastAPI, uvicorn or
    python-multipart cannot be imported."""
    import importlib
    missing = []
    for module, package in modules:
        try:
            importlib.import_module(module)
        except ImportError:
            missing.append(package)
    if missing:
        raise ServeDependencyError(f"distillsr serve needs {', '.join(missing)}, which "
                                   f"{'is' if len(missing) == 1 else 'are'} not installed: "
                                   "pip install \"distillsr[serve]\"")


def create_app(*args, **kwargs):
    """The app; see :func:`distillsr.serve.app.create_app` for the arguments."""
    require_serve_deps(_NEEDED[:1] + _NEEDED[2:])  # uvicorn is only needed to run it
    from .app import create_app as _create_app
    return _create_app(*args, **kwargs)
