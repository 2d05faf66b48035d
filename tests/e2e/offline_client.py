"""Helpers for the offline-first client's end-to-end tests: CLI runs, ``sync --follow`` processes, local stores."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from protocol.client.home import open_store
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.store import ClientStore

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = "correct horse battery staple"
ENV = {
    **os.environ,
    "TETHERLESS_PASSPHRASE": PASSPHRASE,
    "TETHERLESS_INSECURE_KDF": "1",
    "TETHERLESS_SYNC_MAX_BACKOFF": "1.0",
    "TETHERLESS_SYNC_POLL_SECONDS": "0.5",
    "PYTHONUNBUFFERED": "1",
}


def cli(
    home: Path, *args: str, timeout: float = 120, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
        env={**ENV, **(env or {})},
        check=False,
    )


def init_device(relay_url: str, home: Path, name: str) -> str:
    result = cli(home, "device", "init", "--relay", relay_url, "--name", name)
    assert result.returncode == 0, result.stderr
    return result.stdout.strip()


def history(home: Path) -> list[dict[str, Any]]:
    result = cli(home, "history", "--json")
    assert result.returncode == 0, result.stderr
    return [json.loads(line) for line in result.stdout.splitlines()]


def keystore(home: Path) -> Keystore:
    return Keystore(home, passphrase=PASSPHRASE)


def load(home: Path) -> tuple[Keystore, DeviceKeys, ClientStore]:
    ks = keystore(home)
    keys = ks.load()
    return ks, keys, open_store(ks, keys)


class Follower:
    """A ``tetherless sync --follow`` child process for one home (stdout/stderr to files)."""

    def __init__(self, home: Path, log_dir: Path, name: str) -> None:
        self.home = home
        self.out = log_dir / f"{name}.out"
        self.err = log_dir / f"{name}.err"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.out.open("ab") as out, self.err.open("ab") as err:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "tetherless_cli", "--home", str(self.home), "sync", "--follow", "--status"],
                stdout=out,
                stderr=err,
                cwd=ROOT,
                env=ENV,
            )

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def stop(self, *, hard: bool = False, timeout: float = 20) -> int:
        if self.proc is None:
            return 0
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if hard else signal.SIGTERM)
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self.proc = None
        return code

    def restart(self, *, hard: bool) -> None:
        self.stop(hard=hard)
        self.start()


def wait_until(predicate: Any, timeout: float, what: str, interval: float = 0.25) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(interval)


# -- in-process engines (fast setup; the devices under test still run the real CLI) ---------------------

NO_RATE_LIMITS = {
    "TETHERLESS_RATE_IP_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_REQUESTS_PER_SECOND": "0",
    "TETHERLESS_RATE_DEVICE_ENVELOPES_PER_SECOND": "0",
    "TETHERLESS_RATE_ACCOUNT_ENVELOPES_PER_SECOND": "0",
}


def enqueue_many(home: Path, recipient: str, texts: list[str]) -> None:
    """Put ``texts`` in a device's outbox in one local transaction (what ``send`` does, minus the flush)."""
    _, _, store = load(home)
    peer = recipient.split(".", 1)[-1] if "." in recipient.split("@", 1)[0] else recipient
    with store.transaction():
        for text in texts:
            store.enqueue(recipient, "text/plain; charset=utf-8", text.encode(), peer=peer)
    store.db.close()


async def run_engine(home: Path) -> int:
    """One ``sync`` (until quiescent) of the device at ``home``, in this process; the exit status ``tetherless sync``
    would give (0, 3, 4)."""
    from protocol.client.home import make_engine
    from tetherless_cli.messages import sync_exit_code

    ks, keys, store = load(home)
    try:
        return sync_exit_code(await make_engine(keys, store).run(follow=False, timeout=60))
    finally:
        store.db.close()
        ks.close()


async def link_device(relay_url: str, approver_home: Path, new_home: Path, name: str) -> str:
    """Enrol a new device into the approver's account with a link code (protocol/client/devices.py)."""
    import trio

    from protocol.client import devices
    from protocol.client.sdk import RelayClient

    approver_ks = keystore(approver_home)
    approver_keys = approver_ks.load()
    new_ks = keystore(new_home)
    async with (
        RelayClient.connect(relay_url) as new_client,
        RelayClient.connect(relay_url, keys=approver_keys) as approver,
    ):
        pending = await devices.start_link(new_client)
        result: list[str] = []

        async def join() -> None:
            keys = await devices.finish_link(new_client, pending, keystore=new_ks, name=name, poll_seconds=0.2)
            result.append(keys.address)

        async with trio.open_nursery() as nursery:
            nursery.start_soon(join)
            await devices.approve_link(approver, pending.code)
    new_ks.close()
    approver_ks.close()
    return result[0]
