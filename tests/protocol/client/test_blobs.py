"""protocol/client/blobs.py against an in-memory tus relay (and a lying one): upload, resume, download, the media
cache, and every refusal a malicious relay must meet. No process, no network; the same with real relay processes
and the CLI: tests/e2e/test_media.py.
"""

from __future__ import annotations

import base64
import hashlib
import os
import random
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import msgspec
import pytest
import trio

from protocol import blobs as blobfmt
from protocol import codec
from protocol.client import blobs
from protocol.client.api import RelayApi
from protocol.client.http import ConnectError, ConnectionLostError, Response
from protocol.client.keystore import DeviceKeys
from protocol.client.localdb import LocalDB
from protocol.client.sdk import RelayClient
from protocol.client.store import ClientStore
from protocol.errors import ErrorCode, RemoteError, TetherlessError
from protocol.messages import Limits, WellKnown
from protocol.payload import FILE_CONTENT_TYPE
from tests.protocol.client.test_api import RELAY, URL, FakeRelay, _keys, _problem

PIECE = 4 * blobfmt.CIPHER_CHUNK_BYTES + 100  # pieces that do not align with chunks


class Upload(msgspec.Struct):
    length: int
    digest: bytes
    capability_hash: bytes
    data: bytearray = msgspec.field(default_factory=bytearray)
    blob_id: str | None = None


class _Body:
    """What a streaming response offers the SDK: status, headers, chunks."""

    def __init__(self, status: int, headers: list[tuple[str, str]], chunks: list[bytes]) -> None:
        self.status = status
        self.headers = headers
        self._chunks = chunks

    def header(self, name: str) -> str | None:
        return Response(self.status, self.headers, b"").header(name)

    def __aiter__(self) -> _Body:
        return self

    async def __anext__(self) -> bytes:
        await trio.lowlevel.checkpoint()
        if not self._chunks:
            raise StopAsyncIteration
        return self._chunks.pop(0)

    async def read(self, max_bytes: int = 0) -> bytes:
        return b"".join(self._chunks)


class TusRelay(FakeRelay):
    """The relay's blob routes as docs/blobs.md describes them, in memory, with knobs to make it lie."""

    def __init__(self, keys: DeviceKeys) -> None:
        super().__init__(keys, self._answer)
        self.uploads: dict[str, Upload] = {}
        self.blobs: dict[str, Upload] = {}
        self.received = 0  # PATCH body bytes, as relay_blob_upload_bytes_total counts them
        self.patches = 0
        self.fail_patch_after: int | None = None  # the connection drops after this many PATCHes
        self.head_offset: Callable[[int], int] | None = None  # a relay lying about the offset
        self.patch_answer: Callable[[int], int] | None = None
        self.served: Callable[[bytes], bytes] | None = None  # what a GET serves instead of the blob's bytes
        self.range_start: Callable[[int], int] | None = None  # the Content-Range start it claims
        self.max_blob_bytes = 16 * 1024**3
        self.downloads = 0
        self.lose_before_patch = False
        #: Every PATCH body that reached the relay, also one whose connection then broke: (upload id, offset, body).
        self.patch_bodies: list[tuple[str, int, bytes]] = []
        self._ids = random.Random(5)

    def _answer(self, method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response | None:
        if path == "/.well-known/tetherless":
            return Response(200, [("content-type", codec.MSGPACK)], codec.encode(self.document()))
        if path == "/v1/blobs/uploads" and method == "POST":
            length = int(headers["upload-length"])
            if length > self.max_blob_bytes:
                return _problem(ErrorCode.BLOB_TOO_LARGE, 413)
            meta = dict(item.split(" ") for item in headers["upload-metadata"].split(","))
            upload_id = self._ids.randbytes(16).hex()
            self.uploads[upload_id] = Upload(
                length, base64.b64decode(meta["sha256"]), base64.b64decode(meta["capability"])
            )
            return Response(201, [("location", f"/v1/blobs/uploads/{upload_id}"), ("upload-offset", "0")], b"")
        if path.startswith("/v1/blobs/uploads/"):
            upload = self.uploads.get(path.rsplit("/", 1)[1])
            if upload is None:
                return _problem(ErrorCode.BLOB_NOT_FOUND, 404)
            if method == "HEAD":
                offset = len(upload.data) if self.head_offset is None else self.head_offset(len(upload.data))
                return self._tus(offset, upload)
            if method == "PATCH":
                self.patch_bodies.append((path.rsplit("/", 1)[1], int(headers["upload-offset"]), body or b""))
                return self._patch(upload, int(headers["upload-offset"]), body or b"", headers)
            if method == "DELETE":
                del self.uploads[path.rsplit("/", 1)[1]]
                return Response(204, [], b"")
        return None

    def _tus(self, offset: int, upload: Upload, status: int = 200) -> Response:
        headers = [("upload-offset", str(offset)), ("upload-length", str(upload.length))]
        if upload.blob_id is not None:
            headers.append(("tetherless-blob-id", upload.blob_id))
        return Response(status, headers, b"")

    def _patch(self, upload: Upload, offset: int, body: bytes, headers: dict[str, str]) -> Response:
        self.patches += 1
        if self.lose_before_patch and offset > 0:
            del upload.data[:]
        if self.fail_patch_after is not None and self.patches > self.fail_patch_after:
            raise ConnectionLostError("the relay went away mid-PATCH")
        assert headers["content-type"] == "application/offset+octet-stream"
        assert headers["upload-checksum"] == "sha256 " + base64.b64encode(hashlib.sha256(body).digest()).decode()
        if offset != len(upload.data):
            return _problem(ErrorCode.BLOB_OFFSET_MISMATCH, 409)
        self.received += len(body)
        upload.data += body
        if len(upload.data) == upload.length:
            if hashlib.sha256(upload.data).digest() != upload.digest:
                return _problem(ErrorCode.BLOB_DIGEST_MISMATCH, 409)
            upload.blob_id = self._ids.randbytes(16).hex()
            self.blobs[upload.blob_id] = upload
        answered = len(upload.data) if self.patch_answer is None else self.patch_answer(len(upload.data))
        return self._tus(answered, upload, 204)

    def document(self) -> WellKnown:
        limits = Limits(
            max_body_bytes=1 << 20,
            max_batch_envelopes=100,
            max_envelope_bytes=256 * 1024,
            max_inbox_envelopes=1000,
            default_ttl_seconds=1,
            max_ttl_seconds=1,
            max_page_envelopes=100,
            session_ttl_seconds=3600,
            challenge_ttl_seconds=60,
            max_blob_bytes=self.max_blob_bytes,
        )
        return WellKnown(relay=RELAY, relay_key=b"k" * 32, api_versions=["v1"], limits=limits)

    @asynccontextmanager
    async def stream(
        self,
        method: str,
        path: str,
        headers: object = (),
        body: bytes | None = None,
        *,
        timeout: float | None = None,
        chunk_timeout: float | None = None,
    ) -> AsyncIterator[Any]:
        named = dict(headers)  # type: ignore[call-overload]
        self.downloads += 1
        blob = self.blobs.get(path.rsplit("/", 1)[1])
        capability = named.get("tetherless-capability", "")
        given = base64.urlsafe_b64decode(capability + "=" * (-len(capability) % 4)) if capability else b""
        if blob is None or hashlib.sha256(given).digest() != blob.capability_hash:
            problem = _problem(ErrorCode.BLOB_NOT_FOUND, 404)
            yield _Body(404, problem.headers, [problem.body])
            return
        data = bytes(blob.data) if self.served is None else self.served(bytes(blob.data))
        start = int(named["range"].removeprefix("bytes=").rstrip("-")) if "range" in named else 0
        part = data[start:]
        claimed = start if self.range_start is None else self.range_start(start)
        status, extra = (
            (206, [("content-range", f"bytes {claimed}-{blob.length - 1}/{blob.length}")]) if start else (200, [])
        )
        yield _Body(status, extra, [part[i : i + 50_000] for i in range(0, len(part), 50_000)])


class Home:
    """A device's state.db, media cache and client on :class:`TusRelay`."""

    def __init__(self, root: Path, relay: TusRelay, keys: DeviceKeys) -> None:
        root.mkdir(mode=0o700, exist_ok=True)
        self.root = root
        self.store = ClientStore(LocalDB.open(root, os.urandom(32)))
        self.relay = relay
        self.keys = keys
        self.cache = blobs.MediaCache(root, self.store.db, limit_bytes=1 << 30)

    @asynccontextmanager
    async def client(self) -> AsyncIterator[RelayClient]:
        async with RelayClient.connect(URL, keys=self.keys, local_db=self.store.db) as client:
            client.api = self.api()
            yield client

    def api(self) -> RelayApi:
        async def connect() -> TusRelay:
            return self.relay

        async def no_sleep(seconds: float) -> None:
            await trio.lowlevel.checkpoint()

        return RelayApi(connect, relay_url=URL, keys=lambda: self.keys, rng=random.Random(1), sleep=no_sleep)

    @asynccontextmanager
    async def opener(self, ref: blobfmt.BlobRef) -> AsyncIterator[RelayApi]:
        yield self.api()

    async def download(self, ref: blobfmt.BlobRef, dest: Path, **options: Any) -> Path:
        return await blobs.download(ref, dest, cache=self.cache, relay=self.opener, **options)


@pytest.fixture
def relay() -> TusRelay:
    return TusRelay(_keys())


@pytest.fixture
def home(tmp_path: Path, relay: TusRelay) -> Home:
    return Home(tmp_path / "alice", relay, relay.keys)


def _file(tmp_path: Path, size: int, name: str = "report.pdf") -> Path:
    path = tmp_path / name
    path.write_bytes(random.Random(size).randbytes(size))
    return path


async def _upload(home: Home, path: Path, **options: Any) -> blobs.UploadState:
    async with home.client() as client:
        return await blobs.upload_file(client, home.store.db, path, piece_bytes=PIECE, **options)


# -- upload -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 1, 540, 65536, 300_000, 1_100_000])
async def test_a_file_round_trips_through_the_relay(tmp_path: Path, home: Home, relay: TusRelay, size: int) -> None:
    source = _file(tmp_path, size)
    state = await _upload(home, source)
    ref = state.ref()
    assert ref.check() is ref
    assert ref.size == size
    assert ref.name == "report.pdf"
    assert ref.content_type == "application/pdf"
    assert relay.received == ref.length == blobfmt.blob_length(size)  # every byte once
    assert source.read_bytes()[:64] not in bytes(relay.blobs[ref.blob_id].data) or size < 64
    written = await home.download(ref, tmp_path / "out")
    assert written == tmp_path / "out"
    assert written.read_bytes() == source.read_bytes()


async def test_the_upload_state_is_sealed_in_state_db_and_reused(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = _file(tmp_path, 200_000)
    state = await _upload(home, source)
    raw = (home.root / "state.db").read_bytes()
    assert state.file_key not in raw
    assert state.capability not in raw
    again = await _upload(home, source)  # complete: answered from the state, nothing sent
    assert again == state
    assert relay.received == state.length


async def test_an_interrupted_upload_continues_from_the_relays_offset(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = _file(tmp_path, 3_000_000)
    async with home.client() as client:
        with trio.move_on_after(1000) as scope:

            def stop_at_40_percent(phase: str, done: int, total: int) -> None:
                if phase == blobs.Phase.UPLOADING and done >= 0.4 * total:
                    scope.cancel()  # as kill -9 would, between two pieces

            await blobs.upload_file(client, home.store.db, source, piece_bytes=PIECE, progress=stop_at_40_percent)
    assert scope.cancelled_caught
    assert [u.blob_id for u in relay.uploads.values()] == [None]
    before = relay.received
    assert 0.4 * blobfmt.blob_length(3_000_000) <= before < blobfmt.blob_length(3_000_000)
    # A new process: a new client on the same state.db.
    state = await _upload(home, source)
    assert relay.received == state.length  # nothing sent twice
    assert len(relay.uploads) == 1
    out = await home.download(state.ref(), tmp_path / "out")
    assert out.read_bytes() == source.read_bytes()


async def test_a_dropped_connection_mid_patch_is_resumed_from_head(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = _file(tmp_path, 2_000_000)
    relay.fail_patch_after = 2
    with pytest.raises(blobs.MediaError, match="upload_stalled"):
        await _upload(home, source)
    relay.fail_patch_after = None
    state = await _upload(home, source)
    assert relay.received == state.length
    assert (await home.download(state.ref(), tmp_path / "out")).read_bytes() == source.read_bytes()


def _keystream_reuse(relay: TusRelay) -> list[tuple[int, int]]:
    """What a relay can see of keystream reuse: two different ciphertext bytes at one offset of uploads that share
    a header (the header holds the nonce and the key's commitment). Returns the (first, second) patch indices."""
    headers: dict[str, bytes] = {}
    for upload_id, offset, body in relay.patch_bodies:
        if offset == 0:
            headers[upload_id] = body[: blobfmt.HEADER_BYTES]
    found = []
    for i, (first_id, first_offset, first) in enumerate(relay.patch_bodies):
        for j, (second_id, second_offset, second) in enumerate(relay.patch_bodies[i + 1 :], start=i + 1):
            if headers[first_id] != headers[second_id]:
                continue
            start, end = max(first_offset, second_offset), min(first_offset + len(first), second_offset + len(second))
            if start < end and (
                first[start - first_offset : end - first_offset] != second[start - second_offset : end - second_offset]
            ):
                found.append((i, j))
    return found


async def _interrupted_upload(tmp_path: Path, home: Home, relay: TusRelay, size: int = 2_000_000) -> Path:
    """An upload whose second PATCH reached the relay but broke (the relay saw its bytes, kept none)."""
    source = _file(tmp_path, size)
    relay.fail_patch_after = 1
    with pytest.raises(blobs.MediaError, match="upload_stalled"):
        await _upload(home, source)
    relay.fail_patch_after = None
    assert len(relay.patch_bodies) > 1
    return source


def _rewrite_keeping_size_and_mtime(path: Path) -> None:
    """What ``touch -d``, an editor or ``cp -p`` can do: other content, same size, same mtime."""
    before = path.stat()
    path.write_bytes(random.Random(-1).randbytes(before.st_size))
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (before.st_size, before.st_mtime_ns)


async def test_a_file_changed_with_the_same_size_and_mtime_is_never_resumed_under_the_old_key(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = await _interrupted_upload(tmp_path, home, relay)
    [old] = blobs.unfinished_uploads(home.store.db)
    _rewrite_keeping_size_and_mtime(source)
    phases: set[str] = set()
    try:
        state = await _upload(home, source, progress=lambda phase, done, total: phases.add(phase))
    finally:  # whatever else happens: the relay never got two versions of a chunk under one key
        assert _keystream_reuse(relay) == []
    assert blobs.Phase.CHECKING in phases  # the resume re-read the file before sending anything
    assert (state.file_key, state.nonce, state.capability) != (old.file_key, old.nonce, old.capability)
    assert old.upload_id not in relay.uploads  # terminated on the relay
    assert (await home.download(state.ref(), tmp_path / "out")).read_bytes() == source.read_bytes()


async def test_an_unchanged_file_is_checked_then_resumed_without_sending_a_byte_twice(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = await _interrupted_upload(tmp_path, home, relay)
    [old] = blobs.unfinished_uploads(home.store.db)
    state = await _upload(home, source)
    assert state.file_key == old.file_key
    assert state.upload_id == old.upload_id
    assert _keystream_reuse(relay) == []  # the same bytes again at the broken PATCH's offset: no reuse
    assert relay.received == state.length


async def test_a_file_of_another_size_starts_a_fresh_upload(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = await _interrupted_upload(tmp_path, home, relay)
    [old] = blobs.unfinished_uploads(home.store.db)
    source.write_bytes(b"other content" * 1000)
    state = await _upload(home, source)
    assert state.file_key != old.file_key
    assert list(relay.uploads) == [state.upload_id]  # the old one terminated on the relay
    assert (await home.download(state.ref(), tmp_path / "out")).read_bytes() == source.read_bytes()


async def test_resume_uploads_drops_a_changed_file_instead_of_sending_its_new_content(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = _file(tmp_path, 2_000_000)
    relay.fail_patch_after = 0  # send_file's one 8 MiB piece reaches the relay, then the connection breaks
    async with home.client() as client:
        with pytest.raises(blobs.MediaError):
            await blobs.send_file(client, home.store, _keys("bob").address, source)
    relay.fail_patch_after = None
    _rewrite_keeping_size_and_mtime(source)
    dropped: list[tuple[str, str]] = []
    async with home.client() as client:
        try:
            queued = await blobs.resume_uploads(
                client, home.store, dropped=lambda state, exc: dropped.append((state.path, exc.code))
            )
        finally:
            assert _keystream_reuse(relay) == []
    assert queued == []
    assert dropped == [(str(source), "file_changed")]
    assert blobs.unfinished_uploads(home.store.db) == []
    assert relay.uploads == {}


async def test_an_unreadable_or_missing_file_is_one_clear_error(tmp_path: Path, home: Home) -> None:
    with pytest.raises(blobs.MediaError, match=r"file_unreadable: cannot read .*missing"):
        await _upload(home, tmp_path / "missing")
    with pytest.raises(blobs.MediaError, match=r"file_unreadable: .* is not a regular file"):
        await _upload(home, tmp_path)


async def test_a_content_type_the_receiver_would_refuse_is_refused_here(tmp_path: Path, home: Home) -> None:
    with pytest.raises(blobs.MediaError, match="invalid_content_type"):
        await _upload(home, _file(tmp_path, 10), content_type="text/plain\nX-Evil: 1")


async def test_a_file_above_the_relays_limit_is_refused_before_encrypting(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    relay.max_blob_bytes = 100_000
    seen: list[str] = []
    with pytest.raises(blobs.MediaError, match="file_too_large"):
        await _upload(home, _file(tmp_path, 200_000), progress=lambda phase, *_: seen.append(phase))
    assert seen == []
    assert relay.uploads == {}


async def test_a_relay_lying_about_the_offset_is_refused(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = _file(tmp_path, 1_000_000)
    relay.patch_answer = lambda offset: offset + 10  # claims bytes it never got
    with pytest.raises(blobs.MediaError) as caught:
        await _upload(home, source)
    assert "offset" in str(caught.value)
    relay.patch_answer = None
    relay.head_offset = lambda offset: 10**12  # past the end
    with pytest.raises(blobs.MediaError, match=r"relay_misbehaved: .*Upload-Offset"):
        await _upload(home, source)


async def test_a_relay_that_keeps_losing_bytes_stops_the_upload(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = _file(tmp_path, 1_000_000)
    relay.lose_before_patch = True  # every PATCH after the first piece finds the upload empty again (409)
    with pytest.raises(blobs.MediaError, match=r"relay_misbehaved: .*keeps losing"):
        await _upload(home, source)
    assert relay.received <= (blobs.MAX_SENT_FACTOR + 1) * blobfmt.blob_length(1_000_000) + PIECE


# -- download ---------------------------------------------------------------------------------------------------


async def _sent(tmp_path: Path, home: Home, size: int = 400_000) -> tuple[Path, blobfmt.BlobRef]:
    source = _file(tmp_path, size)
    return source, (await _upload(home, source)).ref()


def _flip(position: int) -> Callable[[bytes], bytes]:
    return lambda data: data[:position] + bytes([data[position] ^ 1]) + data[position + 1 :]


@pytest.mark.parametrize(
    ("served", "code"),
    [
        (_flip(200), "blob_corrupt"),  # a changed byte in chunk 0
        (_flip(10), "blob_key_mismatch"),  # the header's nonce: the commitment no longer matches the key
        (_flip(40), "blob_key_mismatch"),  # the commitment itself
        (lambda data: data[: len(data) - 100], "download_incomplete|blob_corrupt"),  # truncated
        (lambda data: data + b"more", "blob_corrupt"),  # longer
    ],
)
async def test_a_relay_serving_wrong_bytes_is_refused_and_nothing_is_written(
    tmp_path: Path, home: Home, relay: TusRelay, served: Callable[[bytes], bytes], code: str
) -> None:
    _, ref = await _sent(tmp_path, home)
    relay.served = served
    with pytest.raises(blobs.MediaError, match=code):
        await home.download(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()
    assert [name for name in os.listdir(tmp_path) if name.startswith(".out")] == []
    assert not home.cache.has(ref.blob_id)


async def test_each_chunk_is_checked_as_it_arrives(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    _, ref = await _sent(tmp_path, home)
    relay.served = _flip(blobfmt.HEADER_BYTES + 3 * blobfmt.CIPHER_CHUNK_BYTES + 7)  # chunk 3
    with pytest.raises(blobs.MediaError, match=r"blob_corrupt: .*chunk 3"):
        await home.download(ref, tmp_path / "out")
    # Only what verified is kept (for the next attempt to continue after it); chunk 3 and later never landed.
    partial = home.cache.path(ref.blob_id, partial=True)
    assert partial.stat().st_size == blobfmt.HEADER_BYTES + 3 * blobfmt.CIPHER_CHUNK_BYTES
    relay.served = None
    assert (await home.download(ref, tmp_path / "out")).exists()


async def test_another_blobs_bytes_are_refused(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    _, ref = await _sent(tmp_path, home)
    other = _file(tmp_path, 400_000, "other.bin")
    other.write_bytes(b"x" * 400_000)
    other_ref = (await _upload(home, other)).ref()
    relay.served = lambda data: bytes(relay.blobs[other_ref.blob_id].data)  # same length, another key
    with pytest.raises(blobs.MediaError, match="blob_key_mismatch"):
        await home.download(ref, tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_the_digest_is_checked_even_when_every_chunk_opens(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    _, ref = await _sent(tmp_path, home)
    wrong = msgspec.structs.replace(ref, digest=bytes(32))  # the sender's message says another digest
    with pytest.raises(blobs.MediaError, match=r"blob_corrupt: .*SHA-256"):
        await home.download(wrong, tmp_path / "out")
    assert not (tmp_path / "out").exists()


async def test_no_plaintext_is_made_before_the_downloaded_digest_is_checked(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    _, ref = await _sent(tmp_path, home)
    phases: list[str] = []
    wrong = msgspec.structs.replace(ref, digest=bytes(32))
    with pytest.raises(blobs.MediaError, match=r"blob_corrupt: .*SHA-256"):
        await home.download(wrong, tmp_path / "out", progress=lambda phase, *_: phases.append(phase))
    assert blobs.Phase.DOWNLOADING in phases
    assert blobs.Phase.DECRYPTING not in phases
    assert not home.cache.path(ref.blob_id).exists()
    assert not home.cache.path(ref.blob_id, partial=True).exists()


async def test_a_cached_blob_is_checked_against_the_digest_of_the_message_that_asks(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    _, ref = await _sent(tmp_path, home)
    await home.download(ref, tmp_path / "first")
    assert home.cache.has(ref.blob_id)
    wrong = msgspec.structs.replace(ref, digest=bytes(32))  # another message naming the same blob id
    with pytest.raises(blobs.MediaError, match=r"blob_corrupt: .*SHA-256"):
        await home.download(wrong, tmp_path / "second")
    assert not (tmp_path / "second").exists()


async def test_a_wrong_content_range_is_refused(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    _, ref = await _sent(tmp_path, home)
    partial = home.cache.path(ref.blob_id, partial=True)
    home.cache.ensure_root()
    partial.write_bytes(bytes(relay.blobs[ref.blob_id].data[: 3 * blobfmt.CIPHER_CHUNK_BYTES]))
    relay.range_start = lambda start: start - 1000
    with pytest.raises(blobs.MediaError, match="relay_misbehaved"):
        await home.download(ref, tmp_path / "out")


async def test_a_refused_capability_is_the_relays_404(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    _, ref = await _sent(tmp_path, home)
    with pytest.raises(RemoteError) as caught:
        await home.download(msgspec.structs.replace(ref, capability=bytes(32)), tmp_path / "out")
    assert caught.value.code is ErrorCode.BLOB_NOT_FOUND


async def test_an_interrupted_download_resumes_from_the_partial_ciphertext(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source, ref = await _sent(tmp_path, home, 1_000_000)
    home.cache.ensure_root()
    half = ref.length // 2
    # What a killed download leaves: verified chunks and part of the next one.
    home.cache.path(ref.blob_id, partial=True).write_bytes(bytes(relay.blobs[ref.blob_id].data[:half]))
    asked: list[int] = []
    relay.range_start = lambda start: asked.append(start) or start  # type: ignore[func-returns-value]
    out = await home.download(ref, tmp_path / "out")
    assert out.read_bytes() == source.read_bytes()
    assert asked == [
        blobfmt.HEADER_BYTES + (half - blobfmt.HEADER_BYTES) // blobfmt.CIPHER_CHUNK_BYTES * blobfmt.CIPHER_CHUNK_BYTES
    ]


async def test_a_download_killed_after_its_last_byte_asks_for_the_last_chunk_only(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source, ref = await _sent(tmp_path, home, 300_000)
    home.cache.ensure_root()
    home.cache.path(ref.blob_id, partial=True).write_bytes(bytes(relay.blobs[ref.blob_id].data))
    asked: list[int] = []
    relay.range_start = lambda start: asked.append(start) or start  # type: ignore[func-returns-value]
    out = await home.download(ref, tmp_path / "out")
    assert out.read_bytes() == source.read_bytes()
    chunks = blobfmt.chunk_count(blobfmt.padded_size(300_000))
    assert asked == [blobfmt.HEADER_BYTES + (chunks - 1) * blobfmt.CIPHER_CHUNK_BYTES]  # its end was never checked


async def test_cached_media_opens_without_the_relay(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source, ref = await _sent(tmp_path, home)
    await home.download(ref, tmp_path / "first")
    downloads = relay.downloads

    @asynccontextmanager
    async def unreachable(_: blobfmt.BlobRef) -> AsyncIterator[RelayApi]:
        raise ConnectionLostError("the relay is down")
        yield  # pragma: no cover

    out = await blobs.download(ref, tmp_path / "second", cache=home.cache, relay=unreachable)
    assert out.read_bytes() == source.read_bytes()
    assert relay.downloads == downloads
    cached = home.cache.path(ref.blob_id).read_bytes()
    assert source.read_bytes()[:1000] not in cached  # ciphertext only


async def test_a_changed_cache_file_is_refused_then_fetched_again(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source, ref = await _sent(tmp_path, home)
    await home.download(ref, tmp_path / "first")
    cached = home.cache.path(ref.blob_id)
    cached.write_bytes(_flip(1000)(cached.read_bytes()))
    with pytest.raises(blobs.MediaError, match="blob_corrupt"):
        await home.download(ref, tmp_path / "second")
    assert not (tmp_path / "second").exists()
    assert (await home.download(ref, tmp_path / "second")).read_bytes() == source.read_bytes()


async def test_the_cache_evicts_the_least_recently_used(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    refs = []
    for n in range(3):
        refs.append((await _upload(home, _file(tmp_path, 100_000 + n, f"f{n}"))).ref())
    home.cache.limit_bytes = 2 * refs[0].length + 10
    await home.download(refs[0], tmp_path / "o0")
    await home.download(refs[1], tmp_path / "o1")
    await home.download(refs[0], tmp_path / "o0", force=True)  # 0 used again: 1 is the oldest now
    await home.download(refs[2], tmp_path / "o2")
    assert [home.cache.has(r.blob_id) for r in refs] == [True, False, True]
    assert not home.cache.path(refs[1].blob_id).exists()


async def test_the_destination_is_never_overwritten_without_force(tmp_path: Path, home: Home) -> None:
    source, ref = await _sent(tmp_path, home)
    (tmp_path / "out").write_bytes(b"mine")
    with pytest.raises(blobs.MediaError, match="destination_exists"):
        await home.download(ref, tmp_path / "out")
    assert (tmp_path / "out").read_bytes() == b"mine"
    await home.download(ref, tmp_path / "out", force=True)
    assert (tmp_path / "out").read_bytes() == source.read_bytes()


async def test_a_directory_destination_gets_the_safe_name(tmp_path: Path, home: Home) -> None:
    source = _file(tmp_path, 1000)
    state = await _upload(home, source, name="../../etc/passwd")
    ref = state.ref()
    assert "/" not in ref.name
    target = tmp_path / "downloads"
    target.mkdir()
    out = await home.download(ref, target)
    assert out.parent == target
    # A sender's name that is not a plain file name is refused outright.
    evil = msgspec.structs.replace(ref, name="../escape")
    with pytest.raises(blobs.MediaError, match="not_a_file_message"):
        await home.download(evil, target)


async def test_a_destination_with_a_trailing_slash_must_be_a_directory(tmp_path: Path, home: Home) -> None:
    """``-o out/`` names a directory: when there is none, say so, rather than writing a file called ``out``."""
    _, ref = await _sent(tmp_path, home)
    with pytest.raises(blobs.MediaError, match=r"destination_unwritable: .*missing/ is not a directory"):
        await home.download(ref, f"{tmp_path / 'missing'}/")
    assert not (tmp_path / "missing").exists()
    (tmp_path / "there").mkdir()
    out = await home.download(ref, f"{tmp_path / 'there'}/")
    assert out.parent == tmp_path / "there"


# -- the file message -------------------------------------------------------------------------------------------


async def test_send_file_queues_one_file_message_and_forgets_the_upload(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = _file(tmp_path, 100_000)
    bob = _keys("bob").address
    async with home.client() as client:
        entry = await blobs.send_file(client, home.store, bob, source)
    assert entry.content_type == FILE_CONTENT_TYPE
    assert entry.recipient == bob
    ref = msgspec.msgpack.decode(entry.body, type=blobfmt.BlobRef)
    assert ref.check() is ref
    assert blobs.unfinished_uploads(home.store.db) == []


async def test_an_interrupted_send_to_someone_else_is_queued_too(tmp_path: Path, home: Home, relay: TusRelay) -> None:
    source = _file(tmp_path, 100_000)
    bob, cat = _keys("bob").address, _keys("cat").address
    relay.fail_patch_after = 0
    async with home.client() as client:
        with pytest.raises(blobs.MediaError, match="upload_stalled"):
            await blobs.send_file(client, home.store, bob, source)
    relay.fail_patch_after = None
    async with home.client() as client:
        entry = await blobs.send_file(client, home.store, cat, source)
    assert entry.recipient == cat
    queued = home.store.outbox(("queued",))
    assert [e.recipient for e in queued] == [bob, cat]
    assert queued[0].body == queued[1].body  # one blob, two messages
    assert blobs.unfinished_uploads(home.store.db) == []


async def test_resume_uploads_finishes_a_killed_send_and_queues_its_message(
    tmp_path: Path, home: Home, relay: TusRelay
) -> None:
    source = _file(tmp_path, 2_000_000)
    bob = _keys("bob").address
    relay.fail_patch_after = 0
    async with home.client() as client:
        with pytest.raises(blobs.MediaError):
            await blobs.send_file(client, home.store, bob, source)
    relay.fail_patch_after = None
    assert [s.recipient for s in blobs.unfinished_uploads(home.store.db)] == [bob]
    async with home.client() as client:
        queued = await blobs.resume_uploads(client, home.store)
    assert [e.recipient for e in queued] == [bob]
    assert blobs.unfinished_uploads(home.store.db) == []
    assert relay.received == blobfmt.blob_length(2_000_000)


def test_relay_urls_come_from_the_environment_and_names_stay_names() -> None:
    keys = _keys()
    env = {blobs.RELAY_URLS_ENV: "b.test=http://127.0.0.1:9000/, bad, c.test=http://127.0.0.1:9001"}
    assert blobs.relay_url_for("B.test", keys, env) == "http://127.0.0.1:9000"
    assert blobs.relay_url_for("d.test", keys, env) == "https://d.test"
    assert blobs.relay_url_for(RELAY, keys, env) == keys.relay_url
    with pytest.raises(TetherlessError, match=r"invalid_field: not a relay name"):
        blobs.relay_url_for("evil.test/path?x", keys, env)


def _resolver(answers: dict[str, list[str]]) -> tuple[blobs.Resolve, list[tuple[str, int]]]:
    """A resolver answering from ``answers`` (an unknown name does not resolve), and the lookups it was asked."""
    asked: list[tuple[str, int]] = []

    async def resolve(host: str, port: int) -> list[str]:
        asked.append((host, port))
        await trio.lowlevel.checkpoint()
        if host not in answers:
            raise OSError(-2, "Name or service not known")
        return answers[host]

    return resolve, asked


@pytest.mark.parametrize(
    "relay",
    [
        "127.0.0.1:8443",
        "[::1]",
        "[::1]:8443",
        "10.0.0.1",
        "8.8.8.8",
        "2130706433",
        "127.1",
        "0x7f.1",
        "[::ffff:7f00:1]",
    ],
)
async def test_a_file_message_naming_an_ip_address_is_refused_without_a_lookup(relay: str) -> None:
    resolve, asked = _resolver({})
    with pytest.raises(blobs.MediaError, match=r"^blob_relay_refused: .* is an IP address") as refused:
        await blobs.check_blob_relay(relay, _keys(), environ={}, resolve=resolve)
    assert blobs.RELAY_URLS_ENV in str(refused.value)  # what the user can do about it
    assert asked == []


@pytest.mark.parametrize(
    "addresses",
    [
        ["127.0.0.1"],
        ["::1"],
        ["10.1.2.3"],
        ["192.168.1.20"],
        ["100.64.0.1"],  # shared (carrier-grade NAT)
        ["169.254.169.254"],  # link-local: the cloud metadata address
        ["fe80::1%eth0"],
        ["224.0.0.251"],
        ["::ffff:127.0.0.1"],  # IPv4-mapped loopback
        ["64:ff9b::a00:1"],  # NAT64 of 10.0.0.1
        ["93.184.216.34", "10.0.0.1"],  # one public answer does not excuse another
        ["0.0.0.0"],
    ],
)
async def test_a_file_message_naming_a_host_that_resolves_inwards_is_refused(addresses: list[str]) -> None:
    resolve, asked = _resolver({"files.evil.example": addresses})
    with pytest.raises(blobs.MediaError, match=r"^blob_relay_refused: .* resolves to the non-public address"):
        await blobs.check_blob_relay("files.evil.example:8443", _keys(), environ={}, resolve=resolve)
    assert asked == [("files.evil.example", 8443)]


async def test_a_public_relay_the_home_relay_and_mapped_names_are_allowed() -> None:
    keys = _keys()
    resolve, asked = _resolver({"b.example": ["93.184.216.34", "2606:2800:220:1::1"]})
    assert await blobs.check_blob_relay("B.example", keys, environ={}, resolve=resolve) == "https://b.example"
    assert asked == [("b.example", 443)]
    asked.clear()
    # The home relay and names the user mapped are the user's own configuration: no lookup, no refusal.
    assert await blobs.check_blob_relay(RELAY, keys, environ={}, resolve=resolve) == keys.relay_url
    env = {blobs.RELAY_URLS_ENV: "a.test=http://127.0.0.1:9000,127.0.0.1:9001=http://127.0.0.1:9001"}
    assert await blobs.check_blob_relay("a.test", keys, environ=env, resolve=resolve) == "http://127.0.0.1:9000"
    assert await blobs.check_blob_relay("127.0.0.1:9001", keys, environ=env, resolve=resolve) == (
        "http://127.0.0.1:9001"
    )
    assert asked == []


async def test_a_relay_name_that_does_not_resolve_is_a_connection_error() -> None:
    resolve, _ = _resolver({"empty.example": []})
    with pytest.raises(ConnectError, match=r"cannot resolve gone\.example"):
        await blobs.check_blob_relay("gone.example", _keys(), environ={}, resolve=resolve)
    with pytest.raises(ConnectError, match=r"cannot resolve empty\.example: no address"):
        await blobs.check_blob_relay("empty.example", _keys(), environ={}, resolve=resolve)
    with pytest.raises(TetherlessError, match="invalid_field"):
        await blobs.check_blob_relay("user@evil.example", _keys(), environ={}, resolve=resolve)


async def test_a_download_from_a_refused_relay_connects_nowhere_and_writes_nothing(
    tmp_path: Path, home: Home, relay: TusRelay, monkeypatch: pytest.MonkeyPatch
) -> None:
    _, ref = await _sent(tmp_path, home)
    forged = msgspec.structs.replace(ref, relay="intranet.example")
    monkeypatch.delenv(blobs.RELAY_URLS_ENV, raising=False)
    resolve, asked = _resolver({"intranet.example": ["192.168.0.10"]})
    connected: list[str] = []

    def connect(url: str, **options: Any) -> None:
        connected.append(url)
        raise AssertionError(f"connected to {url}")

    monkeypatch.setattr(RelayClient, "connect", connect)
    downloads = relay.downloads
    with pytest.raises(blobs.MediaError, match="blob_relay_refused"):
        await blobs.download(
            forged,
            tmp_path / "out",
            cache=home.cache,
            relay=lambda r: blobs.blob_relay(r, home.keys, resolve=resolve),
        )
    assert asked == [("intranet.example", 443)]
    assert connected == []
    assert relay.downloads == downloads
    assert not (tmp_path / "out").exists()
    assert not home.cache.path(ref.blob_id, partial=True).exists()


@pytest.mark.parametrize(
    ("location", "accepted"),
    [
        ("/v1/blobs/uploads/" + "a" * 32, True),
        ("http://relay.test/v1/blobs/uploads/" + "0" * 32, True),  # absolute: tus allows both
        ("/v1/blobs/uploads/" + "A" * 32, False),
        ("/v1/blobs/uploads/../../v1/inbox", False),
        ("/v1/blobs/uploads/" + "a" * 31, False),
        ("/v1/other/" + "a" * 32, False),
        (None, False),
    ],
)
async def test_an_upload_location_is_an_upload_id_or_refused(
    tmp_path: Path, home: Home, relay: TusRelay, location: str | None, accepted: bool
) -> None:
    def answer(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response | None:
        if method == "POST":
            return Response(201, [("upload-offset", "0"), *([("location", location)] if location else [])], b"")
        return None

    relay.answer = answer
    api = home.api()
    if accepted:
        assert location is not None
        created = await api.blob_create_upload(100, sha256=bytes(32), capability_hash=bytes(32))
        assert created.upload_id == location.rsplit("/", 1)[1]
    else:
        with pytest.raises(TetherlessError, match=r"invalid_field: .*Location"):
            await api.blob_create_upload(100, sha256=bytes(32), capability_hash=bytes(32))


@pytest.mark.parametrize(("offset", "blob_id"), [("-1", None), ("101", None), ("x", None), ("100", "../etc")])
async def test_an_impossible_tus_answer_is_refused(
    home: Home, relay: TusRelay, offset: str, blob_id: str | None
) -> None:
    def answer(method: str, path: str, body: bytes | None, headers: dict[str, str]) -> Response | None:
        extra = [("tetherless-blob-id", blob_id)] if blob_id else []
        return Response(204, [("upload-offset", offset), *extra], b"")

    relay.answer = answer
    with pytest.raises(TetherlessError, match="invalid_field"):
        await home.api().blob_upload_offset("a" * 32, 100)


async def test_blob_get_connects_to_the_addresses_it_checked_not_to_a_second_lookup(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """DNS rebinding: the name answered a public address when it was checked; a second lookup at connection time
    could answer 127.0.0.1. The connection must use the checked addresses."""
    seen: dict[str, object] = {}

    @asynccontextmanager
    async def connect(url: str, **options: Any) -> AsyncIterator[Any]:
        seen["url"], seen["addresses"] = url, options.get("addresses")

        class Client:
            api = None

        yield Client()

    monkeypatch.setattr(RelayClient, "connect", connect)
    resolve, _ = _resolver({"b.example": ["93.184.216.34"]})
    ref = blobfmt.BlobRef(
        relay="b.example",
        blob_id="0" * 32,
        digest=bytes(32),
        key=bytes(32),
        length=blobfmt.blob_length(1),
        capability=bytes(32),
        name="a.txt",
        content_type="text/plain",
        size=1,
    )
    async with blobs.blob_relay(ref, _keys(), resolve=resolve):
        pass
    assert seen == {"url": "https://b.example", "addresses": ("93.184.216.34",)}


async def test_a_connection_to_given_addresses_never_resolves_the_urls_host(tmp_path: Path) -> None:
    """The transport half: ``addresses`` win over the URL's host (which cannot resolve here), TLS/SNI aside."""
    from protocol.client.http import start_connection
    from tests.relay_process import RelayProcess

    process = RelayProcess(tmp_path / "relay")
    process.start()
    try:
        url = f"http://never-resolves.invalid:{process.port}"
        async with trio.open_nursery() as nursery:
            conn = await start_connection(nursery, url, addresses=["127.0.0.1"])
            try:
                assert (await conn.request("GET", "/livez", b"", [])).status == 200
            finally:
                await conn.aclose()
            with pytest.raises(ConnectError):
                await start_connection(nursery, url)
    finally:
        process.stop()
