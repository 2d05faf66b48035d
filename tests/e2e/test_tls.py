"""A relay serving TLS: ALPN h2 and http/1.1 on one port, with curl and with the client SDK."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from protocol.client.sdk import ReceivedMessage, RelayClient
from tests.relay_process import RelayProcess


@pytest.fixture
def tls_relay(tmp_path: Path, tls_files: tuple[str, str]) -> Iterator[RelayProcess]:
    cert, key = tls_files
    process = RelayProcess(tmp_path / "data", extra_args=["--tls-cert", cert, "--tls-key", key])
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.mark.skipif(not shutil.which("curl"), reason="curl not installed (CI installs it)")
@pytest.mark.parametrize(("mode", "version"), [("--http2", "2"), ("--http1.1", "1.1")])
def test_curl_over_tls(tls_relay: RelayProcess, tls_files: tuple[str, str], mode: str, version: str) -> None:
    assert tls_relay.url.startswith("https://")
    out = subprocess.run(
        [
            "curl",
            "-sS",
            mode,
            "--cacert",
            tls_files[0],
            "-w",
            "\\n%{http_code} %{http_version}",
            tls_relay.url + "/livez",
        ],
        capture_output=True,
        text=True,
        timeout=30,
        check=True,
    ).stdout
    assert out.rsplit("\n", 1)[1] == f"200 {version}"


async def test_sdk_over_tls(tls_relay: RelayProcess, tls_files: tuple[str, str]) -> None:
    ca = tls_files[0]
    async with (
        RelayClient.connect(tls_relay.url, ca_file=ca) as alice,
        RelayClient.connect(tls_relay.url, ca_file=ca) as bob,
    ):
        await alice.register("alice")
        bob_keys = await bob.register("bob")
        await alice.send(bob_keys.address, "over TLS")
        batch = await bob.fetch()
        assert [m.text for m in batch.items if isinstance(m, ReceivedMessage)] == ["over TLS"]


async def test_sdk_refuses_an_untrusted_certificate(tls_relay: RelayProcess) -> None:
    from protocol.client.http import ConnectError

    async with RelayClient.connect(tls_relay.url, max_attempts=1) as client:
        with pytest.raises(ConnectError):
            await client.well_known()
