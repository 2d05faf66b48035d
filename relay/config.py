"""Relay configuration: one frozen dataclass, filled with a clear precedence.

Precedence, highest first: command-line flags > ``TETHERLESS_<NAME>``
environment variables > a TOML file (``--config`` / ``TETHERLESS_CONFIG``) >
defaults. :func:`load` also reports where each effective value came from, so
``tetherless config show`` can print it.
"""

from __future__ import annotations

import dataclasses
import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

ENV_PREFIX = "TETHERLESS_"
MAX_SESSION_CACHE_SECONDS = 300
KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


class ConfigError(Exception):
    """A setting has a value that cannot be used (message names the setting and the source)."""


@dataclass(frozen=True, slots=True)
class Config:
    # -- where ----------------------------------------------------------------
    data: str = "./data"
    listen: str = "127.0.0.1:8080"
    name: str = ""  # relay name used in addresses; default: host:port of listen
    tls_cert: str = ""
    tls_key: str = ""
    log_format: str = "text"  # "text" or "json"
    log_level: str = "info"
    # A second, plain-HTTP listener that serves only GET /metrics (empty: none), so the client port need not
    # expose metrics; metrics_on_main_port = false then removes /metrics from the client port (docs/operations.md).
    metrics_listen: str = ""
    metrics_on_main_port: bool = True
    # -- application limits (published in /.well-known/tetherless) --------------
    max_body_bytes: int = 8 * MiB
    max_batch_envelopes: int = 1000
    max_envelope_bytes: int = 256 * KiB
    max_inbox_envelopes: int = 100_000
    default_ttl_seconds: int = 30 * 86400
    max_ttl_seconds: int = 90 * 86400
    max_page_envelopes: int = 1000
    session_ttl_seconds: int = 12 * 3600
    challenge_ttl_seconds: int = 60
    # How long a looked-up session answers from memory (not published); 0 turns the cache off, at most
    # MAX_SESSION_CACHE_SECONDS. Revocations clear it on every replica (docs/decisions/0013).
    session_cache_seconds: float = 5.0
    # account log (docs/account-log.md §3.5; also published)
    max_log_batch_records: int = 500
    max_log_record_bytes: int = 1_048_616  # a 1 MiB padding bucket + 24-byte nonce + 16-byte tag
    max_page_log_records: int = 500
    max_log_page_bytes: int = 4 * MiB  # soft: a page holds at least one record
    max_log_bytes: int = 4 * 1024 * MiB  # ciphertext per account; 0 = unlimited
    max_retention_days: int = 36_500
    stream_heartbeat_seconds: float = 15.0
    expiry_interval_seconds: float = 60.0
    # -- abuse limits (token buckets; 0 disables one) -----------------------------------
    rate_ip_per_second: float = 20.0  # unauthenticated requests (accounts, challenges, sessions) per source IP
    rate_ip_burst: int = 200
    rate_device_requests_per_second: float = 200.0  # authenticated requests per device
    rate_device_requests_burst: int = 2000
    rate_device_envelopes_per_second: float = 2000.0  # envelopes submitted per device
    rate_device_envelopes_burst: int = 20_000
    rate_account_envelopes_per_second: float = 5000.0  # envelopes submitted by all devices of an account
    rate_account_envelopes_burst: int = 50_000
    # -- transport limits (DESIGN.md §7) ---------------------------------------------
    max_concurrent_streams: int = 100
    max_header_list_bytes: int = 64 * KiB
    max_frame_bytes: int = 16 * KiB
    max_connections: int = 10_000
    max_connections_per_ip: int = 256
    header_timeout_seconds: float = 10.0
    body_timeout_seconds: float = 30.0
    idle_timeout_seconds: float = 120.0
    tls_handshake_timeout_seconds: float = 10.0
    control_frame_budget: int = 1000  # PING/SETTINGS/PRIORITY/empty DATA per connection before GOAWAY
    reset_budget: int = 1000  # stream resets (by either side) per connection before GOAWAY
    send_buffer_bytes: int = 1 * MiB  # cap on bytes queued for a socket beyond the peer's window
    max_connection_body_bytes: int = 32 * MiB  # request bodies buffered per HTTP/2 connection before backpressure
    drain_timeout_seconds: float = 10.0
    # -- store -----------------------------------------------------------------------
    database: str = ""  # empty: SQLite in `data`; postgresql://… : PostgreSQL (several replicas may share it)
    sqlite_cache_mib: int = 64
    sqlite_readers: int = 4
    group_commit_max_ops: int = 1000
    # -- federation (docs/federation.md) ---------------------------------------------------
    federation: str = "open"  # "open", "allowlist" (only federation_allow) or "off"
    federation_allow: str = ""  # comma-separated relay names (used when federation = "allowlist")
    federation_deny: str = ""  # comma-separated relay names never federated with
    peers: str = ""  # static resolver: "NAME=URL,NAME=URL" (flag --peer, repeatable; file: [peers] table)
    peer_keys: str = ""  # pinned relay key ids of static peers: "NAME=KEYID KEYID,…" (file: [peer_keys] table)
    federation_window_seconds: int = 300  # signature freshness window (and replay memory)
    federation_timeout_seconds: float = 10.0  # one outbound request, connect to last byte
    federation_max_body_bytes: int = 4 * MiB  # inbound request and outbound response cap
    federation_batch_envelopes: int = 200  # envelopes per outbound delivery request
    federation_retry_min_seconds: float = 1.0  # backoff after the first failure (doubles, with jitter)
    federation_retry_max_seconds: float = 600.0
    federation_poll_seconds: float = 2.0  # outbox scan interval (new sends wake the worker at once)
    federation_lease_seconds: float = 30.0  # a replica's hold on sending one peer's outbox (renewed per batch)
    rate_peer_requests_per_second: float = 100.0  # inbound federation requests per origin relay
    rate_peer_requests_burst: int = 1000
    # -- device lists and WebAuthn (docs/crypto.md §3.3, §6) -------------------------------------
    rate_account_list_changes_per_second: float = 0.2  # POST /v1/accounts/{id}/devices per account (12/min)
    rate_account_list_changes_burst: int = 20
    webauthn_rp_id: str = ""  # WebAuthn relying-party id; default: the relay name's host (no port)
    webauthn_origins: str = ""  # comma-separated origins accepted in clientDataJSON (default: any valid for the rp id)
    # -- prekeys and enrolment (docs/crypto.md §5, §7) ----------------------------------------------
    rate_prekey_claims_per_second: float = 5.0  # POST /v1/prekeys/claim per device
    rate_prekey_claims_burst: int = 100
    prekey_one_time_per_pair_per_hour: int = 3  # one-time keys of each kind per (claiming account, device) per hour
    prekey_one_time_per_origin_per_hour: int = 1000  # claims served one-time keys, per other relay (0: no limit)
    prekey_one_time_per_device_per_hour: int = 100  # claims served one-time keys, per target device (0: no limit)
    enrolment_ttl_seconds: int = 600  # an enrolment offer (link code) is usable this long
    rate_enrolment_lookups_per_minute: float = 10.0  # GET offer / POST proposal per device (burst the same)
    # -- media blobs (docs/blobs.md, docs/decisions/0014-media-blobs.md) ---------------------------------------
    blob_storage: str = "files"  # "files" (under data/blobs; one process) or "s3" (required with several replicas)
    blob_bucket: str = ""  # the S3 bucket (blob_storage = "s3"; endpoint and credentials: AWS_* variables)
    blob_max_bytes: int = 16 * GiB  # one blob's ciphertext (published; tus Tus-Max-Size)
    blob_quota_bytes: int = 20 * GiB  # per account: stored blobs + unfinished uploads (published; 0: no quota)
    blob_upload_expiry_seconds: int = 86_400  # an unfinished upload is collected this long after creation
    blob_ttl_seconds: int = 30 * 86_400  # a stored blob is collected this long after it was stored
    blob_collect_interval_seconds: float = 60.0  # how often the collector looks for expired uploads and blobs
    # -- the browser client (docs/operations.md "Web client") ------------------------------------------------
    web_client: bool = True  # serve the built browser client at / (flag --no-web-client turns it off)
    web_dist: str = ""  # its directory; empty: web/dist of the checkout, and nothing served when there is none
    web_connect_origins: str = ""  # comma-separated origins the served client may call besides this relay (CSP)
    cors_allowed_origins: str = ""  # comma-separated origins whose web apps may call this relay's API (CORS)

    @property
    def relay_name(self) -> str:
        return (self.name or self.listen).lower()

    @property
    def listen_host(self) -> str:
        host, _, _ = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1"

    @property
    def listen_port(self) -> int:
        return int(self.listen.rpartition(":")[2])

    @property
    def tls(self) -> bool:
        return bool(self.tls_cert and self.tls_key)


FIELD_TYPES: dict[str, type] = {f.name: type(f.default) for f in fields(Config)}


_BOOLEANS = {"true": True, "1": True, "yes": True, "on": True, "false": False, "0": False, "no": False, "off": False}


def _coerce(name: str, value: Any, source: str) -> Any:
    want = FIELD_TYPES[name]
    if want is bool:  # bool("false") is True: words are read, not cast
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.strip().lower() in _BOOLEANS:
            return _BOOLEANS[value.strip().lower()]
        raise ConfigError(f"{name} from {source}: expected true or false, got {value!r}")
    try:
        if isinstance(value, str) and want is not str:
            value = want(value)
        if want is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if not isinstance(value, want) or isinstance(value, bool):
            raise TypeError
    except (TypeError, ValueError):
        raise ConfigError(f"{name} from {source}: expected {want.__name__}, got {value!r}") from None
    if isinstance(value, int | float) and value < 0:
        raise ConfigError(f"{name} from {source}: must not be negative")
    return value


def load(
    flags: Mapping[str, Any] | None = None,
    env: Mapping[str, str] | None = None,
    file: str | None = None,
) -> tuple[Config, dict[str, str]]:
    """Build the effective configuration and the source of every value.

    ``flags`` maps field names to values given on the command line (None
    means "not given"). Raises :class:`ConfigError` for unknown keys in the
    file, wrong types, or an unreadable file.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    sources = {name: "default" for name in FIELD_TYPES}
    path = file or env.get(ENV_PREFIX + "CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                table = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise ConfigError(f"config file {path}: {exc}") from None
        for key, value in table.items():
            name = key.replace("-", "_")
            if name == "peers" and isinstance(value, dict):  # a [peers] table: NAME = "URL"
                value = ",".join(f"{peer}={url}" for peer, url in value.items())
            if name == "peer_keys" and isinstance(value, dict):  # a [peer_keys] table: NAME = ["KEYID", …]
                value = ",".join(
                    f"{peer}={' '.join(ids) if isinstance(ids, list) else ids}" for peer, ids in value.items()
                )
            if name in ORIGIN_LISTS and isinstance(value, list):  # a TOML array of origins
                value = ",".join(str(origin) for origin in value)
            if name not in FIELD_TYPES:
                raise ConfigError(f"config file {path}: unknown setting {key!r}")
            values[name] = _coerce(name, value, f"file {path}")
            sources[name] = f"file {path}"
    for name in FIELD_TYPES:
        raw = env.get(ENV_PREFIX + name.upper())
        if raw is not None and raw != "":
            values[name] = _coerce(name, raw, f"env {ENV_PREFIX}{name.upper()}")
            sources[name] = f"env {ENV_PREFIX}{name.upper()}"
    for name, value in (flags or {}).items():
        if value is not None:
            values[name] = _coerce(name, value, "flag")
            sources[name] = "flag"
    config = Config(**values)
    _validate(config)
    return config, sources


def _check_host_port(name: str, value: str) -> None:
    host, sep, port = value.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise ConfigError(f"{name}: expected HOST:PORT, got {value!r}")


def _validate(config: Config) -> None:
    _check_host_port("listen", config.listen)
    if config.metrics_listen:
        _check_host_port("metrics_listen", config.metrics_listen)
        if config.metrics_listen == config.listen and config.listen_port != 0:
            raise ConfigError("metrics_listen must differ from listen")
    if bool(config.tls_cert) != bool(config.tls_key):
        raise ConfigError("tls_cert and tls_key must be given together")
    if config.log_format not in ("text", "json"):
        raise ConfigError(f"log_format: expected text or json, got {config.log_format!r}")
    if config.log_level.lower() not in LOG_LEVELS:
        raise ConfigError(f"log_level: expected {', '.join(LOG_LEVELS)}, got {config.log_level!r}")
    if config.max_frame_bytes < 16384 or config.max_frame_bytes > 16777215:
        raise ConfigError("max_frame_bytes: HTTP/2 allows 16384..16777215")
    if config.max_connection_body_bytes < config.max_body_bytes:
        raise ConfigError("max_connection_body_bytes cannot be smaller than max_body_bytes")
    if config.max_envelope_bytes > config.max_body_bytes:
        raise ConfigError("max_envelope_bytes cannot exceed max_body_bytes")
    if config.max_log_batch_records < 1 or config.max_page_log_records < 1 or config.max_retention_days < 1:
        raise ConfigError("max_log_batch_records, max_page_log_records and max_retention_days must be at least 1")
    for name in ("rate_device_envelopes_burst", "rate_account_envelopes_burst"):
        burst = getattr(config, name)
        if 0 < burst < config.max_batch_envelopes:
            raise ConfigError(
                f"{name} ({burst}) must be 0 or at least max_batch_envelopes ({config.max_batch_envelopes})"
            )
    if config.federation not in ("open", "allowlist", "off"):
        raise ConfigError(f"federation: expected open, allowlist or off, got {config.federation!r}")
    for entry in filter(None, (e.strip() for e in config.peers.split(","))):
        peer, sep, url = entry.partition("=")
        if not sep or not peer.strip() or not url.strip().startswith(("http://", "https://")):
            raise ConfigError(f"peers: expected NAME=http(s)://HOST[:PORT], got {entry!r}")
    static_peers = {e.partition("=")[0].strip().lower() for e in config.peers.split(",") if e.strip()}
    for entry in filter(None, (e.strip() for e in config.peer_keys.split(","))):
        peer, sep, ids = entry.partition("=")
        if not sep or peer.strip().lower() not in static_peers:
            raise ConfigError(f"peer_keys: expected NAME=KEYID … for a peer configured in peers, got {entry!r}")
        if not ids.split() or not all(re.fullmatch(r"[a-z2-7]{16}", key_id) for key_id in ids.split()):
            raise ConfigError(f"peer_keys: {peer.strip()}: key ids are 16 characters of a-z2-7, got {ids.strip()!r}")
    if config.session_cache_seconds > MAX_SESSION_CACHE_SECONDS:
        raise ConfigError(f"session_cache_seconds: at most {MAX_SESSION_CACHE_SECONDS} (0 turns the cache off)")
    if config.default_ttl_seconds > config.max_ttl_seconds:
        raise ConfigError("default_ttl_seconds cannot exceed max_ttl_seconds")
    if config.database and not config.database.startswith(("postgresql://", "postgres://")):
        raise ConfigError("database: expected empty (SQLite in data) or a postgresql:// URL")
    if config.database and not config.name:
        # Replicas named after their own listen addresses would each be another relay (issue 13).
        raise ConfigError("name: required with a PostgreSQL database (every replica must serve one relay name)")
    if config.federation_lease_seconds <= config.federation_timeout_seconds:
        raise ConfigError("federation_lease_seconds must exceed federation_timeout_seconds")
    _validate_blobs(config)
    for name in ORIGIN_LISTS:
        for origin in origin_list(getattr(config, name)):
            match = _ORIGIN.fullmatch(origin)
            default_port = ":443" if origin.startswith("https:") else ":80"  # browsers leave it out
            if not match or int(match["port"] or 1) > 65535 or origin.endswith(default_port):
                raise ConfigError(
                    f"{name}: expected origins as browsers send them, scheme://host[:port] in lower case without "
                    f"a path or a default port (e.g. https://app.example.org), got {origin!r}"
                )


def _validate_blobs(config: Config) -> None:
    if config.blob_storage not in ("files", "s3"):
        raise ConfigError(f"blob_storage: expected files or s3, got {config.blob_storage!r}")
    if config.blob_storage == "s3" and not config.blob_bucket:
        raise ConfigError("blob_bucket: required with blob_storage = s3 (env TETHERLESS_BLOB_BUCKET)")
    for name in ("blob_max_bytes", "blob_upload_expiry_seconds", "blob_ttl_seconds"):
        if getattr(config, name) < 1:
            raise ConfigError(f"{name}: must be at least 1")
    if config.blob_collect_interval_seconds <= 0:
        raise ConfigError("blob_collect_interval_seconds: must be above 0")


LOG_LEVELS = ("debug", "info", "warning", "error")

# Settings that hold origins (a comma-separated string; a TOML array in the file).
ORIGIN_LISTS = ("web_connect_origins", "cors_allowed_origins")
_ORIGIN = re.compile(r"https?://(\[[0-9a-f:.]+\]|[a-z0-9]([a-z0-9.-]*[a-z0-9])?)(:(?P<port>[1-9][0-9]{0,4}))?")


def origin_list(value: str) -> tuple[str, ...]:
    """The origins in a comma-separated setting, in order, without blanks."""
    return tuple(origin for origin in (part.strip() for part in value.split(",")) if origin)


def replace(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, **changes)


def data_path(config: Config) -> Path:
    return Path(config.data)
