"""Files end to end on the organisation's storage (issue 15 acceptance): a real S3-compatible server on loopback
(moto's server mode, tests/support/s3_server.py, signatures and the relay user's IAM policy checked) behind real
relay processes and the real CLI; then two PostgreSQL replicas sharing one bucket, where an upload interrupted
through one replica resumes through the other.

The S3 server is started here and fails the test under ``CI=true`` when it cannot start. The single-relay
round trip, the download resume, the cache and the second relay on the files backend: tests/e2e/test_media.py.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_cli_errors import cli, init
from tests.e2e.test_equal_devices import ok
from tests.e2e.test_media import (
    CANARY,
    MiB,
    contains,
    fetched_digest,
    file_messages,
    make_file,
    metric,
    relay_files,
    sigkill,
    spawn,
    wait_for,
)
from tests.relay.store.postgres_db import fresh_database
from tests.relay_process import RelayProcess, replica_processes
from tests.support.faultproxy import ThreadedFaultProxy
from tests.support.s3_server import MotoS3Server

SIZE = 24 * MiB  # three 8 MiB S3 parts (the relay's smallest part size), three 8 MiB client PATCHes
UPLOADED = "relay_blob_upload_bytes_total"  # committed
RECEIVED = "relay_blob_received_bytes_total"  # every PATCH body byte read, kept or not


@pytest.fixture(scope="module")
def s3() -> Iterator[MotoS3Server]:
    server = MotoS3Server.start(bucket="tetherless-e2e-media")
    try:
        yield server
    finally:
        server.stop()


def s3_env(s3: MotoS3Server) -> dict[str, str]:
    return {"TETHERLESS_BLOB_STORAGE": "s3", **s3.environment()}


def test_a_file_through_s3_storage_survives_a_killed_upload_and_the_bucket_holds_only_ciphertext(
    s3: MotoS3Server, tmp_path: Path
) -> None:
    relay = RelayProcess(tmp_path / "relay-data", env=s3_env(s3))
    relay.start()
    try:
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        bob_address = init(relay.url, bob)
        init(relay.url, alice)
        source = tmp_path / "ward-round.mp4"
        digest = make_file(source, SIZE)

        uploading = spawn(alice, "send", bob_address, "--file", str(source))
        wait_for(relay, UPLOADED, 0.4 * SIZE, uploading)
        sigkill(uploading)
        assert s3.multipart_uploads(), "the interrupted upload is an S3 multipart upload in progress"
        ok(cli(alice, "send", bob_address, "--file", str(source)))
        assert metric(relay, RECEIVED) < 1.2 * SIZE

        (file,) = file_messages(bob)
        assert fetched_digest(bob, file["ref"], tmp_path / "received.mp4") == digest

        keys = s3.object_keys()
        assert [key for key in keys if key.startswith("blobs/")], keys  # the blob is in the bucket ...
        assert not [p for p in relay_files(relay) if p.parent.name == "blobs"]  # ... not under --data
        assert s3.multipart_uploads() == []  # completed, nothing left half-done
        assert s3.scan_bucket_for(CANARY) == []  # only ciphertext in the bucket
        assert [p for p in relay_files(relay) if contains(p, CANARY)] == []
    finally:
        relay.stop()


@pytest.fixture
def two_replicas(s3: MotoS3Server, tmp_path: Path) -> Iterator[list[RelayProcess]]:
    """Two replicas of one relay (one PostgreSQL database, one relay key, one bucket)."""
    with fresh_database("tl_media") as url, replica_processes(tmp_path, url, 2, name="media.test", env=s3_env(s3)) as r:
        yield r


def test_an_upload_interrupted_through_one_replica_resumes_through_another(
    two_replicas: list[RelayProcess], tmp_path: Path
) -> None:
    """The devices reach the relay through one address (a proxy standing in for the Kubernetes Service). The
    upload runs through replica 0, which is SIGKILLed while the next PATCH streams (so it dies holding the
    upload's lease); the client says it queued the file; the Service now routes to replica 1, which answers the
    resumed PATCH 423 with a Retry-After until the dead replica's lease lapses, then continues from the offset
    recorded in PostgreSQL, with the parts already in the bucket."""
    first, second = two_replicas
    service = ThreadedFaultProxy("127.0.0.1", first.port).start()
    try:
        alice, bob = tmp_path / "alice", tmp_path / "bob"
        bob_address = init(service.url, bob)
        init(service.url, alice)
        source = tmp_path / "ct-scan.dcm"
        digest = make_file(source, SIZE)

        uploading = spawn(alice, "send", bob_address, "--file", str(source))
        wait_for(first, UPLOADED, 0.4 * SIZE, uploading)
        through_first = metric(first, UPLOADED)
        received_first = metric(first, RECEIVED)
        first.kill()
        assert 0.4 * SIZE <= through_first < SIZE
        out, err = uploading.communicate(timeout=180)
        assert uploading.returncode == 0, (out, err)
        assert "queued" in out, out
        assert "Traceback" not in err, err

        assert service.proxy is not None
        service.call(service.proxy.set_upstream, "127.0.0.1", second.port)
        ok(cli(alice, "send", bob_address, "--file", str(source)))
        through_second = metric(second, UPLOADED)
        assert through_second <= SIZE - through_first + 8 * MiB  # continued: at most one piece again
        assert received_first + metric(second, RECEIVED) < 1.2 * SIZE

        (file,) = file_messages(bob)
        assert fetched_digest(bob, file["ref"], tmp_path / "ct-scan.out") == digest
    finally:
        service.close()
