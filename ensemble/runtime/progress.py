"""Progress: a tqdm bar on a terminal, a log line every few seconds anywhere else.

Off a terminal (a Slurm log, a pipe, CI) tqdm's carriage-return redraws pile up as one long
line per update (a default run wrote 230 KB of them); a log line at a fixed interval reads
well in a file and keeps its timestamp.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any

from tqdm.auto import tqdm

logger = logging.getLogger("ensemble.progress")

LOG_INTERVAL_S = 10.0
"""Seconds between two progress lines off a terminal (the last update is always written)."""


def progress(
    iterable: Iterable | None = None,
    *,
    total: int,
    desc: str,
    unit: str,
    initial: int = 0,
    disable: bool = False,
) -> Any:
    """A tqdm bar when standard error is a terminal, else a :class:`LogProgress` (same use:
    iterate over it, or ``update``/``set_postfix`` it inside ``with``)."""
    if disable or _on_terminal():
        return tqdm(iterable, total=total, initial=initial, desc=desc, unit=unit, disable=disable)
    return LogProgress(iterable, total=total, desc=desc, unit=unit, initial=initial)


def _on_terminal() -> bool:
    return hasattr(sys.stderr, "isatty") and sys.stderr.isatty()


class LogProgress:
    """The few tqdm methods the package uses, reported as log lines of the form
    ``member-0 (seed 42): 120/540 steps (22%), 3.1 steps/s, 2 min 15 s left, loss=5.2``."""

    def __init__(self, iterable: Iterable | None, total: int, desc: str, unit: str, initial: int = 0) -> None:
        self.iterable, self.total, self.desc, self.unit = iterable, total, desc, unit
        self.n = self.start_n = initial
        self.postfix = ""
        self.started = self.logged_at = time.monotonic()
        self.logged_n = initial

    def __iter__(self) -> Iterator:
        for item in self.iterable if self.iterable is not None else ():
            yield item
            self.update(1)
        self.close()

    def __enter__(self) -> LogProgress:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def update(self, n: int = 1) -> None:
        self.n += n
        now = time.monotonic()
        if now - self.logged_at >= LOG_INTERVAL_S or self.n == self.total:
            self._log(now)

    def set_postfix(self, **values: Any) -> None:
        self.postfix = ", ".join(f"{k}={v}" for k, v in values.items())

    def close(self) -> None:
        if self.n != self.logged_n:
            self._log(time.monotonic())

    def _log(self, now: float) -> None:
        self.logged_at, self.logged_n = now, self.n
        done = self.n - self.start_n
        rate = done / (now - self.started) if now > self.started else 0.0
        parts = [f"{self.n}/{self.total} {self.unit}s ({100 * self.n / max(self.total, 1):.0f}%)"]
        if rate > 0:
            parts.append(f"{rate:.3g} {self.unit}s/s")
            if self.n < self.total:
                parts.append(f"{_duration((self.total - self.n) / rate)} left")
        if self.postfix:
            parts.append(self.postfix)
        logger.info("%s: %s", self.desc, ", ".join(parts))


def _duration(seconds: float) -> str:
    minutes, s = divmod(round(seconds), 60)
    return f"{minutes} min {s} s" if minutes else f"{s} s"
