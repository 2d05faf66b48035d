"""HTTP/2 on one connection: h2 as the state machine, trio for I/O.

Tasks per connection: one reader (socket → h2 → events), one writer (h2's
outbound bytes → socket) and one task per request stream. Every task mutates
h2 state directly (trio is single-threaded) and then calls
:meth:`HTTP2Connection._flush`, which moves h2's pending bytes into one
outbound buffer and wakes the writer. The writer runs at the next scheduling
turn, so all frames queued in that turn — many streams' responses, PING acks,
WINDOW_UPDATEs — leave in one ``send_all`` (DESIGN.md §10: one write per
message costs ~80 µs of CPU).

Memory bounds: a response writer hands h2 at most the peer's flow-control
window and stops while the outbound buffer holds ``send_buffer_bytes`` or
more; the reader stops reading while the buffer is over that cap, so a peer
that does not read cannot make the server queue without bound (it is closed
when its socket accepts nothing for ``idle_timeout_seconds``).

Request bodies: a buffered body is acknowledged (its window reopened) as it
arrives, while the connection holds less than ``max_connection_body_bytes``
of bodies. A streamed body (a streaming route's) is acknowledged only as the
handler reads it, so each stream holds at most its window (1 MiB) unread and
all of them together at most the connection window; a handler that stops
reading stops its sender.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Final

import h2.config
import h2.connection
import h2.errors
import h2.events
import h2.exceptions
import h2.settings
import trio
from hyperframe.frame import Frame, GoAwayFrame, RstStreamFrame

from protocol.errors import ErrorCode, TetherlessError
from relay import metrics
from relay.api.http import BodyStream, Handler, Request, Response, problem_response
from relay.config import Config
from relay.ratelimit import TokenBucket
from relay.transport.base import (
    BODY_COMMIT_SECONDS,
    CLOSE_FLUSH_SECONDS,
    HTTP2,
    InvalidResponseError,
    StreamsBody,
    WriteStalledError,
    aclose_iterator,
    body_has_no_content,
    content_lengths,
    decode_headers,
    logger,
    never_streams_body,
    response_headers,
    send_with_stall_timeout,
    split_target,
    stream_length_error,
)

ErrorCodes = h2.errors.ErrorCodes

RECEIVE_BYTES: Final = 64 * 1024
# Per-stream receive window: a several-MiB upload needs few round trips.
STREAM_WINDOW_BYTES: Final = 1024 * 1024
# The connection window is larger so concurrent uploads don't starve each other.
CONNECTION_WINDOW_BYTES: Final = 16 * 1024 * 1024

# h2 exception → metric kind; anything else is a plain "protocol" error.
_ERROR_KINDS: Final[tuple[tuple[type[Exception], str], ...]] = (
    (h2.exceptions.DenialOfServiceError, "h2_denial_of_service"),
    (h2.exceptions.FrameTooLargeError, "h2_frame_too_large"),
    (h2.exceptions.FlowControlError, "h2_flow_control"),
    (h2.exceptions.TooManyStreamsError, "h2_too_many_streams"),
    (h2.exceptions.StreamClosedError, "h2_stream_closed"),
)


_STATUS_HEADERS: Final = {code: (b":status", str(code).encode("ascii")) for code in range(200, 600)}

# Frames h2 writes by itself while it reads (RFC 9113 §4.1 header: length, type, flags, stream id).
_FRAME_HEADER_BYTES: Final = 9
_RST_STREAM: Final = 0x3
_SETTINGS: Final = 0x4
_PING: Final = 0x6
_ACK: Final = 0x1


def _count_replies(data: bytes) -> tuple[int, int]:
    """(PING/SETTINGS acknowledgements, RST_STREAM frames) in bytes h2 queued, which are whole frames."""
    control = resets = 0
    offset = 0
    while offset + _FRAME_HEADER_BYTES <= len(data):
        length = int.from_bytes(data[offset : offset + 3], "big")
        frame_type, flags = data[offset + 3], data[offset + 4]
        if frame_type == _RST_STREAM:
            resets += 1
        elif frame_type in (_SETTINGS, _PING) and flags & _ACK:
            control += 1
        offset += _FRAME_HEADER_BYTES + length
    return control, resets


# The body of h2 4.4.1's H2Connection._receive_frame, whose first line is
# ``logger.trace("Received frame: %s", repr(frame))``: the repr is built for
# every frame even though the logger drops it, and cost ~30 % of h2's CPU on
# a single send (docs/performance.md, "P1 fast path"). This copy leaves only
# that line out; tests/relay/transport/test_transport_fast_path.py pins the
# original's source so an h2 upgrade makes someone compare again.
class _H2Connection(h2.connection.H2Connection):
    def _receive_frame(self, frame: Frame) -> list[h2.events.Event]:
        events: list[h2.events.Event]
        try:
            frames, events = self._frame_dispatch_table[frame.__class__](frame)
        except h2.exceptions.StreamClosedError as e:
            # Closed by RST_STREAM: a stream error, answered with RST_STREAM; otherwise a connection error.
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = e.error_code
                self._prepare_for_sending([f])
                events = e._events
            else:
                raise
        except h2.exceptions.StreamIDTooLowError as e:
            if self._stream_is_closed_by_reset(e.stream_id):
                f = RstStreamFrame(e.stream_id)
                f.error_code = ErrorCodes.STREAM_CLOSED
                self._prepare_for_sending([f])
                events = []
            elif self._stream_is_closed_by_end(e.stream_id):
                raise h2.exceptions.StreamClosedError(e.stream_id) from e
            else:
                raise
        else:
            self._prepare_for_sending(frames)
        return events


class _StreamGoneError(Exception):
    """The stream can no longer carry frames (reset by either side, or the connection closed)."""


class _H2BodyStream(BodyStream):
    """A streamed request body: the reader task feeds DATA in, the handler reads it out.

    ``on_read(n)`` runs when the handler takes ``n`` bytes, which is when
    they are acknowledged to the peer; unread bytes are bounded by the
    stream's flow-control window because nothing else acknowledges them.
    """

    def __init__(self, declared_length: int | None, timeout_seconds: float, on_read: Callable[[int], None]) -> None:
        super().__init__(declared_length)
        self._chunks: deque[bytes] = deque()
        self.unread = 0
        self._timeout_seconds = timeout_seconds
        self._on_read = on_read
        self._lot = trio.lowlevel.ParkingLot()  # the handler waits here for bytes, the end or a failure

    @property
    def accepting(self) -> bool:
        """More DATA for this body is kept (else it is acknowledged and dropped)."""
        return not self._ended and self._failure is None

    def feed(self, data: bytes) -> None:
        self._chunks.append(data)
        self.unread += len(data)
        self._lot.unpark_all()

    def end(self) -> None:
        self._ended = True
        self._lot.unpark_all()

    def fail(self, reason: str) -> bool:
        failed = super().fail(reason)
        self._lot.unpark_all()
        return failed

    def close(self) -> int:
        """The handler returned: refuse more DATA and drop what it did not read; returns the bytes dropped."""
        self.fail("the request is over")
        dropped, self.unread = self.unread, 0
        self._chunks.clear()
        return dropped

    async def _read(self) -> bytes:
        if not self._chunks and self.accepting:
            # Inactivity, not total time: the clock restarts at every read, and a read returns as soon as any
            # byte is here. While the handler is not reading, its sender is held by flow control, not timed.
            with trio.move_on_after(self._timeout_seconds):
                while not self._chunks and self.accepting:
                    await self._lot.park()
            if not self._chunks and self.fail(f"no body bytes for {self._timeout_seconds} s"):
                metrics.protocol_errors_total.labels(kind="body_timeout").inc()
        if not self._chunks:
            return b""
        data = self._chunks[0] if len(self._chunks) == 1 else b"".join(self._chunks)
        self._chunks.clear()
        read, self.unread = self.unread, 0
        self._on_read(read)
        return data


@dataclass(eq=False, slots=True)
class _Stream:
    stream_id: int
    method: str
    target: str
    headers: list[tuple[str, str]]
    scope: trio.CancelScope = field(default_factory=trio.CancelScope)  # the whole stream task
    body: bytearray = field(default_factory=bytearray)
    body_complete: trio.Event = field(default_factory=trio.Event)  # END_STREAM seen, or body rejected
    too_large: bool = False
    body_accounted: int = 0  # bytes of this stream counted in the connection's body budget
    deferred_ack: int = 0  # flow-controlled bytes received but not yet acknowledged (backpressure)
    # Bytes of a streamed body dropped unread (its handler returned, or the body failed): acknowledged only when
    # the stream ends, by then at the connection level alone, so the sender is not invited to send more.
    dropped_ack: int = 0
    body_stream: _H2BodyStream | None = None  # a streaming route's body, read by the handler as it arrives
    remote_ended: bool = False
    gone: bool = False  # reset; nothing may be sent any more
    stop_streaming: bool = False  # drain: end a streaming response at the next chunk boundary
    next_chunk_scope: trio.CancelScope | None = None  # set while waiting for the next stream chunk


class HTTP2Connection:
    """Serves one HTTP/2 connection (TLS with ALPN "h2", or cleartext prior knowledge).

    ``initial`` holds bytes already read during protocol detection (the
    preface). :meth:`run` returns when the connection is finished; it does
    not close ``stream`` (the server does). Cancelling :meth:`run` abandons
    all streams at once (their response iterators are still ``aclose``\\ d).
    """

    protocol = HTTP2

    def __init__(
        self,
        stream: trio.abc.Stream,
        *,
        config: Config,
        handler: Handler,
        client: str,
        scheme: str,
        initial: bytes,
        started_at: float,
        streams_body: StreamsBody = never_streams_body,
    ) -> None:
        self._stream = stream
        self._streams_body = streams_body
        self._config = config
        self._handler = handler
        self._client = client
        self._scheme = scheme
        self._initial = initial
        self._started_at = started_at
        self._conn = _H2Connection(
            h2.config.H2Configuration(
                client_side=False,
                header_encoding=None,  # bytes in, bytes out; decoded once by base.decode_headers
                validate_inbound_headers=True,
                normalize_inbound_headers=True,
                # Responses are validated and normalised once, by
                # base.response_headers (token names, no CR/LF/NUL, lower
                # case, hop-by-hop removed; the result is cached): h2 doing it
                # again cost ~5 % of a single send's CPU.
                validate_outbound_headers=False,
                normalize_outbound_headers=False,
            )
        )
        self._streams: dict[int, _Stream] = {}
        self._body_bytes = 0  # request bodies buffered on this connection (max_connection_body_bytes)
        self._peak_body_bytes = 0
        self._aborted = False  # the socket failed: nothing more is written
        self._stream_ended_lot = trio.lowlevel.ParkingLot()  # a stream task finished
        self._out = bytearray()
        self._in_flight = 0
        self._writer_lot = trio.lowlevel.ParkingLot()  # writer waits here for bytes
        self._progress_lot = trio.lowlevel.ParkingLot()  # senders/reader wait here for window or buffer room
        self._read_scope: trio.CancelScope | None = None
        self._settings_received = False
        self._closing = False
        self._draining = False
        self._goaway_last_stream_id = 0
        self._control_budget = TokenBucket.per_connection(config.control_frame_budget)
        self._reset_budget = TokenBucket.per_connection(config.reset_budget)
        self._free_settings_acks = 1  # the ACK of the peer's preface SETTINGS costs no budget
        self._header_block_started: float | None = None

    # -- introspection -------------------------------------------------------------
    @property
    def open_streams(self) -> int:
        return len(self._streams)

    @property
    def buffered_bytes(self) -> int:
        """Outbound bytes the transport holds for this connection (queued + being written)."""
        return len(self._out) + self._in_flight

    @property
    def body_buffered_bytes(self) -> int:
        return self._body_bytes

    @property
    def peak_body_buffered_bytes(self) -> int:
        return self._peak_body_bytes

    # -- lifecycle -----------------------------------------------------------------
    async def run(self) -> None:
        """Serve until the peer leaves, an error ends the connection, or a drain completes."""
        settings = h2.settings.Settings(
            client=False,
            initial_values={
                h2.settings.SettingCodes.MAX_CONCURRENT_STREAMS: self._config.max_concurrent_streams,
                h2.settings.SettingCodes.MAX_HEADER_LIST_SIZE: self._config.max_header_list_bytes,
                h2.settings.SettingCodes.MAX_FRAME_SIZE: self._config.max_frame_bytes,
                h2.settings.SettingCodes.INITIAL_WINDOW_SIZE: STREAM_WINDOW_BYTES,
                h2.settings.SettingCodes.ENABLE_PUSH: 0,
            },
        )
        # Values in initial_values are in force at once; h2 only copies the
        # two that live outside Settings when a SETTINGS ACK arrives, so set
        # them here too.
        self._conn.local_settings = settings
        self._conn.max_inbound_frame_size = self._config.max_frame_bytes
        self._conn.decoder.max_header_list_size = self._config.max_header_list_bytes
        self._conn.initiate_connection()
        self._conn.increment_flow_control_window(CONNECTION_WINDOW_BYTES - 65535)
        self._flush()
        async with trio.open_nursery() as io_nursery:
            io_nursery.start_soon(self._write_loop)
            async with trio.open_nursery() as stream_nursery:
                await self._read_loop(stream_nursery)
                # The reader is done: the connection is closing. Streams
                # still running are abandoned (a completed drain has none),
                # but a streamed body's handler may first commit what arrived.
                await self._let_streamed_bodies_commit()
                stream_nursery.cancel_scope.cancel()
            with trio.move_on_after(CLOSE_FLUSH_SECONDS):
                while self.buffered_bytes and not self._aborted:
                    await self._progress_lot.park()
            io_nursery.cancel_scope.cancel()

    async def _let_streamed_bodies_commit(self) -> None:
        """Cut streamed bodies still arriving and wait (bounded) for their handlers; cancel every other stream."""
        for stream in self._streams.values():
            if stream.body_stream is None:
                stream.scope.cancel()
            else:
                stream.body_stream.fail("the connection closed")
        with trio.move_on_after(BODY_COMMIT_SECONDS):
            while self._streams:
                await self._stream_ended_lot.park()

    def cut_request_bodies(self, reason: str) -> None:
        """End streamed request bodies still arriving with BodyIncompleteError; their handlers then answer."""
        for stream in self._streams.values():
            if stream.body_stream is not None:
                stream.body_stream.fail(reason)

    def start_drain(self) -> None:
        """Send GOAWAY(NO_ERROR), refuse new streams, end streaming responses; close when streams finish.

        The first GOAWAY is written by hand rather than through h2, because
        h2 forbids sending anything after its own GOAWAY and in-flight
        responses still need their DATA frames. Idempotent.
        """
        if self._draining or self._closing:
            return
        self._draining = True
        if not self._settings_received:
            self._close(None, "drain")
            return
        self._goaway_last_stream_id = self._conn.highest_inbound_stream_id
        frame = GoAwayFrame(stream_id=0, last_stream_id=self._goaway_last_stream_id, error_code=ErrorCodes.NO_ERROR)
        self._out += frame.serialize()
        self._writer_lot.unpark_all()
        metrics.goaways_total.labels(code=ErrorCodes.NO_ERROR.name).inc()
        for stream in self._streams.values():
            self._stop_streaming(stream)
        self._close_if_drained()

    def _close(self, error_code: ErrorCodes | None, reason: str, *, goaway_queued: bool = False) -> None:
        """Stop reading and let :meth:`run` finish; queue GOAWAY(``error_code``) unless None."""
        if self._closing:
            return
        self._closing = True
        logger.debug("h2 connection %s closing: %s", self._client, reason)
        if error_code is not None:
            if not goaway_queued:
                last = self._goaway_last_stream_id if self._draining else self._conn.highest_inbound_stream_id
                try:
                    self._conn.close_connection(error_code=error_code, last_stream_id=last)
                except h2.exceptions.ProtocolError:
                    pass  # the peer's GOAWAY already closed h2's side
            metrics.goaways_total.labels(code=error_code.name).inc()
            self._flush()
        if self._read_scope is not None:
            self._read_scope.cancel()
        self._progress_lot.unpark_all()

    def _abort(self, reason: str) -> None:
        """The socket is unusable: stop reading and writing; :meth:`run` ends the streams.

        Not a cancellation of everything at once: a handler reading a streamed
        body gets BodyIncompleteError and its chance to commit (a peer that
        vanished mid-upload surfaces as a failed WINDOW_UPDATE write as often
        as a failed read).
        """
        logger.debug("h2 connection %s aborted: %s", self._client, reason)
        self._closing = True
        self._aborted = True
        self._out.clear()
        if self._read_scope is not None:
            self._read_scope.cancel()
        self._progress_lot.unpark_all()

    def _close_if_drained(self) -> None:
        if self._draining and not self._streams:
            self._close(ErrorCodes.NO_ERROR, "drained")

    # -- writing -------------------------------------------------------------------
    def _flush(self) -> None:
        """Move h2's pending frames to the outbound buffer and wake the writer (which runs next turn)."""
        data = self._conn.data_to_send()
        if data and not self._aborted:
            self._out += data
            self._writer_lot.unpark_all()

    async def _write_loop(self) -> None:
        while True:
            if not self._out:
                await self._writer_lot.park()
                continue
            data = bytes(self._out)
            self._out.clear()
            self._in_flight = len(data)
            try:
                await send_with_stall_timeout(self._stream, data, self._config.idle_timeout_seconds)
            except (trio.BrokenResourceError, trio.ClosedResourceError, WriteStalledError) as exc:
                self._in_flight = 0
                self._abort(f"write failed: {exc!r}")
                return
            self._in_flight = 0
            self._progress_lot.unpark_all()

    def _is_closing(self) -> bool:
        # A method, not a bare attribute test: event handlers flip the flag
        # between checks, which attribute narrowing in mypy would hide.
        return self._closing

    def _has_send_room(self) -> bool:
        return self.buffered_bytes < self._config.send_buffer_bytes

    # -- reading -------------------------------------------------------------------
    def _header_block_pending(self) -> bool:
        # h2 holds a HEADERS frame and its CONTINUATIONs here until END_HEADERS;
        # it has no public way to ask. A missing attribute reads as "none pending".
        return bool(getattr(self._conn.incoming_buffer, "_headers_buffer", None))

    def _read_deadline(self) -> float:
        if not self._settings_received:
            return self._started_at + self._config.header_timeout_seconds
        if self._header_block_pending():
            # A header block dribbled one CONTINUATION at a time (slowloris)
            # must complete within the header timeout, whatever else arrives.
            if self._header_block_started is None:
                self._header_block_started = trio.current_time()
            return self._header_block_started + self._config.header_timeout_seconds
        self._header_block_started = None
        if not self._streams:
            return trio.current_time() + self._config.idle_timeout_seconds
        return math.inf

    async def _read_loop(self, nursery: trio.Nursery) -> None:
        data: bytes | bytearray | None = self._initial
        while not self._is_closing():
            if data:
                self._receive(data, nursery)
                if self._is_closing():
                    return
            # Backpressure: while the peer is not taking what we already
            # queued, do not read more requests (or PINGs) from it.
            while not self._has_send_room() and not self._is_closing():
                await self._progress_lot.park()
            if self._is_closing():
                return
            data = None
            with trio.CancelScope(deadline=self._read_deadline()) as scope:
                self._read_scope = scope
                try:
                    data = await self._stream.receive_some(RECEIVE_BYTES)
                except (trio.BrokenResourceError, trio.ClosedResourceError):
                    data = b""
            self._read_scope = None
            if data is None:  # deadline passed, or _close() cancelled the read
                if not self._closing:
                    self._on_read_timeout()
                return
            if not data:
                self._close(None, "peer closed")
                return

    def _on_read_timeout(self) -> None:
        if not self._settings_received:
            metrics.protocol_errors_total.labels(kind="header_timeout").inc()
            self._close(None, "no preface/SETTINGS within header timeout")
        elif self._header_block_pending():
            metrics.protocol_errors_total.labels(kind="header_timeout").inc()
            self._close(ErrorCodes.NO_ERROR, "header block incomplete within header timeout")
        else:
            self._close(ErrorCodes.NO_ERROR, "idle timeout")

    def _receive(self, data: bytes | bytearray, nursery: trio.Nursery) -> None:
        try:
            events = self._conn.receive_data(data)
        except h2.exceptions.ProtocolError as exc:
            # h2 has already queued GOAWAY with the matching error code.
            kind = next((name for cls, name in _ERROR_KINDS if isinstance(exc, cls)), "h2_protocol")
            metrics.protocol_errors_total.labels(kind=kind).inc()
            self._close(ErrorCodes(exc.error_code), f"{kind}: {exc}", goaway_queued=True)
            return
        except Exception as exc:
            # Not a documented h2 outcome; treat the input as a protocol violation.
            logger.debug("h2 rejected input from %s", self._client, exc_info=True)
            metrics.protocol_errors_total.labels(kind="h2_protocol").inc()
            self._close(ErrorCodes.PROTOCOL_ERROR, f"h2 failed: {exc!r}")
            return
        if not self._spend_replies(self._conn.data_to_send()):
            return
        for event in events:
            self._on_event(event, nursery)
            if self._closing:
                return
        self._flush()

    def _on_event(self, event: h2.events.Event, nursery: trio.Nursery) -> None:
        if isinstance(event, h2.events.RequestReceived):
            self._on_request(event, nursery)
        elif isinstance(event, h2.events.DataReceived):
            self._on_data(event)
        elif isinstance(event, h2.events.StreamEnded):
            stream = self._streams.get(event.stream_id)
            if stream is not None:
                stream.remote_ended = True
                stream.body_complete.set()
                if stream.body_stream is not None:
                    stream.body_stream.end()
        elif isinstance(event, h2.events.StreamReset):
            self._on_reset(event)
        elif isinstance(event, h2.events.WindowUpdated):
            self._progress_lot.unpark_all()
        elif isinstance(event, h2.events.RemoteSettingsChanged):
            # Its ACK was counted by _spend_replies.
            self._settings_received = True
            self._progress_lot.unpark_all()  # INITIAL_WINDOW_SIZE may have grown
        elif isinstance(
            event,
            h2.events.PingAckReceived
            | h2.events.PriorityUpdated
            | h2.events.SettingsAcknowledged
            | h2.events.UnknownFrameReceived,
        ):
            self._spend_control()
        elif isinstance(event, h2.events.ConnectionTerminated):
            # h2 refuses to send after the peer's GOAWAY, so in-flight streams cannot finish.
            self._close(None, f"peer GOAWAY {event.error_code!r}")

    def _spend_replies(self, replies: bytes) -> bool:
        """Charge the frames h2 queued by itself while reading, then queue them; False if that closed us.

        h2 answers every PING and SETTINGS and resets streams on protocol
        errors (a WINDOW_UPDATE overflow, DATA after END_STREAM, any frame
        on a stream it reset: MadeYouReset, CVE-2025-8671) inside
        ``receive_data``, for a whole read's worth of frames at once. Those
        replies are counted here, before any is queued, so a flood gets
        GOAWAY(ENHANCE_YOUR_CALM) and never more than a budget of replies.
        """
        if not replies:
            return True
        control, resets = _count_replies(replies)
        free = min(control, self._free_settings_acks)
        self._free_settings_acks -= free
        control -= free
        if control and not self._control_budget.take(control):
            metrics.protocol_errors_total.labels(kind="control_frame_budget").inc()
            self._close(ErrorCodes.ENHANCE_YOUR_CALM, "control frame budget exhausted")
            return False
        if resets and not self._reset_budget.take(resets):
            metrics.protocol_errors_total.labels(kind="reset_budget").inc()
            self._close(ErrorCodes.ENHANCE_YOUR_CALM, "reset budget exhausted")
            return False
        self._out += replies
        self._writer_lot.unpark_all()
        return True

    def _spend_control(self) -> None:
        if not self._control_budget.take():
            metrics.protocol_errors_total.labels(kind="control_frame_budget").inc()
            self._close(ErrorCodes.ENHANCE_YOUR_CALM, "control frame budget exhausted")

    def _spend_reset(self) -> None:
        if not self._reset_budget.take():
            metrics.protocol_errors_total.labels(kind="reset_budget").inc()
            self._close(ErrorCodes.ENHANCE_YOUR_CALM, "reset budget exhausted")

    def _on_request(self, event: h2.events.RequestReceived, nursery: trio.Nursery) -> None:
        stream_id = event.stream_id
        if self._draining and stream_id > self._goaway_last_stream_id:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        # h2 counts only streams that are open at the protocol level; a reset
        # stream whose handler still runs is invisible to it (rapid reset), so
        # the cap is enforced on our own tasks as well.
        if len(self._streams) >= self._config.max_concurrent_streams:
            self._reset(stream_id, ErrorCodes.REFUSED_STREAM)
            return
        pseudo: dict[bytes, bytes] = {}
        regular: list[tuple[bytes, bytes]] = []
        for name, value in event.headers:
            raw_name, raw_value = bytes(name), bytes(value)  # header_encoding=None: always bytes
            if raw_name.startswith(b":"):
                pseudo[raw_name] = raw_value
            else:
                regular.append((raw_name, raw_value))
        method = pseudo.get(b":method", b"").decode("latin-1").upper()
        target = pseudo.get(b":path", b"").decode("latin-1")
        headers = decode_headers(regular)
        authority = pseudo.get(b":authority")
        if authority is not None and not any(name == "host" for name, _ in headers):
            headers.append(("host", authority.decode("latin-1")))
        lengths = content_lengths(headers)
        if method == "CONNECT" or not target or len(lengths) > 1 or not all(v.isdigit() for v in lengths):
            metrics.protocol_errors_total.labels(kind="h2_malformed_request").inc()
            self._reset(stream_id, ErrorCodes.PROTOCOL_ERROR)
            return
        stream = _Stream(stream_id=stream_id, method=method, target=target, headers=headers)
        declared = int(next(iter(lengths))) if lengths else None
        if self._streams_body(method, split_target(target)[0]):
            # Not capped by max_body_bytes: the handler enforces its own limit as it reads.
            stream.body_stream = _H2BodyStream(
                declared, self._config.body_timeout_seconds, lambda read: self._on_body_read(stream, read)
            )
        elif declared is not None and declared > self._config.max_body_bytes:
            stream.too_large = True
            stream.body_complete.set()
        if event.stream_ended is not None:
            stream.remote_ended = True
            stream.body_complete.set()
            if stream.body_stream is not None:
                stream.body_stream.end()
        self._streams[stream_id] = stream
        nursery.start_soon(self._run_stream, stream)

    def _on_data(self, event: h2.events.DataReceived) -> None:
        stream_id = event.stream_id
        flow_length = event.flow_controlled_length or 0
        data = event.data or b""
        if not data and event.stream_ended is None:
            self._spend_control()  # empty DATA without END_STREAM does nothing but cost us work
        stream = self._streams.get(stream_id)
        if stream is not None and stream.body_stream is not None:
            self._on_streamed_data(stream, stream.body_stream, data, flow_length)
            return
        buffered = False
        if stream is not None and not stream.too_large and not stream.body_complete.is_set():
            stream.body += data
            stream.body_accounted += len(data)
            self._body_bytes += len(data)
            buffered = True
            self._note_body_peak()
            if len(stream.body) > self._config.max_body_bytes:
                stream.too_large = True
                stream.body = bytearray()
                self._release_body(stream)
                stream.body_complete.set()
                buffered = False
        # Buffered bodies are acknowledged (the peer's window reopens) only
        # while this connection holds less than max_connection_body_bytes of
        # them; past that the bytes are acknowledged when some request ends
        # and frees its body. Without this, 100 streams x max_body_bytes could
        # be buffered per connection. Discarded bytes are acknowledged at once
        # so the connection window never shrinks.
        if buffered and stream is not None and self._body_bytes > self._config.max_connection_body_bytes:
            stream.deferred_ack += flow_length
        elif flow_length:
            self._acknowledge(stream_id, flow_length)

    def _on_streamed_data(self, stream: _Stream, body: _H2BodyStream, data: bytes, flow_length: int) -> None:
        """Hold DATA of a streamed body for the handler; acknowledged when read (padding at once)."""
        if not body.accepting:  # the handler returned, or the body failed: drop it
            stream.dropped_ack += flow_length
            return
        if flow_length > len(data):
            self._acknowledge(stream.stream_id, flow_length - len(data))
        if data:
            body.feed(data)
            stream.body_accounted += len(data)
            self._body_bytes += len(data)
            self._note_body_peak()

    def _on_body_read(self, stream: _Stream, read: int) -> None:
        """The handler took ``read`` bytes of its streamed body: reopen that much of the windows."""
        stream.body_accounted -= read
        self._body_bytes -= read
        # Never deferred by the budget: these bytes are no longer held, and unread streamed bytes are
        # bounded by the windows anyway. Deferring would stall a reading handler behind others' bodies.
        self._acknowledge(stream.stream_id, read)
        self._reopen_windows()

    def _note_body_peak(self) -> None:
        self._peak_body_bytes = max(self._peak_body_bytes, self._body_bytes)

    def _acknowledge(self, stream_id: int, flow_length: int) -> None:
        try:
            self._conn.acknowledge_received_data(flow_length, stream_id)
        except h2.exceptions.ProtocolError:
            pass

    def _release_body(self, stream: _Stream) -> None:
        """Give ``stream``'s buffered body back to the connection budget and reopen deferred windows.

        A streamed body's dropped bytes are acknowledged here, so the
        connection window stays whole after a handler that did not read all.
        Called when the stream ends (idempotent).
        """
        self._drop_unread(stream)
        self._body_bytes -= stream.body_accounted
        stream.body_accounted = 0
        if stream.deferred_ack or stream.dropped_ack:
            self._acknowledge(stream.stream_id, stream.deferred_ack + stream.dropped_ack)
            stream.deferred_ack = stream.dropped_ack = 0
        self._reopen_windows()

    def _drop_unread(self, stream: _Stream) -> None:
        """End a streamed body for its handler: what it did not read leaves the budget, to be acknowledged later."""
        if stream.body_stream is None:
            return
        dropped = stream.body_stream.close()
        stream.body_accounted -= dropped
        self._body_bytes -= dropped
        stream.dropped_ack += dropped

    def _reopen_windows(self) -> None:
        """Acknowledge deferred body bytes, stream by stream, while the connection is under its body budget."""
        for other in self._streams.values():
            if self._body_bytes > self._config.max_connection_body_bytes:
                break
            if other.deferred_ack:
                self._acknowledge(other.stream_id, other.deferred_ack)
                other.deferred_ack = 0
        self._flush()

    def _on_reset(self, event: h2.events.StreamReset) -> None:
        if event.remote_reset:
            self._spend_reset()
        stream = self._streams.get(event.stream_id)
        if stream is not None:
            stream.gone = True
            if stream.body_stream is None:
                stream.scope.cancel()
            else:
                # Not cancelled: the handler reads BodyIncompleteError and may keep what arrived. It still counts
                # against max_concurrent_streams until it returns, so resets cannot pile up handlers.
                stream.body_stream.fail("the peer reset the stream")
        self._progress_lot.unpark_all()

    def _reset(self, stream_id: int, code: ErrorCodes) -> None:
        """Reset a stream from our side; counts against the reset budget (MadeYouReset)."""
        try:
            self._conn.reset_stream(stream_id, error_code=code)
        except h2.exceptions.ProtocolError:
            return  # already closed, or the connection is
        self._flush()
        self._spend_reset()

    # -- streams -------------------------------------------------------------------
    async def _run_stream(self, stream: _Stream) -> None:
        iterator_holder: list[Response] = []
        try:
            with stream.scope:
                await self._serve_stream(stream, iterator_holder)
        except _StreamGoneError:
            pass
        except Exception:
            # A transport bug, never the handler's (that is caught below):
            # keep the connection alive, reset just this stream.
            logger.exception("h2 stream %d failed", stream.stream_id)
            if not stream.gone:
                self._reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)
        finally:
            for response in iterator_holder:
                if response.stream is not None:
                    await aclose_iterator(response.stream)
            stream.gone = True
            del self._streams[stream.stream_id]
            self._release_body(stream)
            self._stream_ended_lot.unpark_all()
            if not self._streams and self._read_scope is not None and not self._closing:
                # Idle timeout starts now that the last stream has finished.
                self._read_scope.deadline = self._read_deadline()
            self._close_if_drained()

    async def _serve_stream(self, stream: _Stream, holder: list[Response]) -> None:
        if stream.body_stream is not None:
            await self._serve_streamed_body(stream, stream.body_stream, holder)
            return
        if not stream.body_complete.is_set():
            # Only a body still in flight needs its own timeout; most requests
            # arrive whole in one read and skip the cancel scope.
            with trio.move_on_after(self._config.body_timeout_seconds):
                await stream.body_complete.wait()
        if not stream.body_complete.is_set():
            metrics.protocol_errors_total.labels(kind="body_timeout").inc()
            stream.gone = True
            self._reset(stream.stream_id, ErrorCodes.CANCEL)
            return
        if stream.too_large:
            detail = f"request body larger than {self._config.max_body_bytes} bytes"
            await self._send_response(stream, problem_response(TetherlessError(ErrorCode.BODY_TOO_LARGE, detail)))
            if not stream.remote_ended:
                # RFC 9113 §8.1: a complete response, then NO_ERROR to stop the upload.
                stream.gone = True
                self._reset(stream.stream_id, ErrorCodes.NO_ERROR)
            return
        request = self._request(stream, bytes(stream.body), None)
        stream.body = bytearray()
        response = await self._call_handler(request)
        holder.append(response)
        await self._send_response(stream, response)

    def _request(self, stream: _Stream, body: bytes, body_stream: BodyStream | None) -> Request:
        path, query = split_target(stream.target)
        return Request(
            method=stream.method,
            path=path,
            query=query,
            headers=stream.headers,
            body=body,
            client=self._client,
            http_version="2",
            scheme=self._scheme,
            body_stream=body_stream,
        )

    async def _call_handler(self, request: Request) -> Response:
        try:
            return await self._handler(request)
        except Exception:
            logger.exception("handler raised on %s %s", request.method, request.path)
            return problem_response(TetherlessError(ErrorCode.INTERNAL))

    async def _serve_streamed_body(self, stream: _Stream, body: _H2BodyStream, holder: list[Response]) -> None:
        """Run the handler at once with the body as a stream; a body it left unread ends with RST_STREAM(NO_ERROR).

        RFC 9113 §8.1: a server may answer before the request is complete
        and then reset the stream with NO_ERROR to stop the upload. The body
        ends with the handler (as on HTTP/1.1, where the response needs the
        socket): what it did not read is dropped, and acknowledged when the
        stream has ended.
        """
        try:
            response = await self._call_handler(self._request(stream, b"", body))
        finally:
            self._drop_unread(stream)
        holder.append(response)
        await self._send_response(stream, response)
        if not stream.remote_ended and not stream.gone:
            stream.gone = True
            self._reset(stream.stream_id, ErrorCodes.NO_ERROR)

    def _stop_requested(self, stream: _Stream) -> bool:
        return stream.stop_streaming or self._draining

    def _stop_streaming(self, stream: _Stream) -> None:
        stream.stop_streaming = True
        if stream.next_chunk_scope is not None:
            stream.next_chunk_scope.cancel()

    async def _send_response(self, stream: _Stream, response: Response) -> None:
        try:
            headers = response_headers(response)
        except InvalidResponseError as exc:
            logger.error("invalid response to %s %s: %s", stream.method, split_target(stream.target)[0], exc)
            response = problem_response(TetherlessError(ErrorCode.INTERNAL))
            headers = response_headers(response)
        no_body = body_has_no_content(stream.method, response.status)
        status = [_STATUS_HEADERS[response.status]]  # response_headers checked 200..599
        length = len(response.body) if response.stream is None else response.length
        if length is not None and response.status not in (204, 304):
            headers.append((b"content-length", str(length).encode("ascii")))
        if response.stream is None or no_body:
            body = b"" if no_body else response.body
            self._send_headers(stream, status + headers, end_stream=not body)
            if body:
                await self._send_data(stream, body, end_stream=True)
            return
        self._send_headers(stream, status + headers, end_stream=False)
        iterator = response.stream
        # A stream of known length is never ended early by a drain: a shortened body would be a corrupt one.
        stoppable = response.length is None
        sent = 0
        while not (stoppable and self._stop_requested(stream)):
            with trio.CancelScope() as scope:
                stream.next_chunk_scope = scope if stoppable else None
                try:
                    chunk = await iterator.__anext__()
                except StopAsyncIteration:
                    break
                except Exception:
                    logger.exception("response stream raised on %s %s", stream.method, split_target(stream.target)[0])
                    self._abort_response(stream, None)
                    return
            stream.next_chunk_scope = None
            if stoppable and self._stop_requested(stream):
                break
            sent += len(chunk)
            if problem := stream_length_error(response.length, sent, ended=False):
                self._abort_response(stream, problem)
                return
            if chunk:
                await self._send_data(stream, chunk, end_stream=False)
        stream.next_chunk_scope = None
        if problem := stream_length_error(response.length, sent, ended=True):
            self._abort_response(stream, problem)
            return
        await self._send_data(stream, b"", end_stream=True)

    def _abort_response(self, stream: _Stream, problem: str | None) -> None:
        """Reset a response that cannot be completed, so the client never takes a part for the whole."""
        if problem is not None:
            logger.error("response to %s %s aborted: %s", stream.method, split_target(stream.target)[0], problem)
        stream.gone = True
        self._reset(stream.stream_id, ErrorCodes.INTERNAL_ERROR)

    def _send_headers(self, stream: _Stream, headers: list[tuple[bytes, bytes]], *, end_stream: bool) -> None:
        if stream.gone or self._closing:
            raise _StreamGoneError
        try:
            self._conn.send_headers(stream.stream_id, headers, end_stream=end_stream)
        except h2.exceptions.ProtocolError:
            raise _StreamGoneError from None
        self._flush()

    async def _send_data(self, stream: _Stream, data: bytes, *, end_stream: bool) -> None:
        """Hand ``data`` to h2 frame by frame as the peer's window and our buffer cap allow.

        Raises :class:`_StreamGoneError` when the stream is reset or the
        connection closes meanwhile. Cancellation leaves a prefix of ``data``
        sent; the stream is then reset or abandoned by the caller.
        """
        view = memoryview(data)
        sent = 0
        window_closed_since: float | None = None
        while True:
            if stream.gone or self._closing:
                raise _StreamGoneError
            remaining = len(view) - sent
            if remaining == 0 and not end_stream:
                return
            try:
                if remaining == 0:
                    self._conn.end_stream(stream.stream_id)
                    self._flush()
                    return
                window = self._conn.local_flow_control_window(stream.stream_id)
            except h2.exceptions.ProtocolError:
                raise _StreamGoneError from None
            if window <= 0:
                # The peer opens no window (INITIAL_WINDOW_SIZE 0, no
                # WINDOW_UPDATE): give up on the stream after the idle
                # timeout, or it and its response would be held forever.
                now = trio.current_time()
                window_closed_since = now if window_closed_since is None else window_closed_since
                give_up_at = window_closed_since + self._config.idle_timeout_seconds
                if now >= give_up_at:
                    metrics.protocol_errors_total.labels(kind="flow_control_stall").inc()
                    stream.gone = True
                    self._reset(stream.stream_id, ErrorCodes.CANCEL)
                    raise _StreamGoneError
                with trio.move_on_at(give_up_at):
                    await self._progress_lot.park()
                continue
            window_closed_since = None
            if not self._has_send_room():
                await self._progress_lot.park()
                continue
            size = min(window, self._conn.max_outbound_frame_size, remaining)
            last = end_stream and size == remaining
            try:
                self._conn.send_data(stream.stream_id, view[sent : sent + size], end_stream=last)
            except h2.exceptions.ProtocolError:
                raise _StreamGoneError from None
            sent += size
            self._flush()
            if last:
                return
