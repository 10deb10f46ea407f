"""Loads the compiled CUDA extension ``forgetkern._C`` lazily.

A missing or broken build is never an import error: :func:`available` returns ``False`` and
:func:`load_error` says why (``forgetkern.info()`` shows it).
"""
from __future__ import annotations

import importlib
from functools import lru_cache


@lru_cache(maxsize=None)
def _load():
    try:
        return importlib.import_module("forgetkern._C"), None
    except ImportError as exc:  # not built, or built against a missing library
        msg = str(exc)
        if "No module named" in msg:
            msg = "not built (install with nvcc on PATH, or see README 'CUDA extension')"
        return None, msg
    except Exception as exc:  # pragma: no cover - a broken binary
        return None, f"failed to load: {type(exc).__name__}: {exc}"


def extension():
    """The loaded ``forgetkern._C`` module, or ``None``."""
    return _load()[0]


def available() -> bool:
    """Whether ``forgetkern._C`` loaded."""
    return _load()[0] is not None


def load_error() -> str | None:
    """Why ``forgetkern._C`` did not load, or ``None`` if it did."""
    return _load()[1]
