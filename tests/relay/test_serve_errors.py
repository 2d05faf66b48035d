"""``tetherless serve`` refuses what an operator can get wrong with one line and exit 2, before writing anything."""

from __future__ import annotations

import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    """``serve`` with the given flags; a relay that starts instead is stopped by the timeout (a failure here)."""
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "serve", "--no-web-client", *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def _refused(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode == 2, (done.returncode, done.stdout, done.stderr)
    assert "Traceback" not in done.stderr + done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("tetherless: error: "), line
    return line.removeprefix("tetherless: error: ")


@pytest.fixture
def busy_port() -> Iterator[int]:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def test_a_busy_port_names_the_address_and_writes_nothing(tmp_path: Path, busy_port: int) -> None:
    data = tmp_path / "data"
    reason = _refused(_serve("--data", str(data), "--listen", f"127.0.0.1:{busy_port}"))
    assert reason == (
        f"cannot listen on 127.0.0.1:{busy_port} (listen): the port is already in use"
        " (another relay or program listens there); choose another"
    )
    assert not data.exists()


def test_a_busy_metrics_port_is_named_as_such(tmp_path: Path, busy_port: int) -> None:
    reason = _refused(
        _serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--metrics-listen", f"127.0.0.1:{busy_port}")
    )
    assert reason.startswith(f"cannot listen on 127.0.0.1:{busy_port} (metrics_listen): the port is already in use")


def test_a_missing_certificate_is_named(tmp_path: Path) -> None:
    data = tmp_path / "data"
    missing = tmp_path / "nope.pem"
    reason = _refused(
        _serve("--data", str(data), "--listen", "127.0.0.1:0", "--tls-cert", str(missing), "--tls-key", str(missing))
    )
    assert reason == f"tls_cert {missing}: cannot read it: No such file or directory"
    assert not data.exists()


def test_a_missing_key_is_named(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    cert, _ = tls_files
    missing = tmp_path / "nope.key"
    reason = _refused(
        _serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", str(missing))
    )
    assert reason == f"tls_key {missing}: cannot read it: No such file or directory"


def test_swapped_certificate_and_key_are_called_swapped(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    cert, key = tls_files
    reason = _refused(
        _serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--tls-cert", key, "--tls-key", cert)
    )
    assert reason == f"tls_cert {key} and tls_key {cert} look swapped (the certificate is in tls_key)"


def test_a_key_of_another_certificate_is_named(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    cert, _ = tls_files
    other = tmp_path / "other.key"
    other.write_bytes(
        ec.generate_private_key(ec.SECP256R1()).private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    reason = _refused(
        _serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--tls-cert", cert, "--tls-key", str(other))
    )
    assert reason == f"tls_key {other} does not belong to the certificate in tls_cert {cert}"


def test_a_file_that_is_no_certificate_is_named(tmp_path: Path, tls_files: tuple[str, str]) -> None:
    _, key = tls_files
    junk = tmp_path / "junk.pem"
    junk.write_text("hello\n")
    reason = _refused(
        _serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--tls-cert", str(junk), "--tls-key", key)
    )
    assert reason == f"tls_cert {junk}: no PEM certificate in it"


def test_a_data_path_that_is_a_file_is_refused(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.write_text("not a directory")
    reason = _refused(_serve("--data", str(data), "--listen", "127.0.0.1:0"))
    assert reason == f"data directory {data}: exists and is not a directory"


def test_an_unknown_log_level_is_refused(tmp_path: Path) -> None:
    reason = _refused(_serve("--data", str(tmp_path / "d"), "--listen", "127.0.0.1:0", "--log-level", "loud"))
    assert reason == "log_level: expected debug, info, warning, error, got 'loud'"
    assert not (tmp_path / "d").exists()
