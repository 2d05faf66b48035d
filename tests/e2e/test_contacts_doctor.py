"""Contacts and ``tetherless doctor`` (issue 14 point 4), end to end: real relay processes on loopback, the real
CLI in subprocesses, and a home made by the client before contacts existed (extracted from git, read-only).
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path
from typing import Any

import certifi
import pytest

from tests.e2e.test_equal_devices import ROOT, account_of, cli, init_device, link_device, ok
from tests.e2e.test_rolling_upgrade import _cli_package, git
from tests.e2e.test_tls import tls_relay  # noqa: F401  (the fixture)
from tests.relay_process import RelayProcess


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """A command that failed with exit ``code``, one stderr line and no traceback; returns that line."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr
    return lines[0]


def doctor(home: Path, *args: str, env: dict[str, str] | None = None) -> tuple[int, dict[str, Any]]:
    result = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), "doctor", "--json", *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env=env,
    )
    assert "Traceback" not in result.stderr, result.stderr
    assert result.stderr == "", result.stderr
    report = json.loads(result.stdout)
    return result.returncode, {c["check"]: c for c in report["checks"]} | {"ok": report["ok"]}


def test_contacts_send_by_name_and_every_output_shows_the_name(relay: RelayProcess, tmp_path: Path) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    alice = init_device(relay, alice_home)
    bob = init_device(relay, bob_home)

    assert ok(cli(alice_home, "contact", "add", "Bob", account_of(bob))).strip() == f"Bob: {account_of(bob)}"
    assert ok(cli(bob_home, "contact", "add", "alice", alice)).strip() == f"alice: {alice}"
    assert ok(cli(alice_home, "contact", "list")).split() == ["Bob", account_of(bob)]
    listed = [json.loads(line) for line in ok(cli(alice_home, "contact", "list", "--json")).splitlines()]
    assert listed == [{"name": "Bob", "address": account_of(bob)}]

    # The rules, each one line: a name is not an address (exit 2); a taken name needs --replace (exit 1).
    assert "'@'" in one_line_error(cli(alice_home, "contact", "add", "bob@home", account_of(bob)), 2)
    assert "not an address" in one_line_error(cli(alice_home, "contact", "add", "carol", "carol"), 2)
    assert "--replace" in one_line_error(cli(alice_home, "contact", "add", "BOB", alice), 1)

    # send by name (any case): delivered; stdout stays the message id, the name goes to stderr.
    sent = cli(alice_home, "send", "bob", "--text", "hello by name")
    (message_id,) = ok(sent).split()
    assert sent.stderr.startswith("sent to Bob (")
    assert "contact list" in one_line_error(cli(alice_home, "send", "nobody", "--text", "x"), 2)

    # bob's sync and history name alice (a device address); alice's history names Bob (her account contact).
    received = ok(cli(bob_home, "sync"))
    assert f"alice ({alice[:6]}…" in received
    assert "hello by name" in received
    (line,) = [json.loads(x) for x in ok(cli(bob_home, "history", "--json")).splitlines()]
    assert (line["sender"], line["sender_contact"], line["text"]) == (alice, "alice", "hello by name")
    assert line["message_id"] == message_id
    assert "← alice (" in ok(cli(bob_home, "history"))
    assert "→ Bob (" in ok(cli(alice_home, "history", "--with", "bob"))
    assert ok(cli(alice_home, "history", "--with", "bob", "--json")).count("hello by name") == 1

    # Offline: queued by name, and the outbox shows the name (plain and JSON).
    relay.stop()
    queued = ok(cli(alice_home, "send", "BOB", "--text", "while the relay is down"))
    assert queued.startswith("queued for Bob (")
    table = ok(cli(alice_home, "outbox")).splitlines()
    assert all("Bob (" in row for row in table[1:]), table  # "hello by name" (delivered, not yet logged) too
    rows = [json.loads(x) for x in ok(cli(alice_home, "outbox", "--json")).splitlines()]
    assert [(r["recipient"], r["contact"], r["state"]) for r in rows][-1] == (account_of(bob), "Bob", "queued")
    relay.start()
    assert cli(alice_home, "sync").returncode == 0
    sync_json = [json.loads(x) for x in ok(cli(bob_home, "sync", "--json")).splitlines() if '"text"' in x]
    assert [(m["from_contact"], m["text"]) for m in sync_json] == [("alice", "while the relay is down")]

    assert ok(cli(alice_home, "contact", "remove", "bob")).startswith("removed Bob")
    assert ok(cli(alice_home, "contact", "list")) == ""
    assert "no contact named" in one_line_error(cli(alice_home, "contact", "remove", "bob"), 1)
    assert "→ Bob (" not in ok(cli(alice_home, "history"))  # names are looked up at output time


def test_doctor_all_ok_then_locked_then_the_relay_stopped(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "alice"
    init_device(relay, home)
    code, checks = doctor(home)
    assert code == 0
    assert checks.pop("ok") is True
    assert list(checks) == ["home", "keystore", "relay", "tls", "clock", "device", "prekeys", "outbox", "state.db"]
    assert {name: c["level"] for name, c in checks.items()} == dict.fromkeys(checks, "ok"), checks
    assert relay.url in checks["relay"]["detail"]
    assert "one-time prekeys" in checks["prekeys"]["detail"]

    # Plain output: one line per check, and never a secret.
    plain = subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), "doctor"],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )  # fmt: skip
    assert plain.returncode == 0, plain.stderr
    lines = plain.stdout.splitlines()
    assert [line.split()[:2] for line in lines][:3] == [["ok", "home"], ["ok", "keystore"], ["ok", "relay"]]
    assert len(lines) == 9
    assert os.environ["TETHERLESS_PASSPHRASE"] not in plain.stdout

    # No passphrase off a terminal: the keystore says it needs one, the key-bound checks are skipped, exit 0.
    locked_env = {k: v for k, v in os.environ.items() if k != "TETHERLESS_PASSPHRASE"}
    code, checks = doctor(home, env=locked_env)
    assert code == 0
    assert checks["keystore"]["level"] == "warn"
    assert "passphrase" in checks["keystore"]["detail"]
    assert (checks["prekeys"]["level"], checks["outbox"]["level"]) == ("skip", "skip")
    assert (checks["relay"]["level"], checks["device"]["level"], checks["state.db"]["level"]) == ("ok", "ok", "ok")

    relay.stop()
    code, checks = doctor(home)
    assert code == 1
    assert checks["ok"] is False
    assert checks["relay"]["level"] == "fail"
    assert relay.url in checks["relay"]["detail"]
    assert "running" in checks["relay"]["hint"]
    assert checks["device"]["level"] == "skip"
    assert (checks["outbox"]["level"], checks["state.db"]["level"]) == ("ok", "ok")
    relay.start()


def test_doctor_over_tls_trusts_the_homes_ca_file_and_says_what_to_do_when_untrusted(
    tls_relay: RelayProcess,  # noqa: F811
    tls_files: tuple[str, str],
    tmp_path: Path,
) -> None:
    home = tmp_path / "alice"
    cert, _ = tls_files
    ok(cli(home, "device", "init", "--relay", tls_relay.url, "--ca-file", cert, "--no-recovery-key"))
    code, checks = doctor(home)
    assert code == 0, checks
    assert checks["tls"]["level"] == "ok"
    assert cert in checks["tls"]["detail"]

    code, checks = doctor(home, "--ca-file", certifi.where())  # a CA bundle that does not hold the relay's
    assert code == 1
    assert (checks["relay"]["level"], checks["tls"]["level"]) == ("fail", "fail")
    assert "not trusted" in checks["tls"]["detail"]
    assert "--ca-file" in checks["tls"]["hint"]
    assert checks["device"]["level"] == "skip"


def test_doctor_finds_a_revoked_device_and_a_damaged_state_db(relay: RelayProcess, tmp_path: Path) -> None:
    d1_home, d2_home = tmp_path / "d1", tmp_path / "d2"
    init_device(relay, d1_home)
    d2 = link_device(relay, d2_home, d1_home)
    ok(
        cli(d1_home, "device", "revoke", d2, "--yes")
        if "--yes" in _revoke_help()
        else cli(d1_home, "device", "revoke", d2)
    )
    code, checks = doctor(d2_home)
    assert code == 1
    assert checks["device"]["level"] == "fail"
    assert "revoked" in checks["device"]["detail"]

    state = d1_home / "state.db"
    ok(cli(d1_home, "sync"))
    with state.open("r+b") as f:  # a torn page in the middle of the file
        f.seek(state.stat().st_size // 2)
        f.write(b"\xff" * 4096)
    code, checks = doctor(d1_home)
    assert code == 1
    assert checks["state.db"]["level"] == "fail"
    assert "backup" in checks["state.db"]["hint"]


def _revoke_help() -> str:
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "device", "revoke", "--help"],
        capture_output=True, text=True, timeout=60, cwd=ROOT,
    ).stdout  # fmt: skip


# -- a home made by the client before contacts (schema 2) ----------------------------------------------------


def before_contacts() -> str:
    """The commit before migration 3 (contacts) was added to protocol/client/store.py (HEAD while uncommitted)."""
    added = git("log", "--reverse", "-S", "_create_contacts", "--format=%H", "--", "protocol/client/store.py")
    first = added.decode().split()
    return f"{first[0]}^" if first else "HEAD"


@pytest.fixture(scope="module")
def old_client(tmp_path_factory: pytest.TempPathFactory) -> Path:
    version = before_contacts()
    archive = git("archive", "--format=tar", version, "relay", "protocol", *_cli_package(version))
    target = tmp_path_factory.mktemp("before-contacts")
    with tarfile.open(fileobj=io.BytesIO(archive)) as tar:
        tar.extractall(target, filter="data")
    return target


def old_cli(code: Path, home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    module = "tetherless_cli" if (code / "tetherless_cli").is_dir() else "relay.cli"
    # PYTHONSAFEPATH keeps this checkout off sys.path: only the old code is imported.
    env = {**os.environ, "PYTHONSAFEPATH": "1", "PYTHONPATH": str(code)}
    return subprocess.run(
        [sys.executable, "-m", module, "--home", str(home), *args],
        capture_output=True, text=True, timeout=120, cwd=code, env=env,
    )  # fmt: skip


def test_a_home_made_before_contacts_opens_and_gains_them(
    relay: RelayProcess, tmp_path: Path, old_client: Path
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    bob = init_device(relay, bob_home)
    recovery = tmp_path / "alice.recovery"
    ok(old_cli(old_client, alice_home, "device", "init", "--relay", relay.url, "--recovery-key-file", str(recovery)))
    ok(old_cli(old_client, alice_home, "send", bob, "--text", "written by the old client"))
    version = subprocess.run(
        [sys.executable, "-c", "import sqlite3,sys; print(sqlite3.connect(sys.argv[1]).execute('PRAGMA user_version')"
         ".fetchone()[0])", str(alice_home / "state.db")],
        capture_output=True, text=True, check=True,
    ).stdout.strip()  # fmt: skip
    assert version == "2"

    ok(cli(alice_home, "contact", "add", "bob", bob))  # opening migrates (3), then the contact is stored
    history = ok(cli(alice_home, "history"))
    assert "→ bob (" in history
    assert "written by the old client" in history
    ok(cli(alice_home, "send", "bob", "--text", "and by the new one"))
    assert [m["text"] for m in map(json.loads, ok(cli(bob_home, "sync", "--json")).splitlines()) if "text" in m] == [
        "written by the old client",
        "and by the new one",
    ]
    code, checks = doctor(alice_home)
    assert code == 0, checks
