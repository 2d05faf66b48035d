"""Encrypted client homes through the real CLI (crypto.md §13): passphrase sources, v1 homes, `device protect`."""

from __future__ import annotations

import os
import stat
import subprocess
import sys
from pathlib import Path

import msgspec
import trio

from protocol.client import keystore as ks
from protocol.client.identity import IDENTITY_FILE
from protocol.client.sdk import RelayClient
from tests.relay_process import RelayProcess

ROOT = Path(__file__).resolve().parents[2]


def run(home: Path, *args: str, env_passphrase: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != ks.PASSPHRASE_ENV}
    if env_passphrase is not None:
        env[ks.PASSPHRASE_ENV] = env_passphrase
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
    )


def test_passphrase_file_env_and_missing(relay: RelayProcess, tmp_path: Path) -> None:
    home, secret = tmp_path / "home", tmp_path / "passphrase"
    secret.write_text("a long passphrase\n")
    created = run(home, "--passphrase-file", str(secret), "device", "init", "--relay", relay.url, "--no-recovery-key")
    assert created.returncode == 0, created.stderr
    address = created.stdout.strip()
    assert sorted(p.name for p in home.iterdir() if not p.name.startswith("state.db")) == [
        IDENTITY_FILE,
        ks.KEYSTORE_FILE,
    ]
    assert stat.S_IMODE((home / ks.KEYSTORE_FILE).stat().st_mode) == 0o600
    assert stat.S_IMODE((home / IDENTITY_FILE).stat().st_mode) == 0o600

    # The file's first line is the passphrase (the newline is not part of it) …
    assert run(home, "--passphrase-file", str(secret), "outbox").returncode == 0
    # … and so is the environment variable.
    assert run(home, "outbox", env_passphrase="a long passphrase").returncode == 0

    wrong = run(home, "outbox", env_passphrase="another one")
    assert wrong.returncode == 2  # off a terminal: no second try (tests/cli/test_prompts.py has the retry)
    assert wrong.stderr.startswith("tetherless: error: the keystore does not open: wrong passphrase")
    assert wrong.stdout == ""

    missing = run(home, "outbox")
    assert missing.returncode == 2
    assert missing.stderr.count("\n") == 1
    assert "--passphrase-file" in missing.stderr
    assert ks.PASSPHRASE_ENV in missing.stderr

    # whoami reads the public identity: no passphrase (docs/decisions/0010-cli-package.md).
    assert run(home, "whoami").stdout.strip() == address
    assert run(home, "whoami", "--account").stdout.strip() == address.split(".", 1)[1]

    unreadable = run(home, "--passphrase-file", str(tmp_path / "nope"), "outbox")
    assert unreadable.returncode == 2
    assert "cannot read --passphrase-file" in unreadable.stderr

    # No secret in clear in the home directory.
    for path in home.iterdir():
        assert b"a long passphrase" not in path.read_bytes()


def test_v1_home_keeps_working_and_is_protected_on_request(relay: RelayProcess, tmp_path: Path) -> None:
    home, peer_home = tmp_path / "v1", tmp_path / "peer"

    async def make_v1_home() -> str:
        async with RelayClient.connect(relay.url) as client:
            keys = await client.register("old", list_format=1)
        home.mkdir(mode=0o700)
        ks._atomic_write(home / ks.KEY_FILE, msgspec.json.encode(keys))
        return keys.address

    address = trio.run(make_v1_home)
    # A plaintext home needs no passphrase.
    assert run(home, "whoami").stdout.strip() == address
    peer = run(peer_home, "device", "init", "--relay", relay.url, "--no-recovery-key", env_passphrase="p")
    assert peer.returncode == 0, peer.stderr
    sent = run(peer_home, "send", address, "--text", "to the old home", env_passphrase="p")
    assert sent.returncode == 0, sent.stderr

    protected = run(home, "device", "protect", env_passphrase="new passphrase")
    assert protected.returncode == 0, protected.stderr
    assert not (home / ks.KEY_FILE).exists()
    assert (home / ks.KEYSTORE_FILE).exists()
    assert run(home, "outbox").returncode == 2  # now it needs the passphrase
    assert run(home, "whoami").stdout.strip() == address  # but not to say who it is: the public copy
    synced = run(home, "sync", env_passphrase="new passphrase")
    assert synced.returncode == 0, synced.stderr
    assert "to the old home" in synced.stdout

    # The account is still format 1: listed, but not changed by format-2 device management.
    listed = run(home, "device", "list", env_passphrase="new passphrase")
    assert listed.returncode == 0, listed.stderr
    assert "format 1" in listed.stdout
    revoke = run(home, "device", "revoke", address.split(".")[0], "--yes", env_passphrase="new passphrase")
    assert revoke.returncode == 1
    assert "format" in revoke.stderr

    again = run(home, "device", "protect", env_passphrase="new passphrase")
    assert again.returncode == 1
    assert "already protected" in again.stderr


def test_init_shows_the_recovery_key_once_on_the_terminal(relay: RelayProcess, tmp_path: Path) -> None:
    created = run(tmp_path / "home", "device", "init", "--relay", relay.url, env_passphrase="p")
    assert created.returncode == 0, created.stderr
    assert len(created.stdout.splitlines()) == 1  # stdout is the address only, for scripts
    key_line, advice = created.stderr.splitlines()
    assert key_line.startswith("tlr-")
    assert len(key_line) == len("tlr-") + 36 + 8
    assert "write this recovery key down" in advice
    for path in (tmp_path / "home").iterdir():
        assert key_line.encode() not in path.read_bytes()
