"""Atomic file writes, shared by everything forgetkern writes to disk (adapter files, cache
manifests, the command line's outputs): the content goes to a temporary file in the destination's
directory, which replaces the destination (``os.replace``) only once it is complete, so a crash
leaves the old file or none, never half of a new one."""
from __future__ import annotations

import contextlib
import os
import uuid
from pathlib import Path


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path in ``path``'s directory; on a normal exit it replaces ``path``, on an
    exception it is removed and ``path`` is left as it was. For writers that take a file name
    (``torch.save``, ``safetensors``, ``numpy.save``)."""
    path = Path(path)
    # a fresh name ending in the destination's own (writers such as numpy.save add a suffix they
    # miss); not mkstemp, whose file keeps mode 0600 instead of the umask's
    tmp = path.parent / f".tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}-{path.name}"
    try:
        yield Path(tmp)
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise


@contextlib.contextmanager
def atomic_open(path, mode: str = "w", **kwargs):
    """``open(path, mode)`` whose content appears at ``path`` only when the ``with`` block ends
    without an exception (:func:`atomic_path`)."""
    with atomic_path(path) as tmp, open(tmp, mode, **kwargs) as f:
        yield f


def write_text(path, text: str) -> None:
    """Write ``text`` to ``path`` atomically."""
    with atomic_open(path, "w") as f:
        f.write(text)
