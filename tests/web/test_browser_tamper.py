"""A relay that serves a tampered device list, in headless chromium: the browser refuses it, visibly, and sends nothing.

The relay is the adversary. Here it is a real relay process whose database was edited under it (as
tests/e2e/test_log_malicious_relay.py does): the CLI account's stored device list carries an attacker's
encryption key in place of the device's own — the substitution that would let the relay read the messages.
The list's signatures no longer verify, so the browser (web/src/client: every chain verified from the
genesis before a key is used) refuses it with the error in role ``alert``:

- a message sent while the relay lies is not sealed to the substituted key: the text goes back into the
  Message field, nothing is in the log or the outbox, the CLI receives nothing;
- a message queued offline and flushed while the relay lies is marked "not sent" in the outbox, with the
  reason and a Retry button; once the relay serves the honest list again, Retry delivers it.
"""

from __future__ import annotations

from contextlib import closing
from pathlib import Path
from typing import TYPE_CHECKING, Any

import msgspec

from protocol import codec
from protocol.messages import SignedDeviceList
from tests.e2e.test_equal_devices import account_of, init_device, relay_db, sync_texts
from tests.relay_process import RelayProcess
from tests.web.conftest import WatchedPage, localhost, screenshot
from tests.web.test_browser_messages import create_account
from tests.web.test_browser_offline import compose, outbox_item

if TYPE_CHECKING:
    from playwright.sync_api import Page

ATTACKER_BOX_KEY = bytes(range(1, 33))  # an X25519 public key the relay's operator holds the private key of


def substitute_box_keys(relay: RelayProcess, account_id: str) -> tuple[int, bytes]:
    """Store the account's newest list with every device's ``box_key`` replaced; returns (version, honest bytes)."""
    with closing(relay_db(relay)) as db:
        version, honest = db.execute(
            "SELECT version, signed FROM device_lists WHERE account_id = ? ORDER BY version DESC LIMIT 1",
            (account_id,),
        ).fetchone()
        signed = codec.decode(honest, SignedDeviceList)
        devices = [msgspec.structs.replace(d, box_key=ATTACKER_BOX_KEY) for d in signed.device_list.devices]
        forged = msgspec.structs.replace(
            signed, device_list=msgspec.structs.replace(signed.device_list, devices=devices)
        )
        db.execute(
            "UPDATE device_lists SET signed = ? WHERE account_id = ? AND version = ?",
            (codec.encode(forged), account_id, version),
        )
    return version, bytes(honest)


def restore(relay: RelayProcess, account_id: str, version: int, honest: bytes) -> None:
    with closing(relay_db(relay)) as db:
        db.execute(
            "UPDATE device_lists SET signed = ? WHERE account_id = ? AND version = ?", (honest, account_id, version)
        )


def log_text(page: Page) -> str:
    return page.locator("#log").inner_text()


def test_a_substituted_key_in_the_device_list_is_refused_with_a_visible_error(
    watched: WatchedPage, start_relay: Any, tmp_path: Path
) -> None:
    relay = start_relay()
    cli_home = tmp_path / "cli"
    cli_address = init_device(relay, cli_home)
    cli_account = account_of(cli_address).split("@")[0]
    page = watched.page
    address = create_account(page, localhost(relay.url))
    alert = page.get_by_role("alert")

    # Sending now: refused before anything is sealed; the text stays for another try.
    version, honest = substitute_box_keys(relay, cli_account)
    compose(page, cli_address, "not for the relay's key")
    alert.filter(has_text="Refused: bad_signature").wait_for()
    screenshot(page, "refused-tampered-list")
    assert page.get_by_label("Message", exact=True).input_value() == "not for the relay's key"
    assert log_text(page) == ""
    assert page.locator("#outbox").inner_text() == ""

    # Queued offline, flushed while the relay still lies: marked not sent, with the reason; the others go on.
    page.context.set_offline(True)
    compose(page, account_of(cli_address), "queued while offline")
    outbox_item(page, "queued while offline").filter(has_text="waiting").wait_for()
    page.context.set_offline(False)
    failed = outbox_item(page, "queued while offline").filter(has_text="not sent: bad_signature")
    failed.wait_for()
    alert.filter(has_text="were not sent: bad_signature").wait_for()
    screenshot(page, "outbox-not-sent")
    assert log_text(page) == ""

    # The honest list again: nothing reached the CLI meanwhile; Retry delivers the queued message.
    restore(relay, cli_account, version, honest)
    assert sync_texts(cli_home) == []
    failed.get_by_role("button", name="Retry").click()
    page.get_by_role("log").get_by_text("queued while offline", exact=True).wait_for()
    outbox_item(page, "queued while offline").wait_for(state="detached")
    assert [(m["from"], m["text"]) for m in sync_texts(cli_home)] == [(address, "queued while offline")]
