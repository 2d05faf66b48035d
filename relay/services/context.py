"""What every service needs besides the store: time, randomness and limits, passed in explicitly."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from protocol.messages import Limits
from relay.config import Config


def wall_clock_ms() -> int:
    return time.time_ns() // 1_000_000


@dataclass(frozen=True, slots=True)
class ServiceContext:
    relay_name: str
    limits: Limits
    clock_ms: Callable[[], int] = wall_clock_ms
    random_bytes: Callable[[int], bytes] = field(default=os.urandom)


def limits_from(config: Config) -> Limits:
    return Limits(
        max_body_bytes=config.max_body_bytes,
        max_batch_envelopes=config.max_batch_envelopes,
        max_envelope_bytes=config.max_envelope_bytes,
        max_inbox_envelopes=config.max_inbox_envelopes,
        default_ttl_seconds=config.default_ttl_seconds,
        max_ttl_seconds=config.max_ttl_seconds,
        max_page_envelopes=config.max_page_envelopes,
        session_ttl_seconds=config.session_ttl_seconds,
        challenge_ttl_seconds=config.challenge_ttl_seconds,
        max_log_batch_records=config.max_log_batch_records,
        max_log_record_bytes=config.max_log_record_bytes,
        max_page_log_records=config.max_page_log_records,
        max_log_page_bytes=config.max_log_page_bytes,
        max_log_bytes=config.max_log_bytes,
        max_retention_days=config.max_retention_days,
        max_blob_bytes=config.blob_max_bytes,
        blob_quota_bytes=config.blob_quota_bytes,
        blob_upload_expiry_seconds=config.blob_upload_expiry_seconds,
        blob_ttl_seconds=config.blob_ttl_seconds,
    )
