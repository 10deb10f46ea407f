"""The command line's one argument-validation layer: typed ``argparse`` validators that every
``forgetkern`` subcommand's parser uses, the parser class that turns any error into one line and
exit status 2, and the checks that need more than one argument (:class:`UsageError`).

Each validator is an ``argparse`` ``type=``: it returns the parsed value or raises
``argparse.ArgumentTypeError`` saying what was expected; ``argparse`` prefixes the option's name.
Paths are checked without writing anything: an output path must be creatable (its nearest
existing ancestor a writable folder), never created here.
"""
from __future__ import annotations

import argparse
import json
import math
import os
from pathlib import Path

DTYPES = ("float16", "bfloat16", "float32", "float64")


class UsageError(SystemExit):
    """An input that is not good: ``forgetkern`` prints ``<prog>: error: <message>`` (one line)
    and exits with status 2. ``str()`` is the message."""

    def __init__(self, message: str, prog: str | None = None):
        super().__init__(2)
        self.message, self.prog = message, prog

    def __str__(self) -> str:
        return self.message


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are :class:`UsageError` (one line, status 2, no usage
    dump); subcommand parsers made by ``add_subparsers`` are of this class too."""

    def error(self, message: str):
        raise UsageError(message, self.prog)


def _fail(what: str, text) -> None:
    raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")


def _int(text) -> int:
    try:
        return int(text)
    except (TypeError, ValueError):
        _fail("an integer", text)


def int_range(low: int | None = None, high: int | None = None):
    """An int in ``[low, high]`` (either bound optional)."""
    what = ("an integer" + (f" >= {low}" if low is not None else "")
            + (f" and <= {high}" if high is not None else ""))

    def parse(text) -> int:
        value = _int(text)
        if (low is not None and value < low) or (high is not None and value > high):
            _fail(what, text)
        return value

    parse.__name__ = "int"
    return parse


positive_int = int_range(1)
nonnegative_int = int_range(0)


def _float(text) -> float:
    try:
        return float(text)
    except (TypeError, ValueError):
        _fail("a number", text)


def finite_float(low: float | None = None, *, strict: bool = False):
    """A finite float ``> low`` (``strict``) or ``>= low``."""
    what = "a finite number" + ("" if low is None else f" {'>' if strict else '>='} {low:g}")

    def parse(text) -> float:
        value = _float(text)
        if not math.isfinite(value) or (low is not None and (value <= low if strict else value < low)):
            _fail(what, text)
        return value

    parse.__name__ = "float"
    return parse


finite_positive_float = finite_float(0.0, strict=True)
finite_nonnegative_float = finite_float(0.0)


def comma_list(item, *, distinct: bool = False, allow_empty: bool = False):
    """Comma-separated values, each parsed by ``item`` (one of the validators above)."""

    def parse(text) -> list:
        words = [w.strip() for w in str(text).split(",") if w.strip()]
        if not words and not allow_empty:
            _fail("a comma-separated list", text)
        values = [item(w) for w in words]
        if distinct and len(set(values)) != len(values):
            _fail("distinct values", text)
        return values

    parse.__name__ = "list"
    return parse


def readable_file(text) -> str:
    """An existing, readable file."""
    path = Path(text)
    if not path.is_file():
        _fail("an existing file", text)
    if not os.access(path, os.R_OK):
        _fail("a readable file", text)
    return str(text)


def _creatable(path: Path) -> bool:
    """Whether ``path`` could be created: its nearest existing ancestor is a writable folder."""
    parent = path.absolute().parent
    while not parent.exists():
        parent = parent.parent
    return parent.is_dir() and os.access(parent, os.W_OK | os.X_OK)


def writable_file(text) -> str:
    """A path a file can be written to (an existing writable file, or a new one in a writable
    place); nothing is created."""
    path = Path(text)
    if path.is_dir():
        _fail("a file path (this is a folder)", text)
    if path.exists() and not os.access(path, os.W_OK):
        _fail("a writable file", text)
    if not path.exists() and not _creatable(path):
        _fail("a path in a writable folder", text)
    return str(text)


def writable_dir(text) -> str:
    """A folder that exists and is writable, or can be created; nothing is created."""
    path = Path(text)
    if path.exists() and not path.is_dir():
        _fail("a folder path (this is a file)", text)
    if path.is_dir() and not os.access(path, os.W_OK | os.X_OK):
        _fail("a writable folder", text)
    if not path.exists() and not _creatable(path):
        _fail("a folder path in a writable place", text)
    return str(text)


def dtype_name(text, *, auto: bool = True) -> str:
    """A torch floating dtype's name (``auto`` too, by default)."""
    names = (("auto",) if auto else ()) + DTYPES
    if text not in names:
        _fail(f"one of {', '.join(names)}", text)
    return text


def device_name(text) -> str:
    """A torch device this machine has: ``cpu``, ``cuda``, ``cuda:N``, ``mps``, ..."""
    import torch

    try:
        device = torch.device(text)
    except (RuntimeError, TypeError):
        _fail("a device name (cpu, cuda, cuda:0, ...)", text)
    if device.type == "cuda":
        count = torch.cuda.device_count()
        if count == 0 or (device.index is not None and device.index >= count):
            _fail(f"a device this machine has ({count} CUDA device(s))", text)
    elif device.type == "mps" and not torch.backends.mps.is_available():
        _fail("a device this machine has (no MPS)", text)
    elif device.type not in ("cpu", "cuda", "mps"):
        _fail("cpu, cuda, cuda:N or mps", text)
    return text


def read_jsonl(path, flag: str) -> list[tuple[int, dict]]:
    """``[(line number, object)]`` of a JSON-lines file (blank lines skipped); a line that is not
    a JSON object is a :class:`UsageError` naming the file and the line."""
    out = []
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise UsageError(f"{flag} {path}: cannot be read ({exc})") from None
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as exc:
            raise UsageError(f"{flag} {path}:{number}: not valid JSON ({exc.msg} at column "
                             f"{exc.colno})") from None
        if not isinstance(record, dict):
            raise UsageError(f"{flag} {path}:{number}: expected a JSON object, got "
                             f"{type(record).__name__}")
        out.append((number, record))
    return out
