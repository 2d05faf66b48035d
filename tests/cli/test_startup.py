"""``tetherless --help``, ``--version`` and ``whoami`` import nothing heavy (docs/decisions/0010-cli-package.md).

Deterministic: each command runs in a fresh interpreter that reports the modules it imported; no timing.
The CPU figures are bench/cli_startup.py's.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import io
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from protocol.client.identity import IDENTITY_FILE, encode_identity
from tests.e2e.test_cli_errors import cli, init, ok
from tests.relay_process import RelayProcess
from tetherless_cli.main import without_collecting
from tetherless_cli.parser import COMMANDS, build_parser, command_named

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
# (protocol/client/localdb.py builds one only when `LocalDB.db` is asked for). Third round: protocol.webauthn
# itself (protocol/device_list.py imports it where a list holds a credential), getpass and termios (only a
# passphrase prompt), the catch-up progress line (only `sync` draws it). Issue 15: the media code (only `send
# --file`, `blob get` and a file message shown by `sync` / `history`).
NOT_FOR_SEND = (
    "fido2",
    "sqlite_utils",
    "cryptography.x509",
    "protocol.webauthn",
    "getpass",
    "termios",
    "tetherless_cli.progress",
    "protocol.blobs",
    "protocol.client.blobs",
    "tetherless_cli.blobs",
    "mimetypes",
)


def not_for_send(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if any(m == p or m.startswith(p + ".") for p in NOT_FOR_SEND))


def test_the_modules_send_needs_import_nothing_it_does_not_use() -> None:
    code = "import json, sys, tetherless_cli.messages, protocol.client.home; print(json.dumps(sorted(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0, done.stderr
    modules = set(json.loads(done.stdout))
    assert {"protocol.device_list", "protocol.client.localdb", "trio"} <= modules
    assert not_for_send(modules) == []


def test_send_to_an_established_session_imports_nothing_it_does_not_use(relay: RelayProcess, tmp_path: Path) -> None:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    bob_address = init(relay.url, bob)
    init(relay.url, alice)
    ok(cli(alice, "send", bob_address, "--text", "the first message starts the session"))
    # The real command in a fresh interpreter, against the real relay: imports made while it runs count too.
    modules, code, out = imported("--home", str(alice), "send", bob_address, "--text", "the second")
    assert code in (0, None), out
    assert re.fullmatch(r"[a-z2-7]{26}", out.strip()), out  # the message id: delivered, not "queued (…)"
    assert not_for_send(modules) == []


# `tetherless CMD …` declares only CMD (tetherless_cli.parser.command_named): every line must parse, and fail, exactly
# as with the whole parser.
SAME_AS_THE_WHOLE_PARSER = [
    [],
    ["--version"],
    ["--vers"],
    ["--version", "--home", "H"],
    ["--version", "send", "a.b@c"],
    ["--help"],
    ["-h"],
    ["--home"],
    ["--home", "H"],
    ["--home", "H", "send", "a.b@c", "--text", "hi"],
    ["--home=H", "--passphrase-file", "P", "sync", "--json"],
    ["--ho", "send", "send", "a.b@c"],  # --home's value is "send"
    ["--ho", "send", "sync"],
    ["--h", "H", "send", "a.b@c"],  # ambiguous: --help or --home
    ["--c", "ca.pem", "whoami", "--account"],
    ["--", "send", "a.b@c"],
    ["send"],
    ["send", "a.b@c", "--bogus"],
    ["send", "--help"],
    ["sned", "a.b@c"],
    ["whoami", "--home", "H"],
    ["device", "list", "--json"],
    ["device", "fido2", "remove", "abcdef12", "--yes"],
    ["device"],
    ["outbox", "cancel", "0"],
    ["outbox", "retry", "7"],
    ["history", "--limit", "-1"],
    ["log", "retention", "30"],
    ["contact", "add", "alice", "a.b@c"],
    ["admin", "relay-key", "rotate", "--overlap-days", "2"],
    ["serve", "--listen", "127.0.0.1:0", "--peer", "b=http://x"],
    ["config", "show"],
    ["doctor", "--timeout", "0"],
]


def parsed(parser: argparse.ArgumentParser, argv: list[str]) -> tuple[object, str, str]:
    """What ``parser`` makes of ``argv``: the namespace or the exit code, and its stdout and stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            result: object = vars(parser.parse_args(argv))
        except SystemExit as exc:
            result = ("exit", exc.code)
    return result, out.getvalue(), err.getvalue()


@pytest.mark.parametrize("argv", SAME_AS_THE_WHOLE_PARSER, ids=" ".join)
def test_the_parser_of_one_command_parses_like_the_whole_parser(
    argv: list[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("COLUMNS", "100")  # the same help layout in both
    assert parsed(build_parser(argv), argv) == parsed(build_parser(), argv)


def test_a_command_line_declares_only_the_command_it_names() -> None:
    assert command_named(["--home", "H", "send", "a.b@c"]) == "send"
    assert command_named(["--ho", "send", "sync"]) == "sync"
    assert command_named(["--version"]) == ""
    for argv in (["--help"], ["--h", "H", "send"], ["sned"], ["--", "send"], ["-h", "send"]):
        assert command_named(argv) is None, argv
    subcommands = next(a for a in build_parser(["send", "x"])._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subcommands.choices) == ["send"]
    everything = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    assert list(everything.choices) == list(COMMANDS)


def test_a_command_is_imported_without_the_collector_and_frozen() -> None:
    """tetherless_cli.main.without_collecting: the collector is off while the command's modules load (it would scan
    them ~80 times and free nothing), what they made is frozen, and the collector is on again for the command."""
    seen: list[bool] = []

    def load(name: str) -> Callable[[Any], Any]:
        seen.append(gc.isenabled())
        return print

    assert gc.isenabled()
    frozen = gc.get_freeze_count()
    try:
        assert without_collecting(load, "x:y") is print
        assert seen == [False]
        assert gc.isenabled()
        assert gc.get_freeze_count() > frozen
        gc.disable()  # a caller that had it off keeps it off
        without_collecting(load, "x:y")
        assert not gc.isenabled()
    finally:
        gc.unfreeze()
        gc.enable()
