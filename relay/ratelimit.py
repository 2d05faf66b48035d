"""Token buckets, alone and keyed: the one rate-limiting primitive of the relay.

Time comes from :func:`trio.current_time` (monotonic; drivable by
:class:`trio.testing.MockClock` in tests). A capacity of 0 disables a limit:
a config value of 0 means "no limit", never "allow nothing".
"""

from __future__ import annotations

import math
from collections import OrderedDict

import trio


class TokenBucket:
    """``capacity`` tokens, refilled at ``refill_per_second``. Never blocks."""

    __slots__ = ("_stamp", "_tokens", "capacity", "refill_per_second")

    def __init__(self, capacity: float, refill_per_second: float) -> None:
        self.capacity = capacity
        self.refill_per_second = refill_per_second
        self._tokens = float(capacity)
        self._stamp = trio.current_time()

    @classmethod
    def per_connection(cls, budget: int) -> TokenBucket:
        """The transport's shape: ``budget`` tokens, a tenth of it back per second."""
        return cls(budget, budget / 10)

    @property
    def tokens(self) -> float:
        """Tokens available now (after refill)."""
        self._refill()
        return self._tokens

    @property
    def full(self) -> bool:
        return self.tokens >= self.capacity

    def take(self, count: float = 1.0) -> bool:
        """Spend ``count`` tokens; False (and nothing spent) when there are not enough."""
        if self.capacity <= 0:
            return True
        self._refill()
        if self._tokens < count:
            return False
        self._tokens -= count
        return True

    def seconds_until(self, count: float = 1.0) -> float:
        """How long until ``count`` tokens are available (inf if never: more than the capacity)."""
        if self.capacity <= 0:
            return 0.0
        if count > self.capacity:
            return math.inf
        missing = count - self.tokens
        if missing <= 0:
            return 0.0
        return missing / self.refill_per_second if self.refill_per_second > 0 else math.inf

    def _refill(self) -> None:
        now = trio.current_time()
        self._tokens = min(float(self.capacity), self._tokens + (now - self._stamp) * self.refill_per_second)
        self._stamp = now


class KeyedLimiter:
    """One bucket per key (a device, an account, an IP), with a bounded number of keys.

    When more than ``max_keys`` keys are tracked, the least recently used
    bucket is dropped: a dropped key starts again with a full bucket, which
    errs towards allowing — the cap only bounds memory.
    """

    def __init__(self, per_second: float, burst: float, *, max_keys: int = 100_000) -> None:
        self.per_second = per_second
        self.burst = burst
        self.max_keys = max_keys
        self._buckets: OrderedDict[str, TokenBucket] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.per_second > 0 and self.burst > 0

    def take(self, key: str, count: float = 1.0) -> float:
        """Spend ``count`` tokens of ``key``'s bucket.

        Returns 0 when allowed, else the seconds to wait before retrying
        (nothing is spent then); ``math.inf`` for a request larger than the
        burst, which can never pass.
        """
        if not self.enabled:
            return 0.0
        if count > self.burst:
            return math.inf
        bucket = self._buckets.get(key)
        if bucket is None:
            bucket = self._buckets[key] = TokenBucket(self.burst, self.per_second)
            if len(self._buckets) > self.max_keys:
                self._buckets.popitem(last=False)
        else:
            self._buckets.move_to_end(key)
        if bucket.take(count):
            return 0.0
        return max(bucket.seconds_until(count), 1e-9)

    def __len__(self) -> int:
        return len(self._buckets)
