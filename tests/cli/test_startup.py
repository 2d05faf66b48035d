"""``tetherless --help``, ``--version`` and ``whoami`` import nothing heavy (docs/decisions/0010-cli-package.md).

Deterministic: each command runs in a fresh interpreter that reports the modules it imported; no timing.
The CPU figures are bench/cli_startup.py's.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.client.identity import IDENTITY_FILE, encode_identity
from tests.e2e.test_cli_errors import cli, init, ok
from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parents[2]

# Top-level packages no start-up path may import; `relay` and the SDK's heavy modules included.
HEAVY = (
    "trio",
    "cryptography",
    "nacl",
    "msgspec",
    "sqlite3",
    "sqlite_utils",
    "psycopg",
    "fido2",
    "h2",
    "h11",
    "relay",
)

# Runs the CLI in-process (as `python -m tetherless_cli ARGS` would) and prints the modules loaded by then.
PROBE = """
import json, runpy, sys
sys.argv = ["tetherless", *json.loads(sys.argv[1])]
try:
    runpy.run_module("tetherless_cli", run_name="__main__")
except SystemExit as exc:
    code = exc.code
print("\\nMODULES " + json.dumps(sorted(sys.modules)) + " EXIT " + json.dumps(code))
"""


def imported(*args: str, env: dict[str, str] | None = None) -> tuple[set[str], object, str]:
    done = subprocess.run(
        [sys.executable, "-c", PROBE, json.dumps(list(args))],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )
    marker = done.stdout.rindex("\nMODULES ")
    modules_json, _, code_json = done.stdout[marker + len("\nMODULES ") :].strip().rpartition(" EXIT ")
    return set(json.loads(modules_json)), json.loads(code_json), done.stdout[:marker]


def heavy(modules: set[str]) -> list[str]:
    bad = {m for m in modules if m.split(".")[0] in HEAVY}
    bad |= {m for m in modules if m.startswith("protocol.client.") and m != "protocol.client.identity"}
    return sorted(bad)


@pytest.mark.parametrize(
    "args",
    [
        ("--help",),
        ("--version",),
        ("send", "--help"),
        ("device", "approve", "--help"),
        ("serve", "--help"),
        ("admin", "federation", "--help"),
    ],
)
def test_help_and_version_import_nothing_heavy(args: tuple[str, ...]) -> None:
    modules, code, _ = imported(*args)
    assert code in (0, None)
    assert heavy(modules) == []


def test_version_comes_from_the_package_metadata() -> None:
    from importlib.metadata import version

    _, _, out = imported("--version")
    assert out.strip() == f"tetherless {version('tetherless')}"


def test_whoami_reads_the_public_identity_without_cryptography(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    (home / IDENTITY_FILE).write_bytes(encode_identity("dev.acct@relay.test", "https://relay.test"))
    (home / IDENTITY_FILE).chmod(0o600)
    env = {"TETHERLESS_PASSPHRASE": ""}
    modules, code, out = imported("whoami", "--home", str(home), env=env)
    assert (code, out.strip()) in ((0, "dev.acct@relay.test"), (None, "dev.acct@relay.test"))
    assert heavy(modules) == []
    # After the command, too: `tetherless whoami --home H` is the same as `tetherless --home H whoami`.
    modules, _, out = imported("--home", str(home), "whoami", "--account", env=env)
    assert out.strip() == "acct@relay.test"
    assert heavy(modules) == []


# What `send` to an established session must not import (issue 14 point 2, docs/performance.md "CLI start-up"):
# fido2 (and cryptography.x509 with its attestation formats) is for hardware-key approvals only
# (protocol/webauthn.py imports it where a credential is parsed); sqlite_utils is not the client's
# (protocol/client/localdb.py builds one only when `LocalDB.db` is asked for).
NOT_FOR_SEND = ("fido2", "sqlite_utils", "cryptography.x509")


def not_for_send(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in NOT_FOR_SEND))


def test_the_modules_send_needs_import_no_fido2_sqlite_utils_or_x509() -> None:
    code = "import json, sys, tetherless_cli.messages, protocol.client.home; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert {"protocol.device_list", "protocol.webauthn", "protocol.client.localdb"} <= modules
    assert not_for_send(modules) == []


def test_send_to_an_established_session_imports_no_fido2_sqlite_utils_or_x509(
    relay: RelayProcess, tmp_path: Path
) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    bob_address = init(relay.url, bob)
    init(relay.url, alice)
    ok(cli(alice, "send", bob_address, "--text", "the first message starts the session"))
    # The real command in a fresh interpreter, against the real relay: imports made while it runs count too.
    modules, code, out = imported("--home", str(alice), "send", bob_address, "--text", "the second")
    assert code in (0, None), out
    assert re.fullmatch(r"[a-z2-7]{26}", out.strip()), out  # the message id: delivered, not "queued (…)"
    assert not_for_send(modules) == []
