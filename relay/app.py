"""Composition root: build the store, services, API and transport of one relay process, and run it.

Start-up: open the store (migrating it), bind the listener, then install the
application and turn ``/readyz`` green. Shutdown on SIGTERM/SIGINT:
``/readyz`` turns 503, the transport drains (GOAWAY, in-flight requests
finish, streams end), background tasks stop, the store closes.
"""

from __future__ import annotations

import logging
import os
import signal
from collections.abc import Callable
from pathlib import Path

import nacl.signing
import trio

from protocol.errors import ErrorCode, TetherlessError
from relay.api.application import Application, problem_response
from relay.api.http import Request, Response
from relay.api.routes import Endpoints, well_known
from relay.config import Config
from relay.services import RateSettings, ServiceContext, Services, limits_from
from relay.store import SQLiteStore
from relay.transport import Server

log = logging.getLogger("relay.app")
RELAY_KEY_FILE = "relay.key"


class Switchboard:
    """The transport's handler: answers 503 ``unavailable`` until the application is installed."""

    def __init__(self) -> None:
        self.application: Application | None = None

    async def __call__(self, request: Request) -> Response:
        if self.application is None:
            return problem_response(TetherlessError(ErrorCode.UNAVAILABLE, "starting", retry_after_seconds=1))
        return await self.application(request)


def load_or_create_relay_key(data_dir: Path) -> nacl.signing.SigningKey:
    """The relay's Ed25519 key, created (owner-only) on first start."""
    path = data_dir / RELAY_KEY_FILE
    if path.exists():
        seed = path.read_bytes()
        if len(seed) != 32:
            raise SystemExit(f"{path}: not a relay key (expected 32 bytes)")
        return nacl.signing.SigningKey(seed)
    key = nacl.signing.SigningKey.generate()
    tmp = path.with_suffix(".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        os.write(fd, bytes(key))
        os.fsync(fd)
    finally:
        os.close(fd)
    os.replace(tmp, path)
    return key


def prepare_data_dir(data_dir: Path) -> nacl.signing.SigningKey:
    """Create the data directory (owner-only) and return the relay key."""
    data_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
    return load_or_create_relay_key(data_dir)


def base_url(config: Config, port: int) -> str:
    host = config.listen_host
    if ":" in host:
        host = f"[{host}]"
    return f"{'https' if config.tls else 'http'}://{host}:{port}"


async def run(config: Config, *, on_ready: Callable[[str, str], None]) -> None:
    """Serve until SIGTERM/SIGINT, then drain and return.

    ``on_ready(base_url, relay_name)`` is called once the relay accepts traffic.
    """
    data_dir = Path(config.data)
    relay_key = await trio.to_thread.run_sync(prepare_data_dir, data_dir)
    store = await SQLiteStore.open(
        data_dir,
        cache_mib=config.sqlite_cache_mib,
        readers=config.sqlite_readers,
        group_commit_max_ops=config.group_commit_max_ops,
    )
    switchboard = Switchboard()
    server = Server(config, switchboard)
    try:
        async with trio.open_nursery() as nursery:
            port: int = await nursery.start(server.serve)
            relay_name = config.name.lower() if config.name else f"{config.listen_host}:{port}"
            limits = limits_from(config)
            services = Services.build(
                store, ServiceContext(relay_name=relay_name, limits=limits), RateSettings.from_config(config)
            )
            endpoints = Endpoints(
                services, well_known(relay_name, bytes(relay_key.verify_key), limits), config.stream_heartbeat_seconds
            )
            application = Application(services, endpoints)
            switchboard.application = application
            nursery.start_soon(services.inbox.run_expiry, config.expiry_interval_seconds)
            application.ready = True
            on_ready(base_url(config, port), relay_name)
            with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
                async for signum in signals:
                    log.info("received %s: draining", signal.Signals(signum).name)
                    break
            application.ready = False
            await server.drain()
            nursery.cancel_scope.cancel()
    finally:
        await store.close()
        log.info("stopped")
