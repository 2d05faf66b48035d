"""Files end to end (issue 15 point 5): real relay processes, the real CLI (``send --file``, ``sync --json``, ``blob
get``), SIGKILL of the uploading and downloading clients, the media cache with the relay stopped, a recipient on
another relay, and a plaintext canary that never reaches a relay file.

Sizes: 24 MiB here (three 8 MiB upload pieces), and the RSS test's round trips of 32 MiB and 256 MiB;
``TETHERLESS_MEDIA_BIG=1`` makes those 256 MiB and 2 GiB. The SDK's refusals of a lying relay, one by one:
tests/protocol/client/test_blobs.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import msgspec
import pytest

from protocol.client import blobs, outbox
from protocol.client.home import open_store
from protocol.client.keystore import Keystore
from protocol.client.sdk import RelayClient
from protocol.errors import ErrorCode, RemoteError
from protocol.payload import FILE_CONTENT_TYPE
from tests.e2e.http11 import Http11
from tests.e2e.test_cli_errors import cli, init, one_line_error
from tests.e2e.test_equal_devices import ROOT, ok
from tests.e2e.test_federation import FAST, mesh
from tests.relay_process import RelayProcess

MiB = 1024 * 1024
SIZE = 24 * MiB
BIG = os.environ.get("TETHERLESS_MEDIA_BIG") == "1"
CANARY = b"TETHERLESS-PLAINTEXT-CANARY-7f3a"


def make_file(path: Path, size: int) -> str:
    """A file of ``size`` pseudo-random bytes with the canary every MiB; returns its SHA-256 (hex)."""
    hasher = hashlib.sha256()
    block = hashlib.sha256(path.name.encode()).digest() * (MiB // 32)
    with path.open("wb") as f:
        written = 0
        while written < size:
            piece = (CANARY + block[len(CANARY) :])[: size - written]
            f.write(piece)
            hasher.update(piece)
            written += len(piece)
            block = hashlib.sha256(block[:64]).digest() * (MiB // 32)
    return hasher.hexdigest()


def sha256_of(path: Path) -> str:
    hasher = hashlib.sha256()
    with path.open("rb") as f:
        while data := f.read(MiB):
            hasher.update(data)
    return hasher.hexdigest()


def file_messages(home: Path, *args: str) -> list[dict[str, object]]:
    """The ``file`` objects of the messages ``sync --json`` prints."""
    lines = ok(cli(home, "sync", "--json", "--timeout", "20", *args)).splitlines()
    records = [json.loads(line) for line in lines if line.startswith("{")]
    return [r["file"] for r in records if "file" in r]


def metric(relay: RelayProcess, name: str) -> float:
    text = Http11(relay.url).get("/metrics").body.decode()
    return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines() if line.startswith(name))


def spawn(home: Path, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    return subprocess.Popen(
        [sys.executable, "-m", "tetherless_cli", "--home", str(home), *args],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )


def wait_for(relay: RelayProcess, name: str, at_least: float, process: subprocess.Popen[str]) -> None:
    """Until the relay's counter ``name`` reaches ``at_least`` while ``process`` still runs (2 minutes at most)."""
    deadline = time.monotonic() + 120
    while metric(relay, name) < at_least:
        assert process.poll() is None, process.communicate()
        assert time.monotonic() < deadline
        time.sleep(0.02)


def sigkill(process: subprocess.Popen[str]) -> None:
    """kill -9, and close the pipes."""
    process.send_signal(signal.SIGKILL)
    process.communicate()


def peak_rss_kib(pid: int) -> int:
    """VmHWM of a live process (peak resident set), in KiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    raise AssertionError("no VmHWM")


@pytest.fixture
def pair(relay: RelayProcess, tmp_path: Path) -> tuple[Path, Path, str]:
    alice, bob = tmp_path / "alice", tmp_path / "bob"
    bob_address = init(relay.url, bob)
    init(relay.url, alice)
    return alice, bob, bob_address


def relay_files(relay: RelayProcess) -> Iterator[Path]:
    for path in relay.data_dir.rglob("*"):
        if path.is_file():
            yield path


def contains(path: Path, needle: bytes) -> bool:
    with path.open("rb") as f:
        tail = b""
        while data := f.read(MiB):
            if needle in tail + data:
                return True
            tail = data[-len(needle) :]
    return False


def test_a_file_sent_by_one_device_is_fetched_and_decrypted_by_another(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    alice, bob, bob_address = pair
    source = tmp_path / "scan.pdf"
    digest = make_file(source, SIZE)

    sent = ok(cli(alice, "send", bob_address, "--file", str(source)))
    message_id = sent.strip()
    assert len(message_id) == 26, sent  # the message id: delivered

    (file,) = file_messages(bob)
    assert file == {"name": "scan.pdf", "size": SIZE, "content_type": "application/pdf", "ref": message_id}
    out = tmp_path / "received.pdf"
    got = ok(cli(bob, "blob", "get", message_id, "-o", str(out)))
    assert got.strip() == str(out)
    assert sha256_of(out) == digest

    # Not over again: the relay refuses nothing, the destination is kept without --force.
    one_line_error(cli(bob, "blob", "get", message_id, "-o", str(out)), 1)
    assert "destination_exists" in cli(bob, "blob", "get", message_id, "-o", str(out)).stderr
    history = [json.loads(line) for line in ok(cli(bob, "history", "--json")).splitlines()]
    assert [h["file"]["ref"] for h in history if "file" in h] == [message_id]
    assert all("body_b64" not in h for h in history if "file" in h)  # never the key

    # The relay never held the plaintext: no file under its data directory contains the canary.
    assert [p for p in relay_files(relay) if contains(p, CANARY)] == []
    assert metric(relay, "relay_blob_received_bytes_total") < 1.2 * SIZE

    # The medic's case: the relay is down, the cached media opens anyway.
    relay.stop()
    offline = tmp_path / "offline.pdf"
    ok(cli(bob, "blob", "get", message_id, "-o", str(offline)))
    assert sha256_of(offline) == digest
    relay.start()


def fetched_digest(home: Path, ref: object, out: Path) -> str:
    """``blob get REF -o OUT`` succeeds; the SHA-256 of what it wrote."""
    ok(cli(home, "blob", "get", str(ref), "-o", str(out)))
    return sha256_of(out)


@pytest.mark.parametrize("resumed_by", ["send", "sync"])
def test_a_killed_upload_resumes_and_sends_less_than_1_2_times_the_file(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path, resumed_by: str
) -> None:
    """The uploading client is SIGKILLed at 40 %; the next ``send --file`` of the same file, or ``sync`` (which also
    queues the file message), continues from the relay's offset."""
    alice, bob, bob_address = pair
    source = tmp_path / "video.mp4"
    digest = make_file(source, SIZE)
    uploading = spawn(alice, "send", bob_address, "--file", str(source))
    wait_for(relay, "relay_blob_upload_bytes_total", 0.4 * SIZE, uploading)
    sigkill(uploading)
    before = metric(relay, "relay_blob_upload_bytes_total")
    assert 0.4 * SIZE <= before < SIZE

    if resumed_by == "send":
        ok(cli(alice, "send", bob_address, "--file", str(source)))
    else:
        ok(cli(alice, "sync", "--timeout", "20"))
    assert metric(relay, "relay_blob_received_bytes_total") < 1.2 * SIZE
    (file,) = file_messages(bob)
    assert fetched_digest(bob, file["ref"], tmp_path / "video.out") == digest


def test_a_relay_killed_mid_upload_keeps_every_acknowledged_piece(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """SIGKILL of the relay while a PATCH streams: every piece it answered 204 is durable (file fsync'd, offset
    committed, then the answer), so after a restart the client continues from there instead of starting over;
    the interrupted piece costs nothing but itself, and the file arrives whole."""
    alice, bob, bob_address = pair
    source = tmp_path / "theatre.mp4"
    digest = make_file(source, SIZE)
    uploading = spawn(alice, "send", bob_address, "--file", str(source))
    wait_for(relay, "relay_blob_upload_bytes_total", 0.4 * SIZE, uploading)
    acknowledged = metric(relay, "relay_blob_upload_bytes_total")
    relay.kill()
    out, err = uploading.communicate(timeout=120)
    assert uploading.returncode == 0, (out, err)  # the client waits: "queued (… the upload continues …)"
    assert "queued" in out, out
    assert "Traceback" not in err, err
    relay.start()
    ok(cli(alice, "sync", "--timeout", "20"))
    resent = metric(relay, "relay_blob_received_bytes_total")  # the restarted relay's counters start at 0
    assert resent <= SIZE - acknowledged + 8 * MiB  # from the last acknowledged piece, not from the start
    (file,) = file_messages(bob)
    assert fetched_digest(bob, file["ref"], tmp_path / "theatre.out") == digest


def test_a_killed_download_resumes(relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path) -> None:
    alice, bob, bob_address = pair
    source = tmp_path / "x-ray.png"
    digest = make_file(source, SIZE)
    ok(cli(alice, "send", bob_address, "--file", str(source)))
    (file,) = file_messages(bob)
    out = tmp_path / "x-ray.out"
    downloading = spawn(bob, "blob", "get", str(file["ref"]), "-o", str(out))
    wait_for(relay, "relay_blob_download_bytes_total", 0.4 * SIZE, downloading)
    sigkill(downloading)
    partial = [p for p in (bob / "media").iterdir() if p.name.endswith(".part")]
    assert len(partial) == 1
    assert partial[0].stat().st_size > 0
    assert not out.exists()  # no plaintext before the whole blob verified
    first = metric(relay, "relay_blob_download_bytes_total")
    assert fetched_digest(bob, file["ref"], out) == digest
    assert metric(relay, "relay_blob_download_bytes_total") - first < SIZE  # continued, not started over


def test_a_recipient_on_another_relay_downloads_from_the_blobs_relay(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"], env=FAST) as m:
        ann, ben = tmp_path / "ann", tmp_path / "ben"
        ben_address = init(m["b.test"].url, ben)
        init(m["a.test"].url, ann)
        source = tmp_path / "plan.bin"
        digest = make_file(source, 4 * MiB)
        ok(cli(ann, "send", ben_address, "--file", str(source)))
        deadline = time.monotonic() + 60
        files: list[dict[str, object]] = []
        while not files:
            files = file_messages(ben)
            assert time.monotonic() < deadline
        out = tmp_path / "plan.out"
        urls = {"TETHERLESS_RELAY_URLS": f"a.test={m['a.test'].url}"}
        got = subprocess.run(
            [
                sys.executable,
                "-m",
                "tetherless_cli",
                "--home",
                str(ben),
                "blob",
                "get",
                str(files[0]["ref"]),
                "-o",
                str(out),
            ],
            capture_output=True,
            text=True,
            cwd=ROOT,
            stdin=subprocess.DEVNULL,
            env={**os.environ, **urls},
            timeout=120,
        )
        assert got.returncode == 0, got.stderr
        assert sha256_of(out) == digest
        assert metric(m["a.test"], "relay_blob_download_bytes_total") >= 4 * MiB  # straight from a.test
        assert metric(m["b.test"], "relay_blob_download_bytes_total") == 0
        assert [p for name in ("a.test", "b.test") for p in relay_files(m[name]) if contains(p, CANARY)] == []


def _peak_while_running(process: subprocess.Popen[str]) -> int:
    """The process's peak RSS (KiB), read until it exits; the command must succeed."""
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, peak_rss_kib(process.pid))
        except (FileNotFoundError, ProcessLookupError, AssertionError):
            break  # gone between poll() and the read: the last reading stands
        time.sleep(0.02)
    out, err = process.communicate()
    assert process.returncode == 0, (out, err)
    return peak


SIZES = (256 * MiB, 2048 * MiB) if BIG else (32 * MiB, 256 * MiB)  # the acceptance's 256 MiB runs in CI


def test_memory_does_not_grow_with_the_file_size(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """Peak RSS of the sending and receiving CLI and of the relay, for two file sizes: under 200 MiB, and the larger
    file adds less than half the size difference (memory is a piece, not the file). 32 MiB and 256 MiB in CI;
    ``TETHERLESS_MEDIA_BIG=1``: 256 MiB and 2 GiB."""
    assert relay.proc is not None
    alice, bob, bob_address = pair
    peaks: dict[int, tuple[int, int, int]] = {}
    for size in SIZES:
        source = tmp_path / f"{size}.bin"
        digest = make_file(source, size)
        sender = _peak_while_running(spawn(alice, "send", bob_address, "--file", str(source)))
        (file,) = file_messages(bob)
        out = tmp_path / f"{size}.out"
        receiver = _peak_while_running(spawn(bob, "blob", "get", str(file["ref"]), "-o", str(out)))
        assert sha256_of(out) == digest
        out.unlink()
        source.unlink()
        peaks[size] = (sender, receiver, peak_rss_kib(relay.proc.pid))
    small, large = (peaks[size] for size in SIZES)
    print(f"peak RSS KiB (sender, receiver, relay): {SIZES[0] // MiB} MiB {small}, {SIZES[1] // MiB} MiB {large}")
    limit_kib = 200 * 1024
    half_difference_kib = (SIZES[1] - SIZES[0]) // 2 // 1024
    for before, after in zip(small, large, strict=True):
        assert after < limit_kib
        assert after - before < half_difference_kib


def test_a_relay_whose_stored_blob_changed_is_refused_with_one_line(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The relay (its disk, its operator) is the adversary: bytes changed in the stored blob never become
    plaintext; ``blob get`` says so in one line, and nothing is written."""
    alice, bob, bob_address = pair
    source = tmp_path / "lab.csv"
    make_file(source, 2 * MiB)
    ok(cli(alice, "send", bob_address, "--file", str(source)))
    (file,) = file_messages(bob)
    (stored,) = [p for p in relay_files(relay) if "blobs" in p.parts and p.stat().st_size > MiB]
    data = bytearray(stored.read_bytes())
    data[MiB] ^= 0x01
    stored.write_bytes(bytes(data))
    out = tmp_path / "lab.out"
    line = one_line_error(cli(bob, "blob", "get", str(file["ref"]), "-o", str(out)), 1)
    assert "blob_corrupt" in line
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".lab.out")] == []


def test_the_relays_size_limit_and_quota_are_one_line_each(tmp_path: Path) -> None:
    limits = {"TETHERLESS_BLOB_MAX_BYTES": str(MiB), "TETHERLESS_BLOB_QUOTA_BYTES": str(2 * MiB)}
    relay = RelayProcess(tmp_path / "relay-data", env=limits)
    relay.start()
    try:
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        bob_address = init(relay.url, bob)
        init(relay.url, alice)
        big = tmp_path / "big.bin"
        make_file(big, 2 * MiB)
        line = one_line_error(cli(alice, "send", bob_address, "--file", str(big)), 1)
        assert "file_too_large" in line
        assert "1048576" in line  # the relay's limit, from its /.well-known/tetherless
        lines = []
        for n in range(3):
            part = tmp_path / f"part{n}.bin"
            make_file(part, 900 * 1024)
            lines.append(cli(alice, "send", bob_address, "--file", str(part)))
        assert [r.returncode for r in lines] == [0, 0, 1]
        assert "blob_quota_exceeded" in one_line_error(lines[2], 1)
    finally:
        relay.stop()


async def test_the_sdk_owner_deletes_a_blob_and_a_wrong_capability_is_refused(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The SDK against the real relay: ``upload_file``, a download with a wrong capability (404
    ``blob_not_found``, like an unknown blob), the owner's ``blob_delete``, then the right capability is refused
    too."""
    alice, _, _ = pair
    keystore = Keystore(alice)
    keys = keystore.load()
    store = open_store(keystore, keys)
    source = tmp_path / "sdk.bin"
    digest = make_file(source, 3 * MiB)
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=store.db) as client:
        state = await blobs.upload_file(client, store.db, source)
        ref = state.ref()
        cache = blobs.MediaCache(tmp_path / "cache-home", store.db)
        (tmp_path / "cache-home").mkdir()
        out = await blobs.download(ref, tmp_path / "sdk.out", cache=cache, relay=lambda r: blobs.blob_relay(r, keys))
        assert sha256_of(out) == digest
        cache.forget(ref.blob_id)
        wrong = msgspec.structs.replace(ref, capability=bytes(32))
        with pytest.raises(RemoteError) as refused:
            await blobs.download(wrong, tmp_path / "x", cache=cache, relay=lambda r: blobs.blob_relay(r, keys))
        assert refused.value.code is ErrorCode.BLOB_NOT_FOUND
        await client.api.blob_delete(ref.blob_id)
        await client.api.blob_delete(ref.blob_id)  # idempotent
        with pytest.raises(RemoteError) as gone:
            await blobs.download(ref, tmp_path / "y", cache=cache, relay=lambda r: blobs.blob_relay(r, keys))
        assert gone.value.code is ErrorCode.BLOB_NOT_FOUND
    store.db.close()


def test_errors_are_one_line(relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path) -> None:
    alice, bob, bob_address = pair
    line = one_line_error(cli(alice, "send", bob_address, "--file", str(tmp_path / "missing.pdf")), 1)
    assert "file_unreadable" in line
    line = one_line_error(cli(bob, "blob", "get", "aaaaaaaaaaaaaaaaaaaaaaaaaa"), 1)
    assert "unknown_message" in line
    one_line_error(cli(bob, "blob", "get", "not-an-id"), 2)


async def test_blob_get_never_connects_where_a_sender_points_it(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """A sender (here a real device of another account) forges a file message whose ``relay`` is ``localhost``
    with the port of a listener on this machine: ``blob get`` refuses in one line and never opens a connection
    there. Unit cases (IP literals in any spelling, each non-public range): tests/protocol/client/test_blobs.py."""
    alice, bob, bob_address = pair
    keystore = Keystore(alice)
    keys = keystore.load()
    store = open_store(keystore, keys)
    source = tmp_path / "bait.pdf"
    make_file(source, MiB)
    async with RelayClient.connect(keys.relay_url, keys=keys, local_db=store.db) as client:
        state = await blobs.upload_file(client, store.db, source)
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        forged = msgspec.structs.replace(state.ref(), relay=f"localhost:{listener.getsockname()[1]}")
        outbox.enqueue(store, bob_address, FILE_CONTENT_TYPE, msgspec.msgpack.encode(forged))
        store.db.close()
        ok(cli(alice, "sync", "--timeout", "20"))
        (file,) = file_messages(bob)
        out = tmp_path / "bait.out"
        line = one_line_error(cli(bob, "blob", "get", str(file["ref"]), "-o", str(out)), 1)
        assert "blob_relay_refused" in line
        assert "non-public address" in line
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    assert not out.exists()


def test_a_file_rewritten_with_the_same_size_and_mtime_is_uploaded_afresh_not_resumed(
    relay: RelayProcess, pair: tuple[Path, Path, str], tmp_path: Path
) -> None:
    """The upload is killed at 40 %; the file is then rewritten in place keeping its size and mtime (``cp -p``,
    ``touch -d``). ``sync`` drops the stale upload with a warning instead of sending content nobody asked it to;
    the next ``send --file`` uploads the new content under a new key: the recipient gets the new file."""
    alice, bob, bob_address = pair
    source = tmp_path / "notes.txt"
    make_file(source, SIZE)
    uploading = spawn(alice, "send", bob_address, "--file", str(source))
    wait_for(relay, "relay_blob_upload_bytes_total", 0.4 * SIZE, uploading)
    sigkill(uploading)
    before = source.stat()
    digest = make_file(tmp_path / "other", SIZE)
    os.replace(tmp_path / "other", source)
    os.utime(source, ns=(before.st_atime_ns, before.st_mtime_ns))

    synced = cli(alice, "sync", "--timeout", "20")
    assert synced.returncode == 0, synced.stderr
    assert "the unfinished upload of" in synced.stderr
    assert "was dropped" in synced.stderr
    assert file_messages(bob) == []

    ok(cli(alice, "send", bob_address, "--file", str(source)))
    (file,) = file_messages(bob)
    assert fetched_digest(bob, file["ref"], tmp_path / "notes.out") == digest
