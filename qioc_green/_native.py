"""Which hot path is active: the compiled one (``qioc_green._speedups``) or pure Python.

The compiled module is optional: ``pip install .`` builds it where a C compiler and the
Python headers are present, and installs pure Python otherwise.  ``QIOC_PURE_PYTHON=1`` in
the environment selects pure Python at import even where it was built (CI runs the suite both
ways).  Both paths have the same behaviour; ``qioc_green.SPEEDUPS`` and ``hot_path()`` say which
one runs.
"""

from __future__ import annotations

import importlib
import os
from types import ModuleType

speedups: ModuleType | None = None
_why = ""
if os.environ.get("QIOC_PURE_PYTHON", "") not in ("", "0"):
    _why = "QIOC_PURE_PYTHON is set"
else:
    try:
        speedups = importlib.import_module("qioc_green._speedups")
    except ImportError as exc:  # not built here (no compiler at install time)
        _why = f"the compiled module is not built ({exc})"

SPEEDUPS: bool = speedups is not None


def hot_path() -> str:
    """One line saying which hot path runs: ``"compiled (qioc_green._speedups)"`` or
    ``"pure Python: REASON"``."""
    return "compiled (qioc_green._speedups)" if SPEEDUPS else f"pure Python: {_why}"


__all__ = ["SPEEDUPS", "hot_path", "speedups"]
