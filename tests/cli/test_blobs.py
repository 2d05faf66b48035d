"""tetherless_cli/blobs.py without a relay: the progress line (terminal only), ``blob get``'s REF, the parser.

The commands against real relays: tests/e2e/test_media.py.
"""

from __future__ import annotations

import io

import pytest

from tetherless_cli.blobs import TransferProgress, parse_ref
from tetherless_cli.exits import UsageError
from tetherless_cli.messages import message_id_text
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
