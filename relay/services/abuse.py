"""Abuse limits: token-bucket rate limits per source IP, per device and per account.

Every refusal is ``429 rate_limited`` with ``Retry-After`` (whole seconds,
rounded up) and counts in ``relay_rate_limited_total{scope}``. Buckets live
in memory per process: with several replicas each enforces its own share,
which bounds abuse without a shared counter on every request.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.config import Config
from relay.ratelimit import KeyedLimiter


@dataclass(frozen=True, slots=True)
class RateSettings:
    ip_per_second: float = 0.0
    ip_burst: float = 0.0
    device_requests_per_second: float = 0.0
    device_requests_burst: float = 0.0
    device_envelopes_per_second: float = 0.0
    device_envelopes_burst: float = 0.0
    account_envelopes_per_second: float = 0.0
    account_envelopes_burst: float = 0.0
    account_list_changes_per_second: float = 0.0
    account_list_changes_burst: float = 0.0

    @classmethod
    def from_config(cls, config: Config) -> RateSettings:
        return cls(
            ip_per_second=config.rate_ip_per_second,
            ip_burst=config.rate_ip_burst,
            device_requests_per_second=config.rate_device_requests_per_second,
            device_requests_burst=config.rate_device_requests_burst,
            device_envelopes_per_second=config.rate_device_envelopes_per_second,
            device_envelopes_burst=config.rate_device_envelopes_burst,
            account_envelopes_per_second=config.rate_account_envelopes_per_second,
            account_envelopes_burst=config.rate_account_envelopes_burst,
            account_list_changes_per_second=config.rate_account_list_changes_per_second,
            account_list_changes_burst=config.rate_account_list_changes_burst,
        )


class AbuseLimits:
    """The relay's rate limits. All methods raise ``rate_limited`` or return; none blocks."""

    def __init__(self, settings: RateSettings) -> None:
        self._ip = KeyedLimiter(settings.ip_per_second, settings.ip_burst)
        self._device_requests = KeyedLimiter(settings.device_requests_per_second, settings.device_requests_burst)
        self._device_envelopes = KeyedLimiter(settings.device_envelopes_per_second, settings.device_envelopes_burst)
        self._account_envelopes = KeyedLimiter(settings.account_envelopes_per_second, settings.account_envelopes_burst)
        self._account_list_changes = KeyedLimiter(
            settings.account_list_changes_per_second, settings.account_list_changes_burst
        )

    @staticmethod
    def _check(limiter: KeyedLimiter, scope: str, key: str, count: float = 1.0) -> None:
        check_limit(limiter, scope, key, count)

    def unauthenticated_request(self, client: str) -> None:
        """One unauthenticated request from ``client`` ("ip:port"; the port is ignored)."""
        self._check(self._ip, "ip", client_ip(client))

    def device_request(self, device_id: str) -> None:
        """One authenticated request by ``device_id``."""
        self._check(self._device_requests, "device", device_id)

    def envelopes(self, device_id: str, account_id: str, count: int) -> None:
        """``count`` envelopes submitted by a device of an account (checked device first, then account)."""
        self._check(self._device_envelopes, "device_envelopes", device_id, count)
        self._check(self._account_envelopes, "account_envelopes", account_id, count)

    def device_list_change(self, account_id: str) -> None:
        """One device-list version posted for ``account_id`` (unauthenticated: the IP is limited by the route)."""
        self._check(self._account_list_changes, "account_list_changes", account_id)


def check_limit(limiter: KeyedLimiter, scope: str, key: str, count: float = 1.0) -> None:
    """Take ``count`` from ``key``'s bucket or raise ``rate_limited`` (counted under ``scope``).

    For limits kept by other services (prekey claims, enrolment lookups).
    """
    wait = limiter.take(key, count)
    if wait > 0:
        metrics.rate_limited_total.labels(scope).inc()
        retry = max(1, math.ceil(wait)) if math.isfinite(wait) else 3600
        raise TetherlessError(
            ErrorCode.RATE_LIMITED, f"too many requests ({scope}); retry later", retry_after_seconds=retry
        )


def client_ip(client: str) -> str:
    """The address part of "ip:port" or "[v6]:port"."""
    host, sep, _port = client.rpartition(":")
    return host.strip("[]") if sep else client
