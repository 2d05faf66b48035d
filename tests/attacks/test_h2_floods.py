"""HTTP/2 floods against a real relay: resets, control frames, CONTINUATION, HPACK.

Each test asserts the documented outcome (docs/security.md, attack table),
that the relay's memory stayed bounded, and that a legitimate client on
another connection kept getting ``/livez`` answers throughout.
"""

from __future__ import annotations

import pytest
from hyperframe.frame import PriorityFrame, SettingsFrame

from tests.attacks.raw import (
    COMPRESSION_ERROR,
    ENHANCE_YOUR_CALM,
    PROTOCOL_ERROR,
    RawH2,
    attack,
    frame_bytes,
    ping_ack_count,
    request_headers,
    settings_ack_count,
)
from tests.relay_process import RelayProcess

BUDGET = 1000  # the default reset_budget and control_frame_budget
# The buckets refill a tenth of their size per second while the attack runs;
# a flood that takes a few seconds on a loaded machine earns a few hundred more.
SLACK = 600
FLOOD = 20_000


# The relay reads 64 KiB at a time and h2 parses all of it before the relay
# sees the events, so GOAWAY's last_stream_id may name streams from the rest
# of the read in which the budget ran out (their handlers never start).
READ_BYTES = 64 * 1024


def _streams_before_goaway(last_stream_id: int) -> int:
    return (last_stream_id + 1) // 2


# -- resets ------------------------------------------------------------------------------


def test_rapid_reset_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    """CVE-2023-44487: HEADERS + RST_STREAM pairs, as fast as the socket takes them."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        batch = bytearray()
        pair_bytes = []
        for n in range(FLOOD // 4):
            stream_id = 2 * n + 1
            pair = client.headers_frame_bytes(stream_id, request_headers("/livez"))
            pair += frame_bytes(0x3, 0, stream_id, (0x8).to_bytes(4, "big"))  # RST_STREAM CANCEL
            pair_bytes.append(len(pair))
            batch += pair
        client.send(bytes(batch))
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert _streams_before_goaway(goaway.last_stream_id) <= BUDGET + SLACK + READ_BYTES // min(pair_bytes)


def test_made_you_reset_window_overflow_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    """CVE-2025-8671: a stream WINDOW_UPDATE that overflows the window makes the *server* reset the stream."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        batch = bytearray()
        for n in range(FLOOD // 4):
            stream_id = 2 * n + 1
            batch += client.headers_frame_bytes(stream_id, request_headers("/livez"))
            batch += frame_bytes(0x8, 0, stream_id, (2**31 - 1).to_bytes(4, "big"))
        client.send(bytes(batch))
        goaway = client.wait_goaway()
        received = client.received
    assert goaway is not None, f"no GOAWAY; {len(received.resets())} server resets"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert len(received.resets()) <= BUDGET + SLACK


def test_made_you_reset_data_on_half_closed_stream_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    """CVE-2025-8671: DATA after END_STREAM is a stream error the server answers with RST_STREAM(STREAM_CLOSED)."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        batch = bytearray()
        for n in range(FLOOD // 4):
            stream_id = 2 * n + 1
            batch += client.headers_frame_bytes(stream_id, request_headers("/livez"))
            batch += frame_bytes(0x0, 0, stream_id, b"x")
        client.send(bytes(batch))
        goaway = client.wait_goaway()
        received = client.received
    assert goaway is not None, f"no GOAWAY; {len(received.resets())} server resets"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert len(received.resets()) <= BUDGET + SLACK


def test_made_you_reset_repeated_on_one_reset_stream_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    """Frames on a stream the server already reset: each one is answered with another RST_STREAM."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        batch = bytearray(client.headers_frame_bytes(1, request_headers("/livez")))
        batch += frame_bytes(0x0, 0, 1, b"x")  # provokes the first reset
        batch += frame_bytes(0x0, 0, 1, b"") * FLOOD  # each provokes another
        client.send(bytes(batch))
        goaway = client.wait_goaway()
        received = client.received
    rst_frames = sum(1 for frame in received.frames if frame.type == 0x3)
    assert goaway is not None, f"no GOAWAY after {rst_frames} RST_STREAM frames"
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert rst_frames <= BUDGET + SLACK


# -- control-frame floods ----------------------------------------------------------------


def test_ping_flood_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), RawH2(relay.port) as client:
        client.send(frame_bytes(0x6, 0, 0, b"12345678") * FLOOD)
        goaway = client.wait_goaway()
        acks = ping_ack_count(client.received)
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert acks <= BUDGET + SLACK


def test_settings_flood_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), RawH2(relay.port) as client:
        client.send(bytes(SettingsFrame(0).serialize()) * FLOOD)
        goaway = client.wait_goaway()
        acks = settings_ack_count(client.received)
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM
    assert acks <= BUDGET + SLACK + 1  # +1: the ACK of the preface SETTINGS


def test_empty_data_flood_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), RawH2(relay.port) as client:
        opened = client.headers_frame_bytes(1, request_headers("/v1/messages", "POST"), end_stream=False)
        client.send(opened + frame_bytes(0x0, 0, 1, b"") * FLOOD)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM


def test_priority_flood_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    with attack(pid, relay.port), RawH2(relay.port) as client:
        batch = bytearray()
        for n in range(FLOOD):
            frame = PriorityFrame(2 * n + 1, depends_on=0, stream_weight=16)
            batch += frame.serialize()
        client.send(bytes(batch))
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM


def test_unknown_frame_flood_gets_enhance_your_calm(relay: RelayProcess, pid: int) -> None:
    """Extension frames must be ignored (RFC 9113 §5.5), but not for free."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        client.send(frame_bytes(0xFA, 0, 0, b"") * FLOOD)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM


@pytest.mark.parametrize(("fields", "code"), [(100, PROTOCOL_ERROR), (4000, ENHANCE_YOUR_CALM)])
def test_zero_length_header_flood_is_a_connection_error(relay: RelayProcess, pid: int, fields: int, code: int) -> None:
    """CVE-2019-9516: empty header names (HPACK-indexed so each costs a table entry).

    A few are a malformed request (PROTOCOL_ERROR); thousands pass the header
    list limit first (32 bytes of overhead each) and hpack's size guard ends
    the connection with ENHANCE_YOUR_CALM.
    """
    with attack(pid, relay.port), RawH2(relay.port) as client:
        # Literal with incremental indexing, new name: 0x40, name length 0, value length 0.
        block = client.header_block(request_headers("/livez")) + b"\x40\x00\x00" * fields
        client.headers(block=block)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == code


def test_empty_header_values_past_the_list_limit_end_the_connection(relay: RelayProcess, pid: int) -> None:
    """Each field costs 32 bytes of header-list size (RFC 7541 §4.1) however short it is."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        # An indexed name ("accept-charset", static index 15) with an empty value, without indexing: 3 bytes each.
        block = client.header_block(request_headers("/livez")) + b"\x0f\x00\x00" * 5000
        client.headers(block=block)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code in (PROTOCOL_ERROR, COMPRESSION_ERROR, ENHANCE_YOUR_CALM)


# -- header blocks -----------------------------------------------------------------------


@pytest.mark.parametrize("payload_bytes", [0, 1, 16_000])
def test_continuation_flood_is_a_connection_error(relay: RelayProcess, pid: int, payload_bytes: int) -> None:
    """CONTINUATION flood (2024, VU#421644): more than 64 CONTINUATION frames, or a block past the header limit."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        client.headers(block=client.header_block(request_headers("/livez")), end_headers=False)
        client.send(frame_bytes(0x9, 0, 1, b"a" * payload_bytes) * 2000)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == PROTOCOL_ERROR


def test_hpack_bomb_is_a_connection_error(relay: RelayProcess, pid: int) -> None:
    """One 4 KB entry in the dynamic table, then 12,000 one-byte references to it (48 MB decoded)."""
    with attack(pid, relay.port), RawH2(relay.port) as client:
        big = client.header_block([("x-bomb", "a" * 4000)])  # hpack indexes it: dynamic index 62
        block = client.header_block(request_headers("/livez")) + big + b"\xbe" * 12_000
        client.headers(block=block)
        goaway = client.wait_goaway()
    assert goaway is not None
    assert goaway.error_code == ENHANCE_YOUR_CALM  # hpack refuses a decoded list past the limit
