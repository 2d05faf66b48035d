"""The front door without processes: dispatch by name, the exit-code table, global options after a command."""

from __future__ import annotations

import argparse
import inspect
import os
import subprocess
import sys
from pathlib import Path

import pytest

from protocol.client.chains import DeviceRevokedError
from protocol.client.contacts import ContactExistsError, InvalidContactError
from protocol.client.fido2 import NoSecurityKeyError, SecurityKeyError
from protocol.client.http import ConnectError, ConnectionLostError, NotTLSError, TLSRequiredError, TLSTrustError
from protocol.client.identity import IDENTITY_FILE, encode_identity
from protocol.client.outbox import UnknownOutboxEntryError
from protocol.client.sync import SyncOutcome
from protocol.errors import ErrorCode, RemoteError
from tetherless_cli import exits
from tetherless_cli.main import CO_COROUTINE, is_async, report, resolve_handler
from tetherless_cli.messages import sync_exit_code
from tetherless_cli.parser import build_parser

ROOT = Path(__file__).resolve().parents[2]


def leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, child in action.choices.items():
                found += leaf_parsers(child, (*path, name))
    return found or [path]


def test_every_command_names_a_handler_that_exists() -> None:
    parser = build_parser()
    leaves = leaf_parsers(parser)
    assert len(leaves) >= 20
    for path in leaves:
        sub = parser
        for name in path:
            sub = next(a for a in sub._actions if isinstance(a, argparse._SubParsersAction)).choices[name]
        handler_name = sub.get_default("handler")
        assert isinstance(handler_name, str), path
        handler = resolve_handler(handler_name)
        assert callable(handler), path
        assert is_async(handler) == inspect.iscoroutinefunction(handler), path


def test_co_coroutine_is_inspects() -> None:
    assert CO_COROUTINE == inspect.CO_COROUTINE


def test_exit_code_table_is_stable() -> None:
    # Scripts depend on these numbers (issue 14: 3 stays "home relay unreachable", 4 "this device is revoked").
    assert (exits.EXIT_OK, exits.EXIT_FAILURE, exits.EXIT_USAGE, exits.EXIT_UNREACHABLE, exits.EXIT_REVOKED) == (
        0,
        1,
        2,
        3,
        4,
    )
    assert exits.EXIT_INTERRUPTED == 130


@pytest.mark.parametrize("command", [["send", "a.b@c"], ["sync"], ["whoami"], ["device", "list"], ["log", "snapshot"]])
def test_global_options_after_the_command(command: list[str]) -> None:
    parser = build_parser()
    after = parser.parse_args([*command, "--home", "H", "--passphrase-file", "P"])
    assert (after.home, after.passphrase_file) == ("H", "P")
    before = parser.parse_args(["--home", "H", "--passphrase-file", "P", *command])
    assert (before.home, before.passphrase_file) == ("H", "P")
    neither = parser.parse_args(command)
    assert (neither.home, neither.passphrase_file) == (None, None)


def test_report_one_line_and_the_exit_code(capsys: pytest.CaptureFixture[str]) -> None:
    cases: list[tuple[Exception, int, str]] = [
        (exits.UsageError("bad --since"), 2, "tetherless: error: bad --since"),
        (DeviceRevokedError("d1", "acct@r", 3), 4, "tetherless: error: device_revoked: this device (d1)"),
        (
            RemoteError(ErrorCode.DEVICE_REVOKED, "gone", http_status=403),
            4,
            "tetherless: error: device_revoked: this device was revoked",
        ),
        (RemoteError(ErrorCode.NOT_FOUND, "no such", http_status=404), 1, "tetherless: error: not_found: no such"),
        (ConnectError("refused"), 1, "tetherless: error: cannot reach the relay at https://r.test: refused"),
        (ValueError("boom"), 1, "tetherless: error: internal: ValueError: boom"),
    ]
    for exc, code, line in cases:
        assert report(exc, relay_url="https://r.test") == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(line), (err, line)


def test_a_transport_error_that_is_not_retryable_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    """main.report reads ``retryable``: a transport error only a setting fixes (TLS set-up) is exit 2, one that
    may pass (a relay restarting) stays exit 1 with its line."""
    cases: list[tuple[Exception, int, str]] = [
        (NotTLSError("r:1 does not speak TLS on that port"), 2, "tetherless: error: r:1 does not speak TLS"),
        (TLSRequiredError("r:1 speaks TLS on that port"), 2, "tetherless: error: r:1 speaks TLS on that port"),
        (TLSTrustError("the TLS certificate of r:1 is not trusted", host="r"), 2, "tetherless: error: the TLS"),
        (ConnectionLostError("GOAWAY"), 1, "tetherless: error: connection to the relay failed: GOAWAY"),
    ]
    for exc, code, line in cases:
        assert report(exc) == code
        err = capsys.readouterr().err
        assert err.count("\n") == 1, err
        assert err.startswith(line), (err, line)


def test_the_sdk_local_errors_go_through_the_one_funnel(capsys: pytest.CaptureFixture[str]) -> None:
    """Contacts, outbox and security-key errors are one line and their exit code from main.report, so the
    handlers raise instead of printing (issue 14: one error funnel)."""
    cases: list[tuple[Exception, int]] = [
        (InvalidContactError("a name has no '@'"), 2),
        (ContactExistsError("bob is taken: --replace to change it"), 1),
        (UnknownOutboxEntryError("no outbox entry 7"), 1),
        (NoSecurityKeyError(), 1),
        (SecurityKeyError("the security key did not sign: it was not touched in time"), 1),
    ]
    for exc, code in cases:
        assert report(exc) == code, exc
        assert capsys.readouterr().err == f"tetherless: error: {exc}\n"


def test_the_funnel_imports_no_module_to_tell_errors_apart() -> None:
    """An error of a module that is not imported cannot have been raised: report() looks it up, never imports."""
    code = (
        "import sys; from tetherless_cli.main import report; report(ValueError('x'));"
        "print(sorted(m for m in ('protocol.client.contacts', 'protocol.client.outbox', 'protocol.client.fido2',"
        " 'fido2') if m in sys.modules))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True)
    assert done.stdout.strip() == "[]"


def test_every_sync_outcome_has_its_exit_code() -> None:
    # The SDK returns outcomes; the command line maps them in one place (issue 14: 3 and 4 keep their meaning).
    assert {outcome: sync_exit_code(outcome) for outcome in SyncOutcome} == {
        SyncOutcome.DONE: exits.EXIT_OK,
        SyncOutcome.HOME_UNREACHABLE: exits.EXIT_UNREACHABLE,
        SyncOutcome.REVOKED: exits.EXIT_REVOKED,
    }


def test_no_command_is_a_usage_error() -> None:
    done = subprocess.run(
        [sys.executable, "-m", "tetherless_cli"], capture_output=True, text=True, timeout=60, cwd=ROOT, check=False
    )
    assert done.returncode == 2
    assert "a COMMAND is required" in done.stderr


def whoami(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "TETHERLESS_PASSPHRASE"}
    return subprocess.run(
        [sys.executable, "-m", "tetherless_cli", "whoami", "--home", str(home), *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=ROOT,
        env=env,
        stdin=subprocess.DEVNULL,
        check=False,
    )


def test_whoami_never_shows_a_public_copy_others_could_have_written(tmp_path: Path) -> None:
    home = tmp_path / "home"
    home.mkdir(mode=0o700)
    path = home / IDENTITY_FILE
    path.write_bytes(encode_identity("dev.acct@relay.test", "https://relay.test"))
    path.chmod(0o600)
    assert whoami(home).stdout.strip() == "dev.acct@relay.test"
    path.chmod(0o644)  # group/world-readable is fine for public data, but the rule is the keystore's: private
    refused = whoami(home)
    assert refused.stdout == ""
    assert refused.returncode == 1  # fell back to the keystore, which finds no device here
    assert "no device in" in refused.stderr
    path.chmod(0o600)
    path.write_bytes(b'{"format": 2, "address": "dev.acct@relay.test", "relay_url": "x"}')
    assert whoami(home).returncode == 1


@pytest.mark.parametrize(
    ("argv", "said"),
    [
        (["history", "--limit", "-1"], "'-1' is not a whole number of 0 or more"),
        (["history", "--limit", "ten"], "'ten' is not a whole number of 0 or more"),
        (["outbox", "cancel", "0"], "'0' is not an outbox ID"),
        (["outbox", "retry", "-3"], "'-3' is not an outbox ID"),
        (["sync", "--timeout", "0"], "'0' is not a number of seconds above 0"),
        (["sync", "--timeout", "nan"], "'nan' is not a number of seconds above 0"),
        (["device", "approve", "tl-x", "--timeout", "-5"], "'-5' is not a number of seconds above 0"),
        (["doctor", "--timeout", "-1"], "'-1' is not a number of seconds above 0"),
    ],
)
def test_a_negative_or_nonsense_number_is_a_one_line_usage_error(
    argv: list[str], said: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(argv)
    assert exit_info.value.code == exits.EXIT_USAGE
    err = capsys.readouterr().err
    assert said in err
    assert "Traceback" not in err


def test_zero_is_a_valid_history_limit_and_whole_numbers_pass() -> None:
    assert build_parser().parse_args(["history", "--limit", "0"]).limit == 0
    assert build_parser().parse_args(["outbox", "cancel", "7"]).local_id == 7
    assert build_parser().parse_args(["sync", "--timeout", "2.5"]).timeout == 2.5
