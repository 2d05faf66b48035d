"""Composition root: build the store, services, API and transport of one relay process, and run it.

Start-up: check the TLS files and the data directory and bind the listeners
(each refused with one line, before anything is written), open the store
(migrating it), then install the application and turn ``/readyz`` green. Shutdown on SIGTERM/SIGINT:
``/readyz`` turns 503, the transport drains (GOAWAY, in-flight requests
finish, streams end), background tasks stop, the store closes.
"""

from __future__ import annotations

import errno
import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.api.application import Application
from relay.api.context import Api
from relay.api.http import Handler, Request, Response, problem_response
from relay.api.ops import metrics_listener, well_known
from relay.api.routes import all_routes
from relay.api.web import CHECKOUT_DIST, CorsGate, WebClient, WebClientError
from relay.blobs.base import BlobStorage
from relay.blobs.files import FileStorage
from relay.config import Config, origin_list, replace
from relay.relay_keys import RelayKeyring, load_keyring, load_or_create_signing_key, retired_keys
from relay.services import (
    BlobSettings,
    FederationSettings,
    PrekeySettings,
    RateSettings,
    ServiceContext,
    Services,
    WebAuthnSettings,
    limits_from,
    wall_clock_ms,
)
from relay.services.federation import PREFIX as FEDERATION_PREFIX
from relay.store import PostgresStore, SQLiteStore, Store, StoreUnavailableError, redact_url
from relay.store.base import StartupRefusedError
from relay.transport import Server
from relay.transport.outbound import OutboundClient

log = logging.getLogger("relay.app")


class Switchboard:
    """The transport's handler: answers 503 ``unavailable`` until the application is installed."""

    def __init__(self) -> None:
        self.application: Handler | None = None
        self.streaming: Callable[[str, str], bool] | None = None  # Application.streams_body, installed with it

    def streams_body(self, method: str, path: str) -> bool:
        """The transport's question, answered by the installed application's routes (never while starting)."""
        return self.streaming is not None and self.streaming(method, path)

    async def __call__(self, request: Request) -> Response:
        if self.application is None:
            return problem_response(TetherlessError(ErrorCode.UNAVAILABLE, "starting", retry_after_seconds=1))
        return await self.application(request)


def prepare_data_dir(data_dir: Path) -> nacl.signing.SigningKey:
    """Create the data directory (owner-only) and return the relay key."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_or_create_signing_key(data_dir)


def check_data_dir(data_dir: Path) -> None:
    """Refuse (:class:`StartupRefusedError`, one line) a data directory that cannot be used. Blocking."""
    if data_dir.exists() and not data_dir.is_dir():
        raise StartupRefusedError(f"data directory {data_dir}: exists and is not a directory")
    try:
        data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    except OSError as exc:
        raise StartupRefusedError(f"data directory {data_dir}: cannot create it: {exc.strerror or exc}") from None
    if not os.access(data_dir, os.R_OK | os.W_OK | os.X_OK):
        raise StartupRefusedError(f"data directory {data_dir}: not readable and writable by this user")


def _pem_kinds(path: str) -> set[str]:
    try:
        text = Path(path).read_text("ascii", errors="replace")
    except OSError:
        return set()
    return {kind for kind in ("CERTIFICATE", "PRIVATE KEY") if f"-----BEGIN {kind}" in text or f" {kind}-----" in text}


def tls_problem(cert: str, key: str, exc: OSError) -> str:
    """One line saying which TLS file is wrong and how, for an exception from loading the pair. Blocking."""
    for setting, path in (("tls_cert", cert), ("tls_key", key)):
        try:
            Path(path).open("rb").close()
        except OSError as err:
            return f"{setting} {path}: cannot read it: {err.strerror or err}"
    cert_kinds, key_kinds = _pem_kinds(cert), _pem_kinds(key)
    if "CERTIFICATE" not in cert_kinds and "CERTIFICATE" in key_kinds:
        return f"tls_cert {cert} and tls_key {key} look swapped (the certificate is in tls_key)"
    if "CERTIFICATE" not in cert_kinds:
        return f"tls_cert {cert}: no PEM certificate in it"
    if not key_kinds & {"PRIVATE KEY"}:
        return f"tls_key {key}: no PEM private key in it"
    reason = getattr(exc, "reason", None) or exc.strerror or str(exc)
    if reason == "KEY_VALUES_MISMATCH":
        return f"tls_key {key} does not belong to the certificate in tls_cert {cert}"
    return f"tls_cert {cert} / tls_key {key}: cannot be used: {reason}"


def _server_or_refuse(config: Config, handler: Switchboard) -> Server:
    try:
        return Server(config, handler, streams_body=handler.streams_body)
    except OSError as exc:  # ssl.SSLError is an OSError
        raise StartupRefusedError(tls_problem(config.tls_cert, config.tls_key, exc)) from None


_BIND_ADVICE: dict[int, str] = {
    errno.EADDRINUSE: "the port is already in use (another relay or program listens there); choose another",
    errno.EACCES: "permission denied (ports below 1024 need privileges); choose a port from 1024 up",
    errno.EADDRNOTAVAIL: "this machine has no such address",
}


async def _bind_or_refuse(server: Server, address: str, setting: str) -> None:
    try:
        await server.bind()
    except OSError as exc:
        advice = _BIND_ADVICE.get(exc.errno or 0, exc.strerror or str(exc))
        raise StartupRefusedError(f"cannot listen on {address} ({setting}): {advice}") from None


def base_url(config: Config, port: int) -> str:
    host = config.listen_host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if config.tls else 'http'}://{host}:{port}"


def load_web_client(config: Config, api_paths: set[str]) -> WebClient | None:
    """The browser client to serve at ``/``, or None (turned off, or no build where the default looks).

    An explicit ``web_dist`` that cannot be served stops the relay (SystemExit
    with the reason); the default place may be empty (an installed wheel has
    no web/dist), which is logged. Blocking file I/O: call it from a thread.
    """
    if not config.web_client:
        log.info("web client: off (web_client = false)")
        return None
    directory = Path(config.web_dist) if config.web_dist else CHECKOUT_DIST
    if not config.web_dist and not directory.is_dir():
        log.warning("web client: no build at %s, so / is not served (set web_dist)", directory)
        return None
    connect = origin_list(config.web_connect_origins)
    try:
        client = WebClient.load(directory, connect_origins=connect, reserved_paths=api_paths)
    except WebClientError as exc:
        raise SystemExit(f"tetherless: error: web_dist {directory}: {exc}") from None
    log.info("web client: serving %d files from %s at /", len(client.assets) - 1, directory)
    return client


async def open_store(config: Config, data_dir: Path) -> Store:
    """PostgreSQL when ``config.database`` is set, else SQLite in ``data_dir``; migrated. Exits if unusable."""
    if config.database:
        try:
            store: Store = await PostgresStore.open(config.database)
        except StoreUnavailableError as exc:  # its message carries no password
            raise SystemExit(f"tetherless: error: {exc}") from None
        log.info("store: PostgreSQL at %s", redact_url(config.database))
        return store
    return await SQLiteStore.open(
        data_dir,
        cache_mib=config.sqlite_cache_mib,
        readers=config.sqlite_readers,
        group_commit_max_ops=config.group_commit_max_ops,
    )


def open_blob_storage(config: Config, data_dir: Path) -> BlobStorage:
    """The blob storage backend ``blob_storage`` names: files under ``data_dir/blobs`` or the S3 bucket.

    Raises :class:`StartupRefusedError` (one line, no secret) when S3 settings are missing.
    """
    if config.blob_storage != "s3":
        if config.database:
            log.warning(
                "blob_storage = files with PostgreSQL: blobs live on this replica's disk only;"
                " with several replicas set blob_storage = s3 (docs/blobs.md)"
            )
        return FileStorage(data_dir / "blobs")
    # botocore and httpx are imported only by a relay that stores blobs in S3 (start-up of every other command).
    from relay.blobs.s3 import S3Storage

    try:
        return S3Storage.from_environment(config.blob_bucket, os.environ)
    except ValueError as exc:
        raise StartupRefusedError(f"blob_storage = s3: {exc}") from None


async def check_identity(store: Store, config: Config, data_dir: Path, keyring: RelayKeyring) -> None:
    """Refuse to serve another relay's database, or with another relay key (relay/store/sql/identity.py).

    Raises :class:`StartupRefusedError` (one line for the operator). Without
    an explicit name (SQLite only: PostgreSQL requires one) the name is not
    bound, since the listen address may change between starts.
    """
    retired = await trio.to_thread.run_sync(retired_keys, data_dir)
    for note in await store.bind_identity(
        config.name.lower() or None, config.relay_name, keyring.key_id, [k.key_id for k in retired], wall_clock_ms()
    ):
        log.info("identity: %s", note)


async def run(config: Config, *, on_ready: Callable[[str, str], None]) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return.

    ``on_ready(base_url, relay_name)`` is called once the relay accepts traffic.
    Raises :class:`StartupRefusedError` (one line) for unusable TLS files, data
    directory or listen address, another relay's database or key, or a schema
    that needs newer code.
    """
    data_dir = Path(config.data)
    switchboard = Switchboard()
    # Everything an operator can get wrong is checked before the data directory or the database is touched.
    server = await trio.to_thread.run_sync(_server_or_refuse, config, switchboard)
    # Plain HTTP whatever the client port does: scrapers reach it inside the cluster, clients never.
    metrics_config = replace(config, listen=config.metrics_listen, tls_cert="", tls_key="")
    metrics_server = Server(metrics_config, metrics_listener) if config.metrics_listen else None
    try:
        await _bind_or_refuse(server, config.listen, "listen")
        if metrics_server is not None:
            await _bind_or_refuse(metrics_server, config.metrics_listen, "metrics_listen")
        await trio.to_thread.run_sync(check_data_dir, data_dir)
        relay_key = await trio.to_thread.run_sync(prepare_data_dir, data_dir)
        keyring = await trio.to_thread.run_sync(load_keyring, data_dir, wall_clock_ms())
        api_routes = all_routes(metrics=config.metrics_on_main_port)
        web_client = await trio.to_thread.run_sync(load_web_client, config, {route.template for route in api_routes})
        store = await open_store(config, data_dir)
    except BaseException:
        with trio.CancelScope(shield=True):
            await server.close_unserved()
            if metrics_server is not None:
                await metrics_server.close_unserved()
        raise
    try:
        await check_identity(store, config, data_dir, keyring)
        blob_storage = open_blob_storage(config, data_dir)
    except BaseException:
        with trio.CancelScope(shield=True):
            await server.close_unserved()
            if metrics_server is not None:
                await metrics_server.close_unserved()
        await store.close()
        raise
    outbound = OutboundClient()
    try:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(server.serve)
            if metrics_server is not None:
                metrics_port: int = await nursery.start(metrics_server.serve)
                log.info("metrics listener at %s/metrics", base_url(metrics_config, metrics_port))
            relay_name = config.name.lower() if config.name else f"{config.listen_host}:{port}"
            blob_settings = BlobSettings.from_config(config)
            limits = limits_from(config)
            services = Services.build(
                store,
                ServiceContext(relay_name=relay_name, limits=limits),
                RateSettings.from_config(config),
                federation=FederationSettings.from_config(config),
                keyring=keyring,
                peer_transport=outbound,
                webauthn=WebAuthnSettings.from_config(config, relay_name),
                prekeys=PrekeySettings.from_config(config),
                session_cache_ms=round(config.session_cache_seconds * 1000),
                blob_storage=blob_storage,
                blobs=blob_settings,
            )
            discovery = well_known(
                relay_name,
                bytes(relay_key.verify_key),
                limits,
                relay_keys=keyring.published,
                federation_endpoint=FEDERATION_PREFIX if services.federation.enabled else None,
            )
            application = Application(
                Api(services, discovery, config.stream_heartbeat_seconds),
                api_routes,
                unlisted=web_client.routes if web_client else (),
            )
            cors_origins = origin_list(config.cors_allowed_origins)
            switchboard.streaming = application.streams_body
            switchboard.application = (
                CorsGate(application, cors_origins, {route.method for route in api_routes})
                if cors_origins
                else application
            )
            nursery.start_soon(services.inbox.run_expiry, config.expiry_interval_seconds)
            # Revocations made through other replicas clear this process's session cache, which answers only
            # while it hears them (docs/decisions/0013-revocation-across-replicas.md).
            await nursery.start(
                store.watch_session_revocations, services.auth.revocation_noticed, services.auth.revocation_listener
            )
            # Commits made through other replicas wake this process's streams (PostgreSQL LISTEN/NOTIFY).
            await nursery.start(store.watch_inbox_commits, services.inbox.notifier.notify)
            nursery.start_soon(services.log.run_retention, config.expiry_interval_seconds)
            nursery.start_soon(services.blobs.run_collector)
            await nursery.start(store.watch_log_commits, services.log.notifier.notify)
            if services.federation.enabled:
                await nursery.start(services.federation.run_delivery)
            application.ready = True
            # Listen before announcing: a SIGTERM right after the ready line must drain, not kill.
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                on_ready(base_url(config, port), relay_name)
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
            application.ready = False
            await server.drain()
            nursery.cancel_scope.cancel()
    finally:
        await outbound.aclose()
        await blob_storage.aclose()
        await store.close()
        log.info("stopped")
