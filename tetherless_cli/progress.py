"""The progress line of a long ``sync`` catch-up: one ``\\r``-rewritten line on stderr, only at a terminal.

No dependency: rich and tqdm are development-only here (requirements/dev.txt), and one counter line needs neither.
Off a terminal nothing is ever written, so scripts reading stderr as "one line per error" are unaffected.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Final, TextIO

# Below this many log records to read, a catch-up ends before a counter would help.
LONG_CATCH_UP_RECORDS: Final = 100
REDRAW_SECONDS: Final = 0.1  # at most ten redraws a second: the terminal, not the sync, sets the pace


class CatchUpProgress:
    """``catching up: 310 messages, log 1200/5000 (24%)`` on ``stream``, rewritten in place.

    Shown only when ``stream`` is a terminal, once the catch-up is long (see :meth:`update`). Call :meth:`clear`
    before anything else is written to that terminal; a later :meth:`update` draws the line again. Never raises
    for a closed or broken stream's sake (it stops drawing).
    """

    def __init__(
        self,
        stream: TextIO,
        *,
        start_position: int,
        min_records: int = LONG_CATCH_UP_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._stream = stream
        self._enabled = _isatty(stream)
        self._start = start_position
        self._min_records = min_records
        self._clock = clock
        self._drawn_at: float | None = None
        self._width = 0  # of the line on screen (0: none)
        self.messages = 0

    @property
    def enabled(self) -> bool:
        """False off a terminal: callers skip gathering what :meth:`update` would ignore."""
        return self._enabled

    def update(self, position: int, head: int, *, message: bool = False) -> None:
        """Note the log cursor and head (and one more received message); redraw at most every 0.1 s. Drawn once
        the log is ``min_records`` past the starting cursor or as many messages have arrived (an inbox
        catch-up has no known end: it shows the count alone)."""
        self.messages += int(message)
        log_behind = head - self._start >= self._min_records
        if not self._enabled or not (log_behind or self.messages >= self._min_records):
            return
        now = self._clock()
        if self._drawn_at is not None and now - self._drawn_at < REDRAW_SECONDS:
            return
        self._drawn_at = now
        line = f"catching up: {self.messages} messages"
        if log_behind:
            done = max(0, min(position, head) - self._start)
            line += f", log {position}/{head} ({100 * done // (head - self._start)}%)"
        self._write("\r" + line.ljust(self._width))
        self._width = len(line)

    def clear(self) -> None:
        """Erase the line (before a message or status line is printed, and when the sync ends). Idempotent."""
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._enabled = False


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


__all__ = ["LONG_CATCH_UP_RECORDS", "CatchUpProgress"]
