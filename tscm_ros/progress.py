"""Progress of long work, for every progress bar of the package: a tqdm bar on a terminal; without one (a
log file, CI, ``make demo``) plain lines instead, at most one every ``PLAIN_INTERVAL_S`` seconds and one when
the stage ends (``leave`` only concerns the terminal's bar), so that logs hold no carriage-return fragments of a
redrawn bar."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

from tqdm import tqdm

PLAIN_INTERVAL_S = 5.0


def _is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


class PlainProgress:
    """The subset of tqdm the package uses (iterate, ``update``, ``set_postfix``, ``close``, ``with``), written
    as whole lines."""

    def __init__(self, iterable: Iterable | None, total: int | None, desc: str, unit: str, stream: TextIO) -> None:
        self._iterable = iterable
        if total is None and iterable is not None and hasattr(iterable, "__len__"):
            total = len(iterable)
        self.total, self.n = total, 0
        self._desc, self._unit, self._stream = desc or "progress", unit, stream
        self._postfix = ""
        self._started = self._printed = time.monotonic()
        self._closed = False

    def __iter__(self) -> Iterator:
        try:
            for item in self._iterable:
                yield item
                self.update()
        finally:
            self.close()

    def __enter__(self) -> PlainProgress:
        return self

    def __exit__(self, *exc_info) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self._printed >= PLAIN_INTERVAL_S:
            self._printed = now
            self._write(now)

    def set_postfix(self, **values: Any) -> None:
        self._postfix = ", ".join(f"{key} {value}" for key, value in values.items())

    def close(self) -> None:
        if not self._closed:
            self._closed = True
            self._write(time.monotonic(), done=True)

    def _write(self, now: float, done: bool = False) -> None:
        elapsed = now - self._started
        count = f"{self.n}/{self.total}" if self.total else str(self.n)
        share = f" ({100 * self.n / self.total:.0f} %)" if self.total and not done else ""
        rate = f", {self.n / elapsed:.1f} {self._unit}/s" if elapsed > 0 and self.n else ""
        postfix = f", {self._postfix}" if self._postfix else ""
        state = "done in" if done else "after"
        print(f"{self._desc}: {count} {self._unit}{share} {state} {elapsed:.1f} s{rate}{postfix}", file=self._stream,
              flush=True)


def progress(iterable: Iterable | None = None, *, total: int | None = None, desc: str = "", unit: str = "it",
             enabled: bool = True, leave: bool = True, stream: TextIO | None = None):
    """A progress bar over ``iterable`` (or updated by hand): tqdm on a terminal, plain lines otherwise, nothing
    when not ``enabled``. ``stream`` defaults to stderr."""
    stream = sys.stderr if stream is None else stream
    if not enabled or _is_terminal(stream):
        return tqdm(iterable, total=total, desc=desc, unit=unit, leave=leave, file=stream, disable=not enabled)
    return PlainProgress(iterable, total, desc, unit, stream)
