"""Errors and outputs a person understands (issue 14 point 4), through the real CLI against real relays.

TLS mismatches (untrusted certificate, https:// on a plain port, http:// on a TLS port) are one line and exit 2;
``--ca-file`` works on every client command; ``device revoke`` / ``device approve`` need ``--yes`` off a
terminal; ``--name`` shows in ``device list``; ``history --limit N`` is the newest N; one message id across
``send``, ``sync --json`` and ``history --json``. The terminal-only behaviour (prompts, the progress line) is in
tests/cli/test_prompts.py.
"""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

from tests.conftest import tls_files
from tests.e2e.test_equal_devices import cli as equal_devices_cli
from tests.e2e.test_equal_devices import ok
from tests.e2e.test_tls import tls_relay
from tests.relay_process import RelayProcess

__all__ = ["tls_relay"]  # a fixture, used by name


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return equal_devices_cli(home, *args, stdin="")  # stdin a pipe: never a terminal, whoever runs the tests


def one_line_error(result: subprocess.CompletedProcess[str], code: int) -> str:
    """The command failed with ``code`` and said so in exactly one stderr line, without a traceback."""
    assert result.returncode == code, (result.returncode, result.stdout, result.stderr)
    assert result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("tetherless: error: "), result.stderr
    assert "Traceback" not in result.stderr
    return result.stderr


def init(relay_url: str, home: Path, *extra: str) -> str:
    return ok(cli(home, "device", "init", "--relay", relay_url, "--no-recovery-key", *extra)).strip()


def other_ca(tmp_path: Path) -> str:
    """A self-signed CA certificate that signed nothing the relay serves (conftest's maker, a second time)."""
    where = tmp_path / "other-ca"
    where.mkdir()
    certificate: str = tls_files.__wrapped__(where)[0]
    return certificate


# -- TLS ---------------------------------------------------------------------------------------------------------


def test_an_untrusted_certificate_says_so_and_points_to_ca_file(
    tls_relay: RelayProcess, tls_files: tuple[str, str], tmp_path: Path
) -> None:
    home = tmp_path / "home"
    authority = tls_relay.url.removeprefix("https://")

    refused = cli(home, "device", "init", "--relay", tls_relay.url, "--no-recovery-key")
    line = one_line_error(refused, 2)
    assert f"the TLS certificate of {authority} is not trusted" in line
    assert "--ca-file" in line
    assert not home.exists() or not any(home.iterdir())  # nothing was created

    # With the CA: the device is made, and the home keeps the CA file for later commands.
    init(tls_relay.url, home, "--ca-file", tls_files[0])
    ok(cli(home, "device", "list"))
    # --ca-file on any client command (after it, too) replaces the kept one for that command.
    wrong = one_line_error(cli(home, "device", "list", "--ca-file", other_ca(tmp_path)), 2)
    assert f"{authority} is not trusted" in wrong
    ok(cli(home, "--ca-file", tls_files[0], "device", "list"))


def test_https_against_a_plain_port_and_http_against_a_tls_port(
    relay: RelayProcess, tls_relay: RelayProcess, tmp_path: Path
) -> None:
    plain_authority = relay.url.removeprefix("http://")
    tls_authority = tls_relay.url.removeprefix("https://")

    https_to_plain = cli(tmp_path / "a", "device", "init", "--relay", f"https://{plain_authority}")
    assert f"{plain_authority} does not speak TLS on that port" in one_line_error(https_to_plain, 2)

    http_to_tls = cli(tmp_path / "b", "device", "init", "--relay", f"http://{tls_authority}")
    line = one_line_error(http_to_tls, 2)
    assert f"{tls_authority} speaks TLS on that port: use https://{tls_authority}" in line


def test_sync_and_log_commands_report_an_untrusted_certificate_at_once_not_as_unreachable(
    tls_relay: RelayProcess, tls_files: tuple[str, str], tmp_path: Path
) -> None:
    """The sync engine does not retry a TLS set-up error as a transient failure: ``sync`` says the certificate is
    not trusted (exit 2, one line), it does not retry until ``--timeout`` and then call the relay unreachable
    (exit 3): the exit status tells the two apart, whatever the timeout."""
    home = tmp_path / "home"
    authority = tls_relay.url.removeprefix("https://")
    init(tls_relay.url, home, "--ca-file", tls_files[0])
    ok(cli(home, "sync", "--timeout", "5"))
    wrong_ca = other_ca(tmp_path)

    line = one_line_error(cli(home, "sync", "--ca-file", wrong_ca, "--timeout", "10"), 2)
    assert f"the TLS certificate of {authority} is not trusted" in line
    assert "--ca-file" in line
    for command in (("sync", "--follow"), ("log", "retention")):
        line = one_line_error(cli(home, *command, "--ca-file", wrong_ca), 2)
        assert f"{authority} is not trusted" in line, command
    ok(cli(home, "sync", "--timeout", "5"))  # the home's own CA still works: nothing was changed


# -- confirmation off a terminal ---------------------------------------------------------------------------------


def test_revoke_and_approve_need_yes_off_a_terminal(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "home"
    address = init(relay.url, home, "--name", "work laptop")
    device_id = address.split(".", 1)[0]

    refused = cli(home, "device", "revoke", device_id)
    assert "needs --yes" in one_line_error(refused, 2)
    listing = json.loads(ok(cli(home, "device", "list", "--json")))
    assert [d["device_id"] for d in listing["devices"]] == [device_id]  # nothing was revoked

    approve = cli(home, "device", "approve", "tl-aaaa-aaaa-aaaa-aaaa-aaaa-aaaa")
    assert "needs --yes" in one_line_error(approve, 2)


# -- names, history, message ids ---------------------------------------------------------------------------------


def test_the_name_given_at_init_shows_in_device_list(relay: RelayProcess, tmp_path: Path) -> None:
    home = tmp_path / "home"
    address = init(relay.url, home, "--name", "work laptop")
    listing = json.loads(ok(cli(home, "device", "list", "--json")))
    (device,) = listing["devices"]
    assert (device["address"], device["name"], device["this_device"]) == (address, "work laptop", True)
    plain = ok(cli(home, "device", "list"))
    assert f'device {address.split(".", 1)[0]}  "work laptop"  added ' in plain


def test_one_message_id_across_send_sync_and_history_and_limit_shows_the_newest(
    relay: RelayProcess, tmp_path: Path
) -> None:
    alice_home, bob_home = tmp_path / "alice", tmp_path / "bob"
    init(relay.url, alice_home)
    bob = init(relay.url, bob_home)

    sent = [ok(cli(alice_home, "send", bob, "--text", f"message {n}")).strip() for n in range(5)]
    assert all(len(line.split()) == 1 for line in sent), sent
    assert len(set(sent)) == 5

    received = [json.loads(line) for line in ok(cli(bob_home, "sync", "--json")).splitlines()]
    assert [(m["message_id"], m["text"]) for m in received] == [(sent[n], f"message {n}") for n in range(5)]

    for home in (alice_home, bob_home):
        history = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines()]
        assert [(m["message_id"], m["text"]) for m in history] == [(sent[n], f"message {n}") for n in range(5)]

        # --limit N: the newest N, still oldest first (it used to be the oldest N).
        newest = [json.loads(line) for line in ok(cli(home, "history", "--json", "--limit", "2")).splitlines()]
        assert [m["text"] for m in newest] == ["message 3", "message 4"]
        plain = ok(cli(home, "history", "--limit", "2")).splitlines()
        assert [line.rsplit(" ", 2)[-2:] for line in plain] == [["message", "3"], ["message", "4"]]
        assert ok(cli(home, "history", "--limit", "0")) == ""
        everything = ok(cli(home, "history", "--json", "--limit", "50")).splitlines()
        assert [json.loads(line)["text"] for line in everything] == [f"message {n}" for n in range(5)]


def test_history_with_and_limit_filters_before_it_limits(relay: RelayProcess, tmp_path: Path) -> None:
    """``history --with PEER --limit N``: the newest N exchanged with PEER, even when newer messages to others
    follow (the peer is sealed in each row: the store opens rows newest first until N match)."""
    alice_home = tmp_path / "alice"
    init(relay.url, alice_home)
    bob, carol = init(relay.url, tmp_path / "bob"), init(relay.url, tmp_path / "carol")
    for n, to in enumerate((bob, bob, carol, bob, carol, carol)):
        ok(cli(alice_home, "send", to, "--text", f"message {n}"))

    def texts(*args: str) -> list[str]:
        return [json.loads(line)["text"] for line in ok(cli(alice_home, "history", "--json", *args)).splitlines()]

    assert texts("--with", bob, "--limit", "2") == ["message 1", "message 3"]
    assert texts("--with", carol, "--limit", "1") == ["message 5"]
    assert texts("--with", bob, "--limit", "9") == ["message 0", "message 1", "message 3"]
    assert texts("--limit", "2") == ["message 4", "message 5"]
