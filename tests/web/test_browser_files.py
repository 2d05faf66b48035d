"""Files in the browser app (web/src/client/blobs.ts) against a real relay and the real CLI, in headless chromium.

A CLI device sends a file (with a plaintext canary every MiB) to the browser, which shows it as "name · size" and
downloads, verifies and decrypts it: the bytes Playwright's download API hands over have the file's SHA-256. The
browser attaches a file and sends it to the CLI device, whose ``blob get`` writes the same bytes; a PATCH whose
answer is lost after the relay stored it is continued from the relay's offset. A blob changed in the relay's data
directory is refused with an error in role ``alert``, and nothing is offered. Fails (not skips) without chromium
under ``CI=true`` (conftest.py).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tests.e2e.test_equal_devices import cli, ok
from tests.e2e.test_media import CANARY, MiB, contains, file_messages, make_file, metric, relay_files, sha256_of
from tests.web.support import BrowserAndCli, screenshot

if TYPE_CHECKING:
    from playwright.sync_api import Download, Locator, Page, Route


def file_item(page: Page, text: str) -> Locator:
    """The conversation's entry that shows ``text`` (a file's "name · size")."""
    item = page.get_by_role("log").get_by_role("listitem").filter(has_text=text)
    item.wait_for()
    return item


def send_file(page: Page, to: str, path: Path) -> None:
    """Attach ``path``, press "Share file" and wait until the app says it was sent."""
    page.get_by_label("To", exact=True).fill(to)
    page.get_by_label("Attach file").set_input_files(str(path))
    page.get_by_role("button", name="Share file").click()
    page.locator("#transfer").filter(has_text=f"Sent {path.name}").wait_for(timeout=120_000)


def test_files_go_both_ways_between_the_cli_and_the_browser(browser_and_cli: BrowserAndCli, tmp_path: Path) -> None:
    relay, watched, page = browser_and_cli.relay, browser_and_cli.watched, browser_and_cli.page
    cli_home, cli_address, address = browser_and_cli.cli_home, browser_and_cli.cli_address, browser_and_cli.address

    # CLI → browser: "name · size" and a Download button; never the key, never the bytes.
    source = tmp_path / "scan.pdf"
    digest = make_file(source, 3 * MiB + 4321)
    ok(cli(cli_home, "send", address, "--file", str(source)))
    item = file_item(page, "scan.pdf · 3.0 MiB")
    assert item.locator(".text").inner_text() == "scan.pdf · 3.0 MiB"
    with page.expect_download() as info:
        item.get_by_role("button", name="Download scan.pdf").click()
    download: Download = info.value
    assert download.suggested_filename == "scan.pdf"
    assert sha256_of(Path(download.path())) == digest
    page.locator("#transfer").filter(has_text="Saved scan.pdf (3.0 MiB, verified).").wait_for()
    screenshot(page, "file-received")

    # Browser → CLI: two 8 MiB pieces; the CLI's `blob get` writes the same bytes.
    upload = tmp_path / "notes.bin"
    upload_digest = make_file(upload, 9 * MiB + 123)
    send_file(page, cli_address, upload)
    file_item(page, "notes.bin · 9.0 MiB")
    (file,) = file_messages(cli_home)
    assert (file["name"], file["size"]) == ("notes.bin", 9 * MiB + 123)
    out = tmp_path / "notes.out"
    ok(cli(cli_home, "blob", "get", str(file["ref"]), "-o", str(out)))
    assert sha256_of(out) == upload_digest

    # The relay never held plaintext of either file.
    assert [p for p in relay_files(relay) if contains(p, CANARY)] == []
    assert page.get_by_role("alert").is_hidden()
    watched.assert_clean()


def test_a_patch_whose_answer_is_lost_continues_from_the_relays_offset(
    browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    """The first PATCH reaches the relay, which stores the piece, but the browser never gets the answer: the app
    asks ``HEAD`` and continues after that piece instead of sending it again."""
    relay, page, origin = browser_and_cli.relay, browser_and_cli.page, browser_and_cli.origin
    cli_home, cli_address = browser_and_cli.cli_home, browser_and_cli.cli_address
    patches: list[str] = []

    def lose_first_answer(route: Route) -> None:
        if route.request.method != "PATCH":
            route.continue_()
            return
        patches.append(route.request.headers["upload-offset"])
        if len(patches) == 1:
            route.fetch()  # the relay stores the piece and answers; the page never sees it
            route.abort("connectionreset")
        else:
            route.continue_()

    page.route(f"{origin}/v1/blobs/uploads/*", lose_first_answer)
    upload = tmp_path / "video.mp4"
    size = 17 * MiB
    digest = make_file(upload, size)
    send_file(page, cli_address, upload)
    # The second PATCH starts where the relay stood after the first (8 MiB in), not at 0.
    assert patches == ["0", str(8 * MiB), str(16 * MiB)], patches
    assert metric(relay, "relay_blob_received_bytes_total") < 1.2 * size
    (file,) = file_messages(cli_home)
    out = tmp_path / "video.out"
    ok(cli(cli_home, "blob", "get", str(file["ref"]), "-o", str(out)))
    assert sha256_of(out) == digest


def test_a_blob_changed_on_the_relay_is_refused_and_nothing_is_offered(
    browser_and_cli: BrowserAndCli, tmp_path: Path
) -> None:
    """The relay (its disk, its operator) is the adversary: one byte changed in the stored blob, and the browser
    says ``blob_corrupt`` and offers no download; a relay that no longer has the blob: ``blob_not_found``."""
    relay, page, origin = browser_and_cli.relay, browser_and_cli.page, browser_and_cli.origin
    cli_home, address = browser_and_cli.cli_home, browser_and_cli.address
    source = tmp_path / "lab.csv"
    make_file(source, 2 * MiB)
    ok(cli(cli_home, "send", address, "--file", str(source)))
    item = file_item(page, "lab.csv · 2.0 MiB")
    (stored,) = [p for p in relay_files(relay) if "blobs" in p.parts and p.stat().st_size > MiB]
    data = bytearray(stored.read_bytes())
    data[MiB] ^= 0x01
    stored.write_bytes(bytes(data))

    downloads: list[Any] = []
    page.on("download", lambda download: downloads.append(download))
    item.get_by_role("button", name="Download lab.csv").click()
    alert = page.get_by_role("alert")
    alert.filter(has_text="(blob_corrupt)").wait_for()
    assert "damaged or was changed" in alert.inner_text()
    assert "nothing was saved" in alert.inner_text()
    screenshot(page, "file-refused")
    assert page.locator("#transfer").inner_text() == ""

    def gone(route: Route) -> None:
        problem = {"type": "about:blank", "title": "Not Found", "status": 404, "code": "blob_not_found", "detail": ""}
        route.fulfill(status=404, content_type="application/problem+json", body=json.dumps(problem))

    page.route(f"{origin}/v1/blobs/*", gone)
    item.get_by_role("button", name="Download lab.csv").click()
    alert.filter(has_text="(blob_not_found)").wait_for()
    assert downloads == []
