"""tetherless_cli/blobs.py without a relay: the progress line (terminal only), ``blob get``'s REF, the parser.

The commands against real relays: tests/e2e/test_media.py.
"""

from __future__ import annotations

import io
import json

import msgspec
import pytest

from protocol.blobs import BlobRef, blob_length
from protocol.client.store import HistoryMessage
from protocol.payload import FILE_CONTENT_TYPE
from tetherless_cli.blobs import TransferProgress, parse_ref
from tetherless_cli.exits import UsageError
from tetherless_cli.messages import _shown_body, file_json, format_received, message_id_text
from tetherless_cli.parser import build_parser


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_the_progress_line_is_drawn_in_place_on_a_terminal_and_erased() -> None:
    terminal = Terminal()
    progress = TransferProgress(terminal, "scan.pdf")
    progress("uploading", 0, 4 * 1024 * 1024)
    progress("uploading", 4 * 1024 * 1024, 4 * 1024 * 1024)  # the end is always drawn
    progress.clear()
    text = terminal.getvalue()
    assert "\ruploading scan.pdf: 0.0 of 4.0 MiB (0%)" in text
    assert "\ruploading scan.pdf: 4.0 of 4.0 MiB (100%)" in text
    assert text.endswith("\r")
    assert "\n" not in text


def test_the_progress_line_is_redrawn_at_most_ten_times_a_second_but_its_end_always() -> None:
    now = [0.0]
    terminal = Terminal()
    progress = TransferProgress(terminal, "scan.pdf", clock=lambda: now[0])
    progress("downloading", 1024 * 1024, 4 * 1024 * 1024)
    progress("downloading", 2 * 1024 * 1024, 4 * 1024 * 1024)  # within 0.1 s: skipped
    progress("downloading", 4 * 1024 * 1024, 4 * 1024 * 1024)  # the end: drawn anyway
    now[0] = 0.05
    progress("decrypting", 1024 * 1024, 4 * 1024 * 1024)  # 0.05 s after the last draw: skipped
    now[0] = 0.2
    progress("decrypting", 2 * 1024 * 1024, 4 * 1024 * 1024)
    drawn = [line.rstrip() for line in terminal.getvalue().split("\r") if line]
    assert drawn == [
        "downloading scan.pdf: 1.0 of 4.0 MiB (25%)",
        "downloading scan.pdf: 4.0 of 4.0 MiB (100%)",
        "decrypting scan.pdf: 2.0 of 4.0 MiB (50%)",
    ]


class Broken(Terminal):
    def write(self, text: str) -> int:
        raise BrokenPipeError


def test_a_broken_terminal_stops_the_line_without_an_error() -> None:
    progress = TransferProgress(Broken(), "scan.pdf")
    progress("uploading", 1, 2)
    assert not progress.enabled
    progress("uploading", 2, 2)
    progress.clear()


def test_nothing_is_written_off_a_terminal() -> None:
    pipe = io.StringIO()
    progress = TransferProgress(pipe, "scan.pdf")
    progress("downloading", 1, 2)
    progress.clear()
    assert pipe.getvalue() == ""


def test_a_ref_is_a_message_id() -> None:
    uid = bytes(range(16))
    assert parse_ref(message_id_text(uid)) == uid
    assert parse_ref(message_id_text(uid).upper()) == uid
    for bad in ("not-an-id", "", "a" * 25, message_id_text(uid) + "a"):
        with pytest.raises(UsageError, match="not a message id"):
            parse_ref(bad)


def test_send_takes_text_or_a_file_and_blob_get_its_options() -> None:
    args = build_parser(["send", "a.b@c", "--file", "x.pdf"]).parse_args(["send", "a.b@c", "--file", "x.pdf"])
    assert (args.file, args.text, args.handler) == ("x.pdf", None, "tetherless_cli.messages:cmd_send")
    both = ["send", "a.b@c", "--file", "x.pdf", "--text", "hi"]
    with pytest.raises(SystemExit):
        build_parser(both).parse_args(both)
    line = ["blob", "get", "mfrg", "-o", "out", "--force", "--home", "H"]
    args = build_parser(line).parse_args(line)
    assert (args.ref, args.output, args.force, args.home) == ("mfrg", "out", True, "H")
    assert args.handler == "tetherless_cli.blobs:cmd_blob_get"


def _history(body: bytes, content_type: str = FILE_CONTENT_TYPE) -> HistoryMessage:
    return HistoryMessage(
        msg_key=b"k" * 16,
        message_uid=bytes(16),
        sender_device="a" * 32,
        direction="received",
        pair_seq=1,
        sent_at_ms=1,
        relay_sent_at_ms=1,
        log_position=None,
        via="inbox",
        late=False,
        sender="sender@relay.example.org",
        recipients=["me@relay.example.org"],
        content_type=content_type,
        body=body,
    )


def _ref(**changes: object) -> BlobRef:
    fields: dict[str, object] = {
        "relay": "relay.example.org",
        "blob_id": "0" * 32,
        "digest": bytes(32),
        "key": bytes([7]) * 32,
        "length": blob_length(10),
        "capability": bytes(32),
        "name": "a.txt",
        "content_type": "text/plain",
        "size": 10,
        **changes,
    }
    return BlobRef(**fields)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "body",
    [
        b"\xc1not msgpack",
        msgspec.msgpack.encode({"relay": "relay.example.org"}),  # a map, not a BlobRef
        msgspec.msgpack.encode(_ref(name="../../.bashrc")),  # decodes, but steers outside the directory
        msgspec.msgpack.encode(_ref(length=1)),  # decodes, but the length is not the size's
    ],
    ids=["garbage", "incomplete", "path-name", "length"],
)
def test_a_malformed_file_message_is_shown_as_such_never_crashes_and_never_shows_its_body(body: bytes) -> None:
    """A sender (or a bug) can put anything in a file message: sync and history print it as malformed, one line,
    without the body (a real one holds the file key), and move on to the next message."""
    message = _history(body)
    assert file_json(message) == {"error": "malformed file message", "ref": None}
    assert _shown_body(message, None) == "<a malformed file message>"
    line = format_received(message, 1, None, as_json=True)
    assert json.loads(line)["file"] == {"error": "malformed file message", "ref": None}
    assert "body_base64" not in json.loads(line)  # the key inside a file message's body is never printed


def test_a_file_message_is_shown_with_its_reference_and_never_its_key() -> None:
    message = _history(msgspec.msgpack.encode(_ref()))
    shown = json.loads(format_received(message, 1, None, as_json=True))
    assert shown["file"] == {
        "name": "a.txt",
        "size": 10,
        "content_type": "text/plain",
        "ref": message_id_text(bytes(16)),
    }
    assert (bytes([7]) * 32).hex() not in json.dumps(shown)
    assert "blob get" in _shown_body(message, None)
