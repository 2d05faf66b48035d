"""What ``tetherless`` does at a terminal (issue 14 point 4): the passphrase prompt names the home and asks once
more; ``device revoke`` asks before revoking; a long catch-up draws a progress line on stderr. The real CLI runs
on a pseudo-terminal (python's pty) against a real relay; off a terminal the same commands stay silent or refuse
(tests/e2e/test_cli_errors.py, tests/e2e/test_keystore_cli.py). The progress line's drawing is unit-tested here
with a fake terminal stream.
"""

from __future__ import annotations

import io
import json
import os
import pty
import select
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
import trio

from protocol.client.keystore import PASSPHRASE_ENV, Keystore
from protocol.client.sdk import Outgoing, RelayClient
from tests.e2e.test_equal_devices import cli as equal_devices_cli
from tests.e2e.test_equal_devices import link_device, ok
from tests.relay_process import RelayProcess
from tetherless_cli.progress import CatchUpProgress

ROOT = Path(__file__).resolve().parents[2]
PASSPHRASE = os.environ[PASSPHRASE_ENV]  # tests/conftest.py sets it; the terminal runs go without it


def cli(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return equal_devices_cli(home, *args, stdin="", timeout=120)  # stdin a pipe: not a terminal


class Terminal:
    """``tetherless ARGS`` with stdin, stdout and stderr on one pseudo-terminal, without the passphrase variable.

    A new session, so the child has no controlling terminal: getpass then prompts on the pty itself (stdin)
    instead of opening the /dev/tty of whoever runs the tests.
    """

    def __init__(self, home: Path, *args: str) -> None:
        master, slave = pty.openpty()
        env = {k: v for k, v in os.environ.items() if k != PASSPHRASE_ENV}
        self.process = subprocess.Popen(
            [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=ROOT,
            env=env,
            start_new_session=True,
        )
        os.close(slave)
        self.fd = master
        self.output = ""
        self.seen = 0  # how much of the output expect() has matched

    def _read(self, timeout: float) -> bool:
        ready, _, _ = select.select([self.fd], [], [], timeout)
        if not ready:
            return True
        try:
            data = os.read(self.fd, 65536)
        except OSError:  # EIO: the child closed its end
            return False
        self.output += data.decode("utf-8", "replace")
        return bool(data)

    def expect(self, text: str, timeout: float = 60) -> None:
        """Read until ``text`` appears after what earlier calls matched (the timeout only bounds a hang)."""
        deadline = time.monotonic() + timeout
        while (found := self.output.find(text, self.seen)) < 0:
            if time.monotonic() >= deadline or (not self._read(0.2) and self.output.find(text, self.seen) < 0):
                self.process.kill()
                self.process.wait()
                raise AssertionError(f"{text!r} not in {self.output[self.seen :]!r}")
        self.seen = found + len(text)

    def type(self, line: str) -> None:
        os.write(self.fd, (line + "\n").encode())

    def wait(self, timeout: float = 120) -> int:
        """Exit status, after reading everything the command wrote."""
        deadline = time.monotonic() + timeout
        while self._read(0.2):
            if time.monotonic() >= deadline:
                self.process.kill()
                self.process.wait()
                raise AssertionError(self.output)
        code = self.process.wait(timeout=timeout)
        os.close(self.fd)
        return code


def new_home(relay: RelayProcess, tmp_path: Path, name: str, *extra: str) -> tuple[Path, str]:
    home = tmp_path / name
    address = ok(cli(home, "device", "init", "--relay", relay.url, "--no-recovery-key", *extra)).strip()
    return home, address


# -- the passphrase prompt ------------------------------------------------------------------------------------


def test_the_prompt_names_the_home_and_asks_once_more(relay: RelayProcess, tmp_path: Path) -> None:
    home, _ = new_home(relay, tmp_path, "home")

    term = Terminal(home, "outbox")
    term.expect(f"Passphrase for {home}: ")
    term.type("not the passphrase")
    term.expect("wrong passphrase; try again")
    term.expect(f"Passphrase for {home}: ")
    term.type(PASSPHRASE)
    assert term.wait() == 0, term.output
    assert "not the passphrase" not in term.output  # no echo

    twice = Terminal(home, "outbox")
    twice.expect(f"Passphrase for {home}: ")
    twice.type("wrong once")
    twice.expect("try again")
    twice.expect(f"Passphrase for {home}: ")  # not before: the prompt discards what was typed ahead of it
    twice.type("wrong twice")
    assert twice.wait() == 2, twice.output
    assert twice.output.count("Passphrase for") == 2  # one retry, no third prompt
    assert "tetherless: error: the keystore does not open: wrong passphrase" in twice.output
    assert "Traceback" not in twice.output


# -- device revoke asks ---------------------------------------------------------------------------------------


def revoke_at_terminal(home: Path, target: str, question: str, answer: str) -> Terminal:
    """``device revoke TARGET`` on a terminal: the passphrase, then ``answer`` once ``question`` shows."""
    term = Terminal(home, "device", "revoke", target)
    term.expect(f"Passphrase for {home}: ")
    term.type(PASSPHRASE)
    term.expect(question)
    term.type(answer)
    return term


def test_revoke_asks_at_a_terminal_and_no_keeps_the_device(relay: RelayProcess, tmp_path: Path) -> None:
    home, address = new_home(relay, tmp_path, "home")
    other_home = tmp_path / "other"
    other = link_device(relay, other_home, home)
    other_id = other.split(".", 1)[0]

    declined = revoke_at_terminal(home, other, f"Revoke device {other_id} from {address.split('.', 1)[1]}? [y/N] ", "n")
    assert declined.wait() == 1, declined.output
    assert "not revoked" in declined.output
    listing = json.loads(ok(cli(home, "device", "list", "--json")))
    assert other_id in [d["device_id"] for d in listing["devices"]]

    accepted = revoke_at_terminal(home, other_id, "[y/N] ", "y")
    assert accepted.wait() == 0, accepted.output
    assert f"revoked {other_id};" in accepted.output
    assert cli(other_home, "sync").returncode == 4


def test_loosening_the_policy_asks_at_a_terminal(
    relay: RelayProcess, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``device policy`` asks before it loosens (a no changes nothing); tightening asks nothing
    (tests/e2e/test_device_policy.py has the rest)."""
    key = tmp_path / "key.json"
    monkeypatch.setenv("TETHERLESS_FIDO2_DEVICES", "tests.support.soft_ctap:devices")
    monkeypatch.setenv("TETHERLESS_SOFT_CTAP", str(key))
    home, address = new_home(relay, tmp_path, "home")
    ok(cli(home, "device", "fido2", "add"))
    ok(cli(home, "device", "policy", "--user-verification"))  # tightening: no question, also off a terminal

    def loosen(answer: str) -> Terminal:
        term = Terminal(home, "device", "policy", "--no-user-verification")
        term.expect(f"Passphrase for {home}: ")
        term.type(PASSPHRASE)
        term.expect(
            f"Loosen the policy of {address.split('.', 1)[1]} from 'any one device, with user verification' "
            "to 'any one device'? [y/N] "
        )
        term.type(answer)
        return term

    declined = loosen("n")
    assert declined.wait() == 1, declined.output
    assert "not changed" in declined.output
    assert json.loads(ok(cli(home, "device", "policy", "--json")))["require_user_verification"] is True
    accepted = loosen("y")
    assert accepted.wait() == 0, accepted.output
    assert json.loads(ok(cli(home, "device", "policy", "--json")))["require_user_verification"] is False


# -- the catch-up progress line -------------------------------------------------------------------------------


def test_a_long_catch_up_shows_progress_at_a_terminal_only(relay: RelayProcess, tmp_path: Path) -> None:
    # Format 1: the SDK's send_many speaks v1 payloads (tests/e2e/test_acceptance.py says why).
    alice_home, _ = new_home(relay, tmp_path, "alice", "--list-format", "1")
    bob_home, bob = new_home(relay, tmp_path, "bob", "--list-format", "1")
    carol_home, carol = new_home(relay, tmp_path, "carol", "--list-format", "1")
    texts = [f"catch-up {n:03d} {uuid.uuid4()}" for n in range(150)]

    async def send_all() -> None:
        async with RelayClient.connect(relay.url, keys=Keystore(alice_home).load()) as alice:
            for to in (bob, carol):
                for start in range(0, len(texts), 50):
                    await alice.send_many([Outgoing(to, text) for text in texts[start : start + 50]])

    trio.run(send_all)

    piped = cli(carol_home, "sync")
    assert piped.returncode == 0, piped.stderr
    assert piped.stderr == ""  # off a terminal: nothing extra
    assert len(piped.stdout.splitlines()) == 150

    term = Terminal(bob_home, "--passphrase-file", str(passphrase_file(tmp_path)), "sync")
    assert term.wait() == 0, term.output
    assert "\rcatching up: " in term.output
    assert " messages" in term.output
    assert all(text in term.output for text in texts)


def passphrase_file(tmp_path: Path) -> Path:
    path = tmp_path / "passphrase"
    path.write_text(PASSPHRASE + "\n")
    return path


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_after_the_threshold_at_most_every_tenth_of_a_second_and_clears() -> None:
    now = [0.0]
    screen = FakeTerminal()
    progress = CatchUpProgress(screen, start_position=10, min_records=100, clock=lambda: now[0])
    progress.update(20, 60)  # 50 records behind: short, nothing drawn
    assert screen.getvalue() == ""
    progress.update(20, 210)
    assert screen.getvalue() == "\rcatching up: 0 messages, log 20/210 (5%)"
    progress.update(30, 210, message=True)  # within 0.1 s: counted, not drawn
    assert progress.messages == 1
    assert screen.getvalue().count("\r") == 1
    now[0] = 0.2
    progress.update(110, 210, message=True)
    assert screen.getvalue().endswith("\rcatching up: 2 messages, log 110/210 (50%)")
    progress.clear()
    assert screen.getvalue().endswith("\r" + " " * len("catching up: 2 messages, log 110/210 (50%)") + "\r")
    progress.clear()  # idempotent
    assert screen.getvalue().count("\r") == 4


def test_progress_counts_messages_without_a_log_end_and_never_draws_off_a_terminal() -> None:
    screen = FakeTerminal()
    progress = CatchUpProgress(screen, start_position=0, min_records=3, clock=lambda: 0.0)
    for _ in range(3):
        progress.update(0, 0, message=True)
    assert screen.getvalue() == "\rcatching up: 3 messages"

    piped = io.StringIO()  # isatty() is False
    silent = CatchUpProgress(piped, start_position=0, min_records=1)
    silent.update(5, 500, message=True)
    silent.clear()
    assert not silent.enabled
    assert piped.getvalue() == ""
