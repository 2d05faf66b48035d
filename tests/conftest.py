"""Shared test plumbing.

- ``async def test_*`` functions run under ``trio.run`` (no plugin needed).
- ``relay`` starts a real ``tetherless serve`` process on 127.0.0.1 (see tests/relay_process.py).
"""

from __future__ import annotations

import datetime
import functools
import inspect
import ipaddress
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import Phase, settings

from tests.relay_process import RelayProcess

# Client homes are encrypted (crypto.md §13): every test and every CLI
# subprocess it starts unlocks them with this passphrase, and the cheap
# Argon2id costs that exist for tests only, opted into explicitly
# (protocol/client/keystore.py: without the variable such a keystore is refused).
os.environ.setdefault("TETHERLESS_PASSPHRASE", "correct horse battery staple")
os.environ.setdefault("TETHERLESS_INSECURE_KDF", "1")

# Mutation runs (`make mutation`, docs/security.md "Mutation testing") repeat the tests that reach a
# mutated function once per mutant, so the property and state-machine tests run a few fixed examples
# there instead of dozens of random ones: a mutant then costs seconds, not the 70 s of the device-list
# state machine, and its verdict does not depend on the seed or on examples saved by another mutant.
# mutmut sets MUTANT_UNDER_TEST in every process it starts (also the stats and clean-test runs).
# No shrinking there: a mutant is killed by any failing example, and shrinking a failing state machine
# takes minutes (the mutant then times out instead of failing).
settings.register_profile(
    "mutation",
    max_examples=10,
    stateful_step_count=20,
    derandomize=True,
    database=None,
    deadline=None,
    phases=[Phase.explicit, Phase.generate],
    report_multiple_bugs=False,
)
# Otherwise no deadline either (hypothesis's own "ci" profile, loaded when CI is set, has none; this holds
# without it): examples take milliseconds, and a loaded two-core host that stalls one past 200 ms makes
# hypothesis fail the test as "unreliable test timings". Speed is measured in bench/, not here.
settings.register_profile("no_deadline", parent=settings.default, deadline=None)
settings.load_profile("mutation" if "MUTANT_UNDER_TEST" in os.environ else "no_deadline")


@pytest.hookimpl(tryfirst=True)
def pytest_pyfunc_call(pyfuncitem: pytest.Function) -> bool | None:
    if inspect.iscoroutinefunction(pyfuncitem.obj):
        funcargs = pyfuncitem.funcargs
        args = {name: funcargs[name] for name in pyfuncitem._fixtureinfo.argnames}
        trio.run(functools.partial(pyfuncitem.obj, **args))
        return True
    return None


@pytest.fixture
def relay(tmp_path: Path) -> Iterator[RelayProcess]:
    """A running relay with a fresh data directory; stopped (and checked for a clean exit) afterwards."""
    process = RelayProcess(tmp_path / "relay-data")
    process.start()
    try:
        yield process
    finally:
        process.stop()


def pytest_collection_modifyitems(items: list[Any]) -> None:
    for item in items:
        if "tests/e2e/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(pytest.mark.e2e)


@pytest.fixture
def tls_files(tmp_path: Path) -> tuple[str, str]:
    """A self-signed certificate for 127.0.0.1/localhost: (cert path, key path)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName([x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
            critical=False,
        )
        .sign(key, hashes.SHA256())
    )
    cert_path = tmp_path / "cert.pem"
    key_path = tmp_path / "key.pem"
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    return str(cert_path), str(key_path)
