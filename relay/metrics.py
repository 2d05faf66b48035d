"""Prometheus metrics: every metric of the relay, defined in one place.

Naming follows Prometheus conventions: ``relay_`` prefix, base units
(seconds, bytes), ``_total`` for counters. Labels are bounded: route
templates (never ids), status classes, fixed reason names.
"""

from __future__ import annotations

from prometheus_client import CONTENT_TYPE_LATEST as CONTENT_TYPE
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

REGISTRY = CollectorRegistry(auto_describe=True)

# -- transport -------------------------------------------------------------------
connections_open = Gauge("relay_connections_open", "Client connections currently open", ["protocol"], registry=REGISTRY)
connections_total = Counter("relay_connections_total", "Client connections accepted", ["protocol"], registry=REGISTRY)
connections_rejected_total = Counter(
    "relay_connections_rejected_total",
    "Connections refused or closed early by a limit",
    ["reason"],
    registry=REGISTRY,
)
protocol_errors_total = Counter(
    "relay_protocol_errors_total",
    "HTTP/1.1 or HTTP/2 protocol violations by peers, by kind",
    ["kind"],
    registry=REGISTRY,
)
goaways_total = Counter("relay_goaways_total", "GOAWAY frames sent, by error code name", ["code"], registry=REGISTRY)

# -- api -----------------------------------------------------------------------------
requests_total = Counter(
    "relay_http_requests_total", "HTTP requests answered", ["route", "method", "status"], registry=REGISTRY
)
request_duration_seconds = Histogram(
    "relay_http_request_duration_seconds",
    "Time from complete request to response headers",
    ["route"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
    registry=REGISTRY,
)
problems_total = Counter("relay_problems_total", "Problem responses, by code", ["code"], registry=REGISTRY)

# The method label takes these values and "OTHER": the method is the client's choice, and every
# distinct value would add a label set (memory) to the registry for as long as the process lives.
HTTP_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "DELETE", "PATCH", "OPTIONS"})
# (route, method, status) -> the two children one answered request updates. Bounded: route is a
# template or "unmatched", method one of HTTP_METHODS or "OTHER", status 200..599.
_request_children: dict[tuple[str, str, int], tuple[Counter, Histogram]] = {}


def observe_request(route: str, method: str, status: int, seconds: float) -> None:
    """Count one answered request in ``requests_total`` and its duration in ``request_duration_seconds``.

    The children are looked up once per (route, method, status) and kept:
    ``labels()`` on both metrics cost ~12 µs of a durable single send's CPU
    (docs/performance.md, "P1, second round"). Never raises.
    """
    if method not in HTTP_METHODS:
        method = "OTHER"
    key = (route, method, status)
    children = _request_children.get(key)
    if children is None:
        children = (requests_total.labels(route, method, str(status)), request_duration_seconds.labels(route))
        _request_children[key] = children
    children[0].inc()
    children[1].observe(seconds)


# -- services ------------------------------------------------------------------------
envelopes_accepted_total = Counter("relay_envelopes_accepted_total", "Envelopes durably stored", registry=REGISTRY)
envelopes_duplicate_total = Counter(
    "relay_envelopes_duplicate_total", "Envelopes answered from the idempotency table", registry=REGISTRY
)
envelopes_delivered_total = Counter(
    "relay_envelopes_delivered_total", "Envelopes handed to devices (pages and streams)", ["via"], registry=REGISTRY
)
envelopes_acknowledged_total = Counter(
    "relay_envelopes_acknowledged_total", "Envelopes deleted by acknowledgement", registry=REGISTRY
)
envelopes_expired_total = Counter("relay_envelopes_expired_total", "Envelopes deleted by TTL", registry=REGISTRY)
streams_open = Gauge("relay_inbox_streams_open", "Inbox streams currently open", registry=REGISTRY)
auth_failures_total = Counter(
    "relay_auth_failures_total", "Failed authentications, by code", ["code"], registry=REGISTRY
)
rate_limited_total = Counter(
    "relay_rate_limited_total", "Requests refused by a rate limit, by scope", ["scope"], registry=REGISTRY
)
sessions_issued_total = Counter("relay_sessions_issued_total", "Session tokens issued", registry=REGISTRY)
# docs/decisions/0013-revocation-across-replicas.md
revocation_notices_total = Counter(
    "relay_revocation_notices_total",
    "Session revocation notices received (by any replica, this one too); each drops a device's cached sessions",
    registry=REGISTRY,
)
revocation_listener_up = Gauge(
    "relay_revocation_listener_up",
    "1 while every session revocation reaches this process, so its session cache may answer; 0: cache bypassed",
    registry=REGISTRY,
)

# -- store ---------------------------------------------------------------------------
store_commit_seconds = Histogram(
    "relay_store_commit_seconds",
    "Duration of one group commit (BEGIN..COMMIT)",
    buckets=(0.0002, 0.0005, 0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0),
    registry=REGISTRY,
)
store_commit_ops = Histogram(
    "relay_store_commit_operations",
    "Write operations batched into one commit",
    buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024),
    registry=REGISTRY,
)
store_write_queue = Gauge("relay_store_write_queue", "Write operations waiting for the writer", registry=REGISTRY)

ready = Gauge("relay_ready", "1 when the relay accepts traffic, 0 while starting or draining", registry=REGISTRY)


# -- federation (peer labels are bounded: configured peers by name, every other relay as "other") ----
federation_requests_total = Counter(
    "relay_federation_requests_total",
    "Federation requests, by peer, direction (in/out), kind and outcome",
    ["peer", "direction", "kind", "outcome"],
    registry=REGISTRY,
)
federation_request_duration_seconds = Histogram(
    "relay_federation_request_duration_seconds",
    "Outbound federation request time, connect to last byte",
    ["peer", "kind"],
    buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0),
    registry=REGISTRY,
)
federation_envelopes_total = Counter(
    "relay_federation_envelopes_total",
    "Federated envelopes, by peer, direction (in/out) and outcome (stored, duplicate, rejected, deferred, failed)",
    ["peer", "direction", "outcome"],
    registry=REGISTRY,
)
federation_outbox_depth = Gauge(
    "relay_federation_outbox_depth", "Envelopes waiting in the federation outbox, by peer", ["peer"], registry=REGISTRY
)
federation_peer_failures = Gauge(
    "relay_federation_peer_consecutive_failures",
    "Consecutive failed delivery attempts, by peer",
    ["peer"],
    registry=REGISTRY,
)
federation_rejected_total = Counter(
    "relay_federation_rejected_total", "Inbound federation requests refused, by code", ["code"], registry=REGISTRY
)

# -- device lists and WebAuthn (docs/crypto.md §3.3, §4, §6) -------------------------------------------
device_list_versions_total = Counter(
    "relay_device_list_versions_total",
    "Device-list versions posted, by outcome (accepted or the problem code)",
    ["outcome"],
    registry=REGISTRY,
)
devices_revoked_total = Counter(
    "relay_devices_revoked_total", "Devices revoked by an accepted device-list version", registry=REGISTRY
)
webauthn_registrations_total = Counter(
    "relay_webauthn_registrations_total",
    "WebAuthn registrations completed, by outcome (registered or the problem code)",
    ["outcome"],
    registry=REGISTRY,
)


# -- account log (docs/account-log.md §7.3) ----------------------------------------------------
log_appends_total = Counter(
    "relay_log_appends_total",
    "Account log appends, by outcome (stored, duplicate, conflict, rejected)",
    ["outcome"],
    registry=REGISTRY,
)
log_records_appended_total = Counter(
    "relay_log_records_appended_total", "Account log records newly stored", registry=REGISTRY
)
log_record_bytes = Histogram(
    "relay_log_record_bytes",
    "Ciphertext size of appended account log records",
    buckets=(256, 1024, 4096, 16384, 65536, 262144, 1048576, 1048616),
    registry=REGISTRY,
)
log_streams_open = Gauge("relay_log_streams_open", "Account log streams currently open", registry=REGISTRY)
log_records_served_total = Counter(
    "relay_log_records_served_total",
    "Account log records handed to devices, by route (page, stream, snapshot)",
    ["via"],
    registry=REGISTRY,
)
log_retention_deleted_total = Counter(
    "relay_log_retention_deleted_total",
    "Account log records deleted (or snapshot records emptied) by retention",
    registry=REGISTRY,
)


# -- prekeys and enrolment (docs/crypto.md §5, §7; kinds are the four fixed prekey kind strings) ----
prekeys_uploaded_total = Counter(
    "relay_prekeys_uploaded_total", "Prekeys stored by uploads, by kind", ["kind"], registry=REGISTRY
)
prekeys_claimed_total = Counter(
    "relay_prekeys_claimed_total", "Prekeys served in claimed bundles, by kind", ["kind"], registry=REGISTRY
)
prekeys_exhausted_total = Counter(
    "relay_prekeys_exhausted_total",
    "Bundles served without a one-time key of a kind (none left, or the per-pair limit), by kind",
    ["kind"],
    registry=REGISTRY,
)
prekey_claims_missing_total = Counter(
    "relay_prekey_claims_missing_total", "Claimed devices answered as missing", registry=REGISTRY
)
prekey_one_time_withheld_total = Counter(
    "relay_prekey_one_time_withheld_total",
    "Bundles served with the last-resort key only because a one-time claim limit was reached, by limit"
    " (origin: one other relay, all its claimers; device: one target device, all claimers)",
    ["limit"],
    registry=REGISTRY,
)
enrolments_created_total = Counter("relay_enrolments_created_total", "Enrolment offers stored", registry=REGISTRY)
enrolments_used_total = Counter(
    "relay_enrolments_used_total", "Enrolment offers answered with a proposal", registry=REGISTRY
)
enrolments_expired_total = Counter(
    "relay_enrolments_expired_total", "Enrolment offers forgotten without a proposal", registry=REGISTRY
)


# -- media blobs (docs/blobs.md) ---------------------------------------------------------------------
blob_upload_bytes_total = Counter(
    "relay_blob_upload_bytes_total", "Blob bytes made durable by uploads (committed appends)", registry=REGISTRY
)
blob_received_bytes_total = Counter(
    "relay_blob_received_bytes_total",
    "PATCH body bytes read, kept or not (a refused or interrupted PATCH's too): what clients made the relay receive",
    registry=REGISTRY,
)
blob_download_bytes_total = Counter(
    "relay_blob_download_bytes_total", "Blob bytes handed to downloads", registry=REGISTRY
)
blob_uploads_total = Counter(
    "relay_blob_uploads_total",
    "Uploads ended, by outcome (stored, deduplicated, digest_mismatch, terminated)",
    ["outcome"],
    registry=REGISTRY,
)
blob_stored_bytes = Gauge(
    "relay_blob_stored_bytes", "Bytes of all stored blobs (as of the last collector run)", registry=REGISTRY
)
blob_collected_total = Counter(
    "relay_blob_collected_total",
    "Expired uploads and blobs collected, and storage objects dropped, by kind (upload, blob, storage)",
    ["kind"],
    registry=REGISTRY,
)
blob_checksum_failures_total = Counter(
    "relay_blob_checksum_failures_total", "PATCH bodies refused for an Upload-Checksum mismatch", registry=REGISTRY
)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return generate_latest(REGISTRY), CONTENT_TYPE
