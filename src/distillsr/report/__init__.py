"""``distillsr report``: the papers' tables and figures regenerated from one command.

``build_report(out, data_root, ...)`` scores models on benchmark sets through
:func:`distillsr.engine.evaluate.evaluate` (the code of ``distillsr eval``), counts and
times them through :mod:`distillsr.engine.profile`, caches every measurement under
``out/cache``, and writes ``out/index.html`` (figures in ``out/figures``) and
``out/results.json``. See ``docs/report.md``.
"""
from .build import build_report, load_literature, parse_crop
from .measure import ReportError

__all__ = ["build_report", "load_literature", "parse_crop", "ReportError"]
