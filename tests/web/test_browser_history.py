"""The account log of an account created in the browser (issue 16 point 2; docs/account-log.md §5, §6.1), in headless
chromium against a real relay and the real ``tetherless`` CLI:

- the browser writes the account's epoch 1 before its first log write and grants every epoch key to a CLI device
  it approves: that device's ``history`` shows what the browser sent and received before it existed, and what the
  CLI device then writes (sent and received messages) the browser replays from the log;
- the browser revokes that CLI device ("Revoke device …"): it writes a rotation (epoch 2, a v3 key record closing
  the revoked writer, granting only the devices left); a device approved later reads what was written after it,
  the revoked one cannot (its sync ends revoked, no key of epoch 2);
- a second browser linked later starts from a snapshot the CLI device wrote (``tetherless log snapshot``): the relay
  served it the snapshot's parts (``relay_log_records_served_total{via="snapshot"}``);
- a relay that serves another account's key record, or drops a key record, is refused with a visible error.
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from protocol import log
from tests.e2e.http11 import Http11
from tests.e2e.test_equal_devices import account_of, cli, ok, relay_db
from tests.web.support import BrowserAndCli, approve_in_browser, link_browser, send

if TYPE_CHECKING:
    from playwright.sync_api import Browser

    from tests.relay_process import RelayProcess

T = TypeVar("T")
KEY = 3  # log_records.kind of a key record (relay/store: event 1, state 2, key 3)


def _until(probe: Callable[[], T | None], what: str, attempts: int = 40) -> T:
    """``probe()`` once it is not None, polling every half second (the browser appends at its next poll)."""
    for _ in range(attempts):
        found = probe()
        if found is not None:
            return found
        time.sleep(0.5)
    raise AssertionError(f"timed out waiting for {what}")


def _history(home: Path) -> dict[str, dict[str, Any]]:
    """``home``'s history after a sync, by text."""
    ok(cli(home, "sync"))
    entries = [json.loads(line) for line in ok(cli(home, "history", "--json")).splitlines() if line.strip()]
    return {str(e.get("text")): e for e in entries}


def _history_with(home: Path, texts: set[str]) -> dict[str, dict[str, Any]]:
    return _until(lambda: shown if texts <= (shown := _history(home)).keys() else None, f"{sorted(texts)} in {home}")


def _key_records(relay: RelayProcess, account: str) -> list[tuple[int, int, bytes]]:
    """``(position, epoch, ciphertext)`` of the account's key records, in log order."""
    with closing(relay_db(relay)) as db:
        rows = db.execute(
            "SELECT position, epoch, ciphertext FROM log_records WHERE account_id = ? AND kind = ? ORDER BY position",
            (account, KEY),
        ).fetchall()
    return [(int(p), int(e), bytes(c)) for p, e, c in rows]


def _fingerprint(address: str) -> str:
    """The fingerprint the screens show for a device: its id in groups of four."""
    device = address.split(".", 1)[0]
    return " ".join(device[i : i + 4] for i in range(0, len(device), 4))


def _served(relay: RelayProcess) -> dict[str, float]:
    """``relay_log_records_served_total`` by ``via`` (page, stream, snapshot), from the relay's /metrics."""
    text = Http11(relay.url).get("/metrics", accept="*/*").body.decode()
    found = re.findall(r'^relay_log_records_served_total\{via="(\w+)"\} ([0-9.e+]+)$', text, re.MULTILINE)
    return {via: float(value) for via, value in found}


def _browser_account_with_device(s: BrowserAndCli, tmp_path: Path) -> tuple[str, Path, str]:
    """The browser and X (the CLI device of another account) exchange a message; the browser approves CLI device C
    into its account and grants it the history. (browser's account, C's home, C's address)."""
    page, x_home = s.page, s.cli_home
    send(page, account_of(s.cli_address), "from the browser, before C")
    ok(cli(x_home, "send", s.address, "--text", "from X to the browser"))
    page.get_by_role("log").get_by_text("from X to the browser", exact=True).wait_for()
    account = account_of(s.address).split("@", 1)[0]
    # The browser wrote epoch 1 itself (no CLI device has ever been in its account).
    assert [epoch for _, epoch, _ in _until(lambda: _key_records(s.relay, account) or None, "epoch 1")] == [1]
    c_home = tmp_path / "c"
    c_address = approve_in_browser(page, s.relay, c_home, shot=False)
    page.locator("#approve-request").filter(has_text="granted the account's history").wait_for()
    return account, c_home, c_address


def test_a_cli_device_the_browser_approves_reads_its_history_and_the_browser_replays_the_cli(
    browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    s = browser_and_cli
    page, x_home = s.page, s.cli_home
    _account, c_home, c_address = _browser_account_with_device(s, tmp_path)
    shown = _history_with(c_home, {"from the browser, before C", "from X to the browser"})
    assert shown["from the browser, before C"]["direction"] == "sent", shown
    assert shown["from X to the browser"]["direction"] == "received", shown
    synced = cli(c_home, "sync")
    assert "warning" not in synced.stderr, synced.stderr  # the browser's key records and signed records verify
    # What C writes, the browser reads from the log: a message only C received, and one C sent.
    ok(cli(x_home, "send", c_address, "--text", "from X to C only"))
    ok(cli(c_home, "sync"))
    ok(cli(c_home, "send", account_of(s.cli_address), "--text", "from C"))
    ok(cli(c_home, "sync"))
    replayed = page.get_by_role("log")
    replayed.get_by_text("from X to C only", exact=True).wait_for()
    replayed.get_by_text("from C", exact=True).wait_for()
    assert page.get_by_role("alert").is_hidden()


def test_revoking_a_cli_device_rotates_the_epoch_so_only_later_devices_read_on(
    browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    s = browser_and_cli
    page = s.page
    account, c_home, c_address = _browser_account_with_device(s, tmp_path)
    c_device = c_address.split(".", 1)[0]
    page.get_by_role("button", name=f"Revoke device {_fingerprint(c_address)}", exact=True).click()
    page.get_by_role("button", name=f"Confirm: revoke device {_fingerprint(c_address)}", exact=True).click()
    rotation = _until(lambda: next((r for r in _key_records(s.relay, account) if r[1] == 2), None), "the rotation")
    record = log.decode_any_key_record(rotation[2])
    assert isinstance(record, log.KeyEpochRecordV2)
    assert record.v == log.KEY_RECORD_V3, record
    assert record.body.rotation
    assert [m.device_id for m in record.closed] == [c_device]  # C's writes end here (§5.1 v3)
    assert c_device not in [g.device_id for g in record.body.grants]
    send(page, account_of(s.cli_address), "after the revocation")
    d_home = tmp_path / "d"
    approve_in_browser(page, s.relay, d_home, shot=False)
    page.locator("#approve-request").filter(has_text="granted the account's history").wait_for()
    shown = _history_with(d_home, {"from the browser, before C", "after the revocation"})
    assert shown["after the revocation"]["direction"] == "sent", shown
    revoked = cli(c_home, "sync")
    assert revoked.returncode == 4, (revoked.returncode, revoked.stderr)
    assert "after the revocation" not in ok(cli(c_home, "history", "--json"))
    assert page.get_by_role("alert").is_hidden()


def test_a_browser_linked_later_starts_from_the_cli_devices_snapshot(
    browser: Browser, browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    s = browser_and_cli
    _account, c_home, _c_address = _browser_account_with_device(s, tmp_path)
    _history_with(c_home, {"from the browser, before C", "from X to the browser"})
    ok(cli(c_home, "log", "snapshot"))
    before = _served(s.relay).get("snapshot", 0.0)
    context = browser.new_context()
    try:
        second = context.new_page()
        link_browser(second, s.origin, c_home)
        replayed = second.get_by_role("log")
        replayed.get_by_text("from the browser, before C", exact=True).wait_for()
        replayed.get_by_text("from X to the browser", exact=True).wait_for()
        assert second.get_by_role("alert").is_hidden()
    finally:
        context.close()
    assert _served(s.relay).get("snapshot", 0.0) > before  # it fetched the snapshot's parts


def test_a_relay_serving_another_accounts_key_record_or_dropping_one_is_refused_visibly(
    browser: Browser, browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    s = browser_and_cli
    page = s.page
    account, c_home, _c_address = _browser_account_with_device(s, tmp_path)
    _history_with(c_home, {"from the browser, before C"})
    # X's account has a key record of its own (its sync created epoch 1); the relay serves it in this account's log.
    x_account = account_of(s.cli_address).split("@", 1)[0]
    ok(cli(s.cli_home, "sync"))
    _, _, foreign = _key_records(s.relay, x_account)[0]
    with closing(relay_db(s.relay)) as db:
        db.execute("BEGIN IMMEDIATE")
        head = db.execute("SELECT head FROM log_heads WHERE account_id = ?", (account,)).fetchone()[0] + 1
        db.execute(
            "INSERT INTO log_records (account_id, position, record_id, kind, epoch, committed_at_ms, "
            "device_list_version, size, ciphertext) VALUES (?, ?, ?, ?, 1, 1, 1, ?, ?)",
            (account, head, bytes(range(16)), KEY, len(foreign), foreign),
        )
        db.execute("UPDATE log_heads SET head = ? WHERE account_id = ?", (head, account))
        db.execute("COMMIT")
    page.get_by_role("alert").filter(
        has_text=f"refused log record at position {head} (epoch 1): key record for another account"
    ).wait_for()
    # The relay drops the record that created epoch 1: a browser linked now notices the hole.
    with closing(relay_db(s.relay)) as db:
        db.execute("DELETE FROM log_records WHERE account_id = ? AND position = 1", (account,))
    context = browser.new_context()
    try:
        second = context.new_page()
        link_browser(second, s.origin, c_home)
        second.get_by_role("alert").filter(has_text="log positions 1-1 are missing below the relay's head").wait_for()
        assert not second.get_by_role("log").get_by_text("from the browser, before C", exact=True).is_visible()
    finally:
        context.close()
