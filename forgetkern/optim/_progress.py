"""Progress bars: tqdm when it is installed, else a plain one-line counter on stderr."""
from __future__ import annotations

import sys


class _Counter:
    """The subset of ``tqdm`` used here: context manager, ``update``, iteration."""

    def __init__(self, iterable=None, *, total=None, desc="", unit="it", disable=False):
        self.iterable = iterable
        self.total = total
        self.desc = desc
        self.unit = unit
        self.disable = disable
        self.n = 0

    def _show(self, end=""):
        if self.disable:
            return
        of = f"/{self.total}" if self.total is not None else ""
        sys.stderr.write(f"\r{self.desc}: {self.n}{of} {self.unit}{end}")
        sys.stderr.flush()

    def update(self, n=1):
        self.n += n
        self._show()

    def close(self):
        self._show(end="\n")
        self.disable = True

    def __enter__(self):
        self._show()
        return self

    def __exit__(self, *exc):
        self.close()
        return False

    def __iter__(self):
        with self:
            for item in self.iterable:
                yield item
                self.update()


def progress(iterable=None, *, total=None, desc="", unit="it", disable=False):
    """``tqdm(iterable, total=, desc=, unit=, disable=)``, or a plain counter without tqdm."""
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return _Counter(iterable, total=total, desc=desc, unit=unit, disable=disable)
    return tqdm(iterable, total=total, desc=desc, unit=unit, disable=disable)
