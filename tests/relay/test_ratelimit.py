"""Token buckets and keyed limiters, on trio's MockClock."""

from __future__ import annotations

import math

import trio
import trio.testing

from relay.ratelimit import KeyedLimiter, TokenBucket


def run_with_clock(fn: object) -> None:
    clock = trio.testing.MockClock()
    trio.run(fn, clock, clock=clock)  # type: ignore[arg-type]


def test_bucket_refills_and_reports_wait() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        bucket = TokenBucket(3, 1.0)
        assert all(bucket.take() for _ in range(3))
        assert not bucket.take()
        assert math.isclose(bucket.seconds_until(), 1.0)
        clock.jump(0.5)
        assert not bucket.take()
        assert math.isclose(bucket.seconds_until(), 0.5)
        clock.jump(0.5)
        assert bucket.take()
        assert bucket.seconds_until(4) == math.inf
        clock.jump(100)
        assert bucket.tokens == 3  # never above capacity
        assert bucket.full

    run_with_clock(main)


def test_zero_capacity_disables() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        bucket = TokenBucket(0, 0)
        assert all(bucket.take(1e9) for _ in range(10))
        limiter = KeyedLimiter(0, 0)
        assert not limiter.enabled
        assert limiter.take("k", 1e9) == 0
        assert len(limiter) == 0

    run_with_clock(main)


def test_keyed_limiter_is_per_key_and_bounded() -> None:
    async def main(clock: trio.testing.MockClock) -> None:
        limiter = KeyedLimiter(per_second=1, burst=2, max_keys=3)
        assert limiter.take("a") == 0
        assert limiter.take("a") == 0
        assert math.isclose(limiter.take("a"), 1.0)
        assert limiter.take("b") == 0  # another key has its own bucket
        for key in ("c", "d", "e"):
            limiter.take(key)
        assert len(limiter) == 3  # least recently used keys dropped
        assert limiter.take("a") == 0  # "a" was dropped: it starts full again (errs towards allowing)
        assert limiter.take("x", 5) == math.inf  # more than the burst can never pass

    run_with_clock(main)
