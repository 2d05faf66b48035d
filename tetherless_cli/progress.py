"""Progress lines: one ``\\r``-rewritten line on stderr, only at a terminal (:class:`StatusLine`), for a long ``sync``
catch-up (:class:`CatchUpProgress`) and a file transfer (``tetherless_cli.blobs.TransferProgress``).

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


class StatusLine:
    """One line on ``stream`` rewritten in place with ``\\r``, at most every :data:`REDRAW_SECONDS`: what every
    progress display here draws with (subclasses decide *what* to say, this class *when* and *how*).

    Drawn only when ``stream`` is a terminal. Call :meth:`clear` before anything else is written to that terminal;
    a later :meth:`draw` draws the line again. Never raises for a closed or broken stream's sake (it stops
    drawing: :attr:`enabled` turns False).
    """

    def __init__(self, stream: TextIO, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._stream = stream
        self._enabled = _isatty(stream)
        self._clock = clock
        self._drawn_at: float | None = None
        self._width = 0  # of the line on screen (0: none)

    @property
    def enabled(self) -> bool:
        """False off a terminal (or once the stream broke): callers skip gathering what would not be drawn."""
        return self._enabled

    def due(self, *, final: bool = False) -> bool:
        """Whether a line may be drawn now: at a terminal, and :data:`REDRAW_SECONDS` after the last one (at once
        when ``final``: the end of a transfer is always shown). True also records the time of this draw."""
        if not self._enabled:
            return False
        now = self._clock()
        if not final and self._drawn_at is not None and now - self._drawn_at < REDRAW_SECONDS:
            return False
        self._drawn_at = now
        return True

    def draw(self, line: str) -> None:
        """Replace the line on screen with ``line`` (padded over a longer previous one). Ask :meth:`due` first."""
        self._write("\r" + line.ljust(self._width))
        self._width = len(line)

    def clear(self) -> None:
        """Erase the line (before a message or status line is printed, and when the work ends). Idempotent."""
        if self._width:
            self._write("\r" + " " * self._width + "\r")
            self._width = 0

    def _write(self, text: str) -> None:
        try:
            self._stream.write(text)
            self._stream.flush()
        except (OSError, ValueError):
            self._enabled = False


class CatchUpProgress(StatusLine):
    """``catching up: 310 messages, log 1200/5000 (24%)`` on ``stream``, rewritten in place (:class:`StatusLine`),
    once the catch-up is long (see :meth:`update`)."""

    def __init__(
        self,
        stream: TextIO,
        *,
        start_position: int,
        min_records: int = LONG_CATCH_UP_RECORDS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__(stream, clock=clock)
        self._start = start_position
        self._min_records = min_records
        self.messages = 0

    def update(self, position: int, head: int, *, message: bool = False) -> None:
        """Note the log cursor and head (and one more received message); redraw at most every 0.1 s. Drawn once
        the log is ``min_records`` past the starting cursor or as many messages have arrived (an inbox
        catch-up has no known end: it shows the count alone)."""
        self.messages += int(message)
        log_behind = head - self._start >= self._min_records
        if not (log_behind or self.messages >= self._min_records) or not self.due():
            return
        line = f"catching up: {self.messages} messages"
        if log_behind:
            done = max(0, min(position, head) - self._start)
            line += f", log {position}/{head} ({100 * done // (head - self._start)}%)"
        self.draw(line)


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (OSError, ValueError):
        return False


__all__ = ["LONG_CATCH_UP_RECORDS", "REDRAW_SECONDS", "CatchUpProgress", "StatusLine"]
