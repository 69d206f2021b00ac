"""Progress reports: a bar for people, log lines for machines.

``progress`` (the argument of every long-running entry point) picks how a loop reports:

- ``True`` (``"auto"``): a tqdm bar when stderr is a terminal, else log lines (below);
- ``"bar"``: a tqdm bar wherever stderr goes; ``"log"``: log lines; ``False`` (``"off"``): nothing.

Log lines go to the ``gsvr.progress`` logger at INFO, at most one every :data:`HEARTBEAT_S` seconds
("progress: 12/302 it (4%) after 31 s, svr 2/8 ncc 0.912") and one when the loop ends: a Snakemake or SLURM log
gets a few lines per minute instead of a carriage-return update per step.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Iterator, Union

log = logging.getLogger("gsvr.progress")

#: Seconds between two progress lines in a log.
HEARTBEAT_S = 10.0

Progress = Union[bool, str]  #: True/"auto", "bar", "log", False/"off"
MODES = ("auto", "bar", "log", "off")


def progress_mode(progress: Progress) -> str:
    """``"bar"``, ``"log"`` or ``"off"``: how a loop reports (``"auto"``: a bar on a terminal only)."""
    mode = "auto" if progress is True else "off" if progress is False else progress
    if mode not in MODES:
        raise ValueError(f"progress must be True, False or one of {MODES}, got {progress!r}")
    if mode == "auto":
        return "bar" if _is_terminal(sys.stderr) else "log"
    return mode


def _is_terminal(stream) -> bool:
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed stream
        return False


def progress_bar(total: int, *, desc: str, unit: str = "it", progress: Progress = True):
    """A tqdm bar or a :class:`LogProgress` (``progress``: see the module); both take ``update``,
    ``set_postfix_str``, ``set_postfix``, ``close`` and ``with``."""
    mode = progress_mode(progress)
    if mode == "bar":
        from tqdm.auto import tqdm

        return tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True)
    return LogProgress(total, unit=unit, enabled=mode == "log")


class LogProgress:
    """A progress bar for logs: at most one INFO line every ``interval_s`` seconds, and one at the end.

    A line due after ``update`` waits for the ``set_postfix*`` call that usually follows it, so that it
    carries the step's own postfix (the previous step's otherwise).
    """

    def __init__(self, total: int, *, unit: str = "it", enabled: bool = True, interval_s: float = HEARTBEAT_S) -> None:
        self.total, self.unit, self.enabled, self.interval_s = total, unit, enabled, interval_s
        self.n = 0
        self.postfix = ""
        self._start = self._last = time.perf_counter()
        self._due = False
        self._closed = False

    def update(self, n: int = 1) -> None:
        if self._due:  # the previous step set no postfix
            self._emit()
        self.n += n
        # (the last step leaves the report to close)
        self._due = self.enabled and self.n < self.total and time.perf_counter() - self._last >= self.interval_s

    def set_postfix_str(self, s: str = "", refresh: bool = True) -> None:
        self.postfix = str(s)
        if self._due:
            self._emit()

    def set_postfix(self, ordered_dict=None, refresh: bool = True, **kwargs) -> None:
        items = {**(ordered_dict or {}), **kwargs}
        self.set_postfix_str(", ".join(f"{k}={v}" for k, v in items.items()))

    def refresh(self) -> None:
        """(tqdm's redraw, after ``total`` changed: a log has nothing to redraw.)"""

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self.enabled:
            log.info("progress: %d/%d %s, done in %.1f s", self.n, self.total, self.unit, time.perf_counter() - self._start)

    def _emit(self) -> None:
        self._due = False
        self._last = now = time.perf_counter()
        share = f" ({100 * self.n / self.total:.0f}%)" if self.total else ""
        log.info("progress: %d/%d %s%s after %.0f s%s", self.n, self.total, self.unit, share, now - self._start,
                 f", {self.postfix}" if self.postfix else "")

    def __enter__(self) -> "LogProgress":
        return self

    def __exit__(self, exc_type, *exc) -> None:
        if exc_type is None:
            self.close()
        self._closed = True  # an interrupted loop is not "done"


@contextlib.contextmanager
def logging_beside_bars() -> Iterator[None]:
    """Within the block, log records printed to a terminal go through tqdm, so that they do not break a
    progress bar that is being drawn (elsewhere nothing changes)."""
    if not _is_terminal(sys.stderr):
        yield
        return
    from tqdm.contrib.logging import logging_redirect_tqdm

    with logging_redirect_tqdm():
        yield


__all__ = ["HEARTBEAT_S", "LogProgress", "Progress", "logging_beside_bars", "progress_bar", "progress_mode"]
