"""Token buckets that bound how much work a peer may cause per connection.

Time comes from :func:`trio.current_time`, so tests can drive a bucket with
:class:`trio.testing.MockClock`.
"""

from __future__ import annotations

import trio


class TokenBucket:
    """A bucket of ``capacity`` tokens refilled at ``refill_per_second``.

    A ``capacity`` of 0 or less disables the limit (:meth:`take` always
    succeeds): a config value of 0 means "no budget", never "allow nothing".
    Must be created and used inside a trio run (it reads the trio clock).
    """

    __slots__ = ("_stamp", "_tokens", "capacity", "refill_per_second")

    def __init__(self, capacity: int, refill_per_second: float) -> None:
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self._tokens = float(capacity)
        self._stamp = trio.current_time()

    @classmethod
    def per_connection(cls, budget: int) -> TokenBucket:
        """The transport's default shape: ``budget`` tokens, a tenth of it back per second."""
        return cls(budget, budget / 10)

    @property
    def tokens(self) -> float:
        """Tokens available now (after refill)."""
        self._refill()
        return self._tokens

    def take(self, count: float = 1.0) -> bool:
        """Spend ``count`` tokens; False (and nothing spent) when the bucket is exhausted. Never blocks."""
        if self.capacity <= 0:
            return True
        self._refill()
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(float(self.capacity), self._tokens + (now - self._stamp) * self.refill_per_second)
        self._stamp = now
