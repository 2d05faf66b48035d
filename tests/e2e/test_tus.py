"""tus 1.0 uploads and Range downloads against a real relay process: the tuspy client, and exact HTTP probes.

Every tus status the relay answers is met here (201, 204, 409, 412, 413, 415,
460, 400, 404, 507, 206, 416), each refusal leaving nothing behind: no row (the
quota usage is unchanged), no file bytes beyond the committed offset.
"""

from __future__ import annotations

import base64
import email.utils
import hashlib
import io
import os
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from tusclient import client
from tusclient.exceptions import TusCommunicationError

from tests.e2e.http11 import Answer, Http11, Peer, login, register
from tests.relay_process import RelayProcess
from tests.support.s3_server import MotoS3Server

MAX_BYTES = 4 * 1024 * 1024
QUOTA_BYTES = 6 * 1024 * 1024
LIMITS = {
    "TETHERLESS_BLOB_MAX_BYTES": str(MAX_BYTES),
    "TETHERLESS_BLOB_QUOTA_BYTES": str(QUOTA_BYTES),
    "TETHERLESS_RATE_DEVICE_REQUESTS_BURST": "100000",
}
UPLOADS = "/v1/blobs/uploads"


@pytest.fixture(scope="module")
def relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RelayProcess]:
    process = RelayProcess(tmp_path_factory.mktemp("tus") / "data", env=LIMITS)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


@pytest.fixture(scope="module")
def http(relay: RelayProcess) -> Http11:
    return Http11(relay.url)


def peer(http: Http11) -> Peer:
    dev = register(http)
    login(http, dev)
    return dev


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def tus(dev: Peer, **extra: str) -> dict[str, str]:
    return {"tus-resumable": "1.0.0", "authorization": f"Bearer {dev.token}", **extra}


def create(
    http: Http11, dev: Peer, length: int, *, sha256: bytes | None = None, capability: bytes | None = None
) -> str:
    metadata = []
    if sha256 is not None:
        metadata.append(f"sha256 {b64(sha256)}")
    if capability is not None:
        metadata.append(f"capability {b64(hashlib.sha256(capability).digest())}")
    answer = http.request(
        "POST",
        UPLOADS,
        None,
        tus(dev, **{"upload-length": str(length), "upload-metadata": ",".join(metadata), "filename": "x"}),
    )
    assert answer.status == 201, answer.body
    assert answer.headers["tus-resumable"] == "1.0.0"
    assert answer.headers["location"].startswith(UPLOADS + "/")
    return answer.headers["location"]


def patch(http: Http11, dev: Peer, location: str, offset: int, data: bytes, **extra: str) -> Answer:
    headers = tus(dev, **{"upload-offset": str(offset), "content-type": "application/offset+octet-stream", **extra})
    return http.request("PATCH", location, data, headers)


def head(http: Http11, dev: Peer, location: str) -> Answer:
    return http.request("HEAD", location, None, tus(dev))


def problem(answer: Answer, status: int, code: str) -> None:
    assert (answer.status, answer.code) == (status, code), answer.body
    assert answer.headers["tus-resumable"] == "1.0.0"  # tus: on every response but OPTIONS, problems too


def gone(answer: Answer) -> None:
    """A HEAD's 404 (a problem without its body)."""
    assert (answer.status, answer.headers["content-type"]) == (404, "application/problem+json")
    assert answer.headers["tus-resumable"] == "1.0.0"


def uploads_on_disk(relay: RelayProcess) -> dict[str, int]:
    root = relay.data_dir / "blobs"
    return {p.name: p.stat().st_size for p in root.iterdir()} if root.exists() else {}


def quota_room(http: Http11, dev: Peer) -> int:
    """How many bytes the account may still declare: probed by creations (then terminated)."""
    low, high = 0, QUOTA_BYTES
    while low < high:
        mid = (low + high + 1) // 2
        answer = http.request("POST", UPLOADS, None, tus(dev, **{"upload-length": str(min(mid, MAX_BYTES))}))
        if answer.status == 201 and mid <= MAX_BYTES:
            http.request("DELETE", answer.headers["location"], None, tus(dev))
            low = mid
        else:
            high = mid - 1
    return low


def test_tuspy_uploads_with_checksums_and_get_returns_the_bytes(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    data = os.urandom(3 * 1024 * 1024 + 12345)
    digest = hashlib.sha256(data).digest()
    tus_client = client.TusClient(relay.url + UPLOADS, headers={"Authorization": f"Bearer {alice.token}"})
    uploader = tus_client.uploader(
        file_stream=io.BytesIO(data),
        chunk_size=1024 * 1024,
        upload_checksum=True,
        metadata={"sha256": digest.decode("latin-1")},  # tus metadata values are bytes: the raw digest
        metadata_encoding="latin-1",
    )
    uploader.upload()
    assert uploader.offset == len(data)
    location = uploader.url.removeprefix(relay.url)
    status = head(http, alice, location)
    assert (status.status, status.headers["upload-offset"], status.headers["upload-length"]) == (
        204,
        str(len(data)),
        str(len(data)),
    )
    assert status.headers["cache-control"] == "no-store"
    blob_id = status.headers["tetherless-blob-id"]
    got = http.request("GET", f"/v1/blobs/{blob_id}", None, {"authorization": f"Bearer {alice.token}"})
    assert got.status == 200
    assert got.body == data
    assert got.headers["etag"] == f'"{digest.hex()}"'
    assert got.headers["accept-ranges"] == "bytes"
    assert got.headers["content-length"] == str(len(data))
    ranged = http.request(
        "GET",
        f"/v1/blobs/{blob_id}",
        None,
        {"authorization": f"Bearer {alice.token}", "range": "bytes=1048570-1048589"},
    )
    assert ranged.status == 206
    assert ranged.body == data[1048570:1048590]
    assert ranged.headers["content-range"] == f"bytes 1048570-1048589/{len(data)}"
    suffix = http.request(
        "GET", f"/v1/blobs/{blob_id}", None, {"authorization": f"Bearer {alice.token}", "range": "bytes=-7"}
    )
    assert (suffix.status, suffix.body) == (206, data[-7:])


def test_tuspy_resumes_an_upload_from_the_relays_offset(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    data = os.urandom(2 * 1024 * 1024)
    tus_client = client.TusClient(relay.url + UPLOADS, headers={"Authorization": f"Bearer {alice.token}"})
    first = tus_client.uploader(file_stream=io.BytesIO(data), chunk_size=512 * 1024, upload_checksum=True)
    first.upload(stop_at=1024 * 1024)  # the client stops half way (a kill, a lost connection)
    resumed = tus_client.uploader(file_stream=io.BytesIO(data), chunk_size=512 * 1024, url=first.url)
    assert resumed.offset == 1024 * 1024  # asked the relay (HEAD)
    resumed.upload()
    blob_id = head(http, alice, first.url.removeprefix(relay.url)).headers["tetherless-blob-id"]
    assert http.request("GET", f"/v1/blobs/{blob_id}", None, {"authorization": f"Bearer {alice.token}"}).body == data


def test_options_advertises_the_tus_server(http: Http11) -> None:
    answer = http.request("OPTIONS", UPLOADS)
    assert answer.status == 204
    assert answer.headers["tus-version"] == "1.0.0"
    assert answer.headers["tus-extension"] == "creation,checksum,expiration,termination"
    assert answer.headers["tus-max-size"] == str(MAX_BYTES)
    assert answer.headers["tus-checksum-algorithm"] == "sha1,sha256"


def test_creation_headers_and_expiry(http: Http11) -> None:
    alice = peer(http)
    answer = http.request("POST", UPLOADS, None, tus(alice, **{"upload-length": "10"}))
    assert answer.status == 201
    assert answer.headers["upload-offset"] == "0"
    expires = email.utils.parsedate_to_datetime(answer.headers["upload-expires"])
    assert 23 * 3600 < expires.timestamp() - time.time() <= 24 * 3600  # the default upload expiry, a date
    status = head(http, alice, answer.headers["location"])
    assert (status.headers["upload-offset"], status.headers["upload-length"]) == ("0", "10")
    assert "upload-expires" in status.headers


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"tus-resumable": "0.2.2"}, 412, "tus_version_unsupported"),
        ({"tus-resumable": ""}, 412, "tus_version_unsupported"),
        ({"upload-length": "-1"}, 400, "invalid_header"),
        ({"upload-length": "ten"}, 400, "invalid_header"),
        ({"upload-length": None}, 400, "invalid_header"),
        ({"upload-length": None, "upload-defer-length": "1"}, 400, "invalid_header"),
        ({"upload-metadata": "sha256 not*base64"}, 400, "invalid_header"),
        ({"upload-metadata": f"sha256 {b64(b'short')}"}, 400, "invalid_header"),
        ({"upload-metadata": f"capability {b64(b'x' * 31)}"}, 400, "invalid_header"),
        ({"upload-length": str(MAX_BYTES + 1)}, 413, "blob_too_large"),
        ({"authorization": "Bearer nope"}, 401, "invalid_token"),
        ({"authorization": None}, 401, "missing_token"),
    ],
)
def test_bad_creations(http: Http11, headers: dict[str, str | None], status: int, code: str) -> None:
    alice = peer(http)
    sent = {**tus(alice, **{"upload-length": "10"}), **headers}
    answer = http.request("POST", UPLOADS, None, {k: v for k, v in sent.items() if v is not None})
    problem(answer, status, code)
    if status == 412:
        assert answer.headers["tus-version"] == "1.0.0"


def test_unknown_metadata_and_empty_values_are_ignored(http: Http11) -> None:
    alice = peer(http)
    metadata = f"filename {b64(b'cat.jpg')},is_confidential,filetype {b64(b'image/jpeg')}"
    answer = http.request("POST", UPLOADS, None, tus(alice, **{"upload-length": "3", "upload-metadata": metadata}))
    assert answer.status == 201


def test_bad_offset_is_409_and_keeps_nothing(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    location = create(http, alice, 100)
    assert patch(http, alice, location, 0, b"a" * 40).headers["upload-offset"] == "40"
    problem(patch(http, alice, location, 0, b"b" * 10), 409, "blob_offset_mismatch")
    problem(patch(http, alice, location, 50, b"b" * 10), 409, "blob_offset_mismatch")
    assert head(http, alice, location).headers["upload-offset"] == "40"
    assert uploads_on_disk(relay)[location.rsplit("/", 1)[1]] == 40


def test_bad_checksum_is_460_and_keeps_nothing(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    location = create(http, alice, 100)
    good = b64(hashlib.sha1(b"a" * 40).digest())
    assert patch(http, alice, location, 0, b"a" * 40, **{"upload-checksum": f"sha1 {good}"}).status == 204
    bad = b64(hashlib.sha256(b"something else").digest())
    problem(
        patch(http, alice, location, 40, b"b" * 60, **{"upload-checksum": f"sha256 {bad}"}),
        460,
        "blob_checksum_mismatch",
    )
    assert head(http, alice, location).headers["upload-offset"] == "40"
    assert uploads_on_disk(relay)[location.rsplit("/", 1)[1]] == 40
    problem(
        patch(http, alice, location, 40, b"b", **{"upload-checksum": f"md5 {good}"}), 400, "blob_checksum_unsupported"
    )
    problem(patch(http, alice, location, 40, b"b", **{"upload-checksum": "sha1 ???"}), 400, "invalid_header")


def test_wrong_content_type_is_415(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    location = create(http, alice, 100)
    problem(
        patch(http, alice, location, 0, b"a" * 10, **{"content-type": "application/octet-stream"}),
        415,
        "unsupported_media_type",
    )
    assert head(http, alice, location).headers["upload-offset"] == "0"
    assert uploads_on_disk(relay)[location.rsplit("/", 1)[1]] == 0


def test_over_size_body_is_413_and_keeps_nothing(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    location = create(http, alice, 100)
    assert patch(http, alice, location, 0, b"a" * 50).status == 204
    problem(patch(http, alice, location, 50, b"b" * 51), 413, "blob_too_large")
    assert head(http, alice, location).headers["upload-offset"] == "50"
    assert uploads_on_disk(relay)[location.rsplit("/", 1)[1]] == 50


def test_over_quota_is_507_and_leaves_nothing(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    create(http, alice, MAX_BYTES)
    files = uploads_on_disk(relay)
    room = QUOTA_BYTES - MAX_BYTES
    problem(
        http.request("POST", UPLOADS, None, tus(alice, **{"upload-length": str(room + 1)})), 507, "blob_quota_exceeded"
    )
    assert uploads_on_disk(relay) == files  # no file for the refused upload
    assert quota_room(http, alice) == room  # and the quota is unchanged


def test_digest_mismatch_discards_the_upload(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    location = create(http, alice, 4, sha256=hashlib.sha256(b"abcd").digest())
    problem(patch(http, alice, location, 0, b"abce"), 409, "blob_digest_mismatch")
    gone(head(http, alice, location))
    assert location.rsplit("/", 1)[1] not in uploads_on_disk(relay)


def test_termination(relay: RelayProcess, http: Http11) -> None:
    alice, bob = peer(http), peer(http)
    location = create(http, alice, 100)
    patch(http, alice, location, 0, b"a" * 10)
    problem(http.request("DELETE", location, None, tus(bob)), 404, "blob_not_found")
    answer = http.request("DELETE", location, None, tus(alice))
    assert (answer.status, answer.headers["tus-resumable"]) == (204, "1.0.0")
    gone(head(http, alice, location))
    problem(patch(http, alice, location, 10, b"b"), 404, "blob_not_found")
    assert location.rsplit("/", 1)[1] not in uploads_on_disk(relay)


def test_downloads_need_the_capability_or_an_owners_token(http: Http11) -> None:
    alice, bob = peer(http), peer(http)
    capability = os.urandom(32)
    data = os.urandom(5000)
    location = create(http, alice, len(data), sha256=hashlib.sha256(data).digest(), capability=capability)
    done = patch(http, alice, location, 0, data)
    assert done.status == 204
    blob_id = done.headers["tetherless-blob-id"]
    url = f"/v1/blobs/{blob_id}"
    cap = base64.urlsafe_b64encode(capability).decode().rstrip("=")
    assert http.request("GET", url, None, {"tetherless-capability": cap}).body == data
    assert (
        http.request("GET", url, None, {"tetherless-capability": cap, "authorization": f"Bearer {bob.token}"}).body
        == data
    )
    refused = http.request(
        "GET", url, None, {"tetherless-capability": base64.urlsafe_b64encode(os.urandom(32)).decode()}
    )
    unknown = http.request("GET", "/v1/blobs/" + "0" * 32, None, {"tetherless-capability": cap})
    assert (refused.status, refused.code) == (unknown.status, unknown.code) == (404, "blob_not_found")
    assert refused.body.replace(blob_id.encode(), b"") == unknown.body.replace(b"0" * 32, b"")
    assert (bob_try := http.request("GET", url, None, {"authorization": f"Bearer {bob.token}"})).status == 404, (
        bob_try.body
    )
    assert http.request("GET", url, None, {}).status == 404
    assert http.request("GET", url, None, {"tetherless-capability": "short"}).code == "invalid_header"
    head_answer = http.request("HEAD", url, None, {"tetherless-capability": cap})
    assert (head_answer.status, head_answer.body, head_answer.headers["content-length"]) == (200, b"", str(len(data)))
    # ranges: one range is 206; several, malformed or beyond the end are 416 with the length
    for asked in ("bytes=5000-", "bytes=0-1,3-4", "bytes=x-y", "items=0-1", "bytes=10-5"):
        answer = http.request("GET", url, None, {"tetherless-capability": cap, "range": asked})
        assert (answer.status, answer.code, answer.headers["content-range"]) == (
            416,
            "range_not_satisfiable",
            "bytes */5000",
        )
    assert (
        http.request("GET", url, None, {"tetherless-capability": cap, "range": "bytes=4990-9999"}).body == data[4990:]
    )
    # the owner deletes it; then it is gone for everyone
    assert http.request("DELETE", url, None, {"authorization": f"Bearer {bob.token}"}).status == 404
    assert http.request("DELETE", url, None, {"authorization": f"Bearer {alice.token}"}).status == 204
    assert http.request("GET", url, None, {"tetherless-capability": cap}).status == 404


def test_tuspy_sees_the_errors(relay: RelayProcess, http: Http11) -> None:
    alice = peer(http)
    tus_client = client.TusClient(relay.url + UPLOADS, headers={"Authorization": f"Bearer {alice.token}"})
    with pytest.raises(TusCommunicationError) as raised:
        tus_client.uploader(file_stream=io.BytesIO(b"x" * (MAX_BYTES + 1)), chunk_size=1024 * 1024).upload()
    assert raised.value.status_code == 413


@pytest.fixture
def collecting(tmp_path: Path) -> Iterator[RelayProcess]:
    env = {"TETHERLESS_BLOB_UPLOAD_EXPIRY_SECONDS": "1", "TETHERLESS_BLOB_COLLECT_INTERVAL_SECONDS": "0.2"}
    process = RelayProcess(tmp_path / "data", env=env)
    process.start()
    try:
        yield process
    finally:
        assert process.stop() == 0


def test_expired_uploads_are_collected(collecting: RelayProcess) -> None:
    http = Http11(collecting.url)
    alice = peer(http)
    location = create(http, alice, 100)
    patch(http, alice, location, 0, b"a" * 10)
    key = location.rsplit("/", 1)[1]
    deadline = time.monotonic() + 30  # a bound on waiting for the collector, not a measurement
    while key in uploads_on_disk(collecting) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert key not in uploads_on_disk(collecting)
    gone(head(http, alice, location))
    metrics = http.request("GET", "/metrics").body.decode()
    assert 'relay_blob_collected_total{kind="upload"} 1.0' in metrics


def test_well_known_publishes_the_blob_limits(http: Http11) -> None:
    limits = http.get("/.well-known/tetherless").json()["limits"]
    assert (limits["max_blob_bytes"], limits["blob_quota_bytes"]) == (MAX_BYTES, QUOTA_BYTES)
    assert (limits["blob_upload_expiry_seconds"], limits["blob_ttl_seconds"]) == (86_400, 30 * 86_400)


def test_s3_without_its_settings_refuses_to_start_with_one_line(tmp_path: Path) -> None:
    env = {"TETHERLESS_BLOB_STORAGE": "s3", "TETHERLESS_BLOB_BUCKET": "media", "AWS_ACCESS_KEY_ID": ""}
    process = RelayProcess(tmp_path / "data", env=env)
    with pytest.raises(RuntimeError, match="exited before ready"):
        process.start()
    assert "blob_storage = s3: S3 blob storage needs AWS_ACCESS_KEY_ID" in process.logs()
    assert "Traceback" not in process.logs()


@pytest.fixture(scope="module")
def s3_relay(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[RelayProcess, MotoS3Server]]:
    server = MotoS3Server.start()
    try:
        env = {**server.environment(), "TETHERLESS_BLOB_STORAGE": "s3", **LIMITS}
        process = RelayProcess(tmp_path_factory.mktemp("tus-s3") / "data", env=env)
        process.start()
        try:
            yield process, server
        finally:
            assert process.stop() == 0
    finally:
        server.stop()


def test_tuspy_through_s3_storage(s3_relay: tuple[RelayProcess, MotoS3Server]) -> None:
    """The same tus service over S3 multipart uploads: parts cross PATCH boundaries, a refused PATCH keeps
    nothing, the blob reads back whole and by range, and termination and deletion leave the bucket empty."""
    relay, server = s3_relay
    http = Http11(relay.url)
    alice = peer(http)
    data = os.urandom(3 * 1024 * 1024 + 777)
    location = create(http, alice, len(data), sha256=hashlib.sha256(data).digest())
    assert patch(http, alice, location, 0, data[:1_000_000]).status == 204
    bad = b64(hashlib.sha256(b"not these bytes").digest())
    problem(
        patch(http, alice, location, 1_000_000, data[1_000_000:2_000_000], **{"upload-checksum": f"sha256 {bad}"}),
        460,
        "blob_checksum_mismatch",
    )
    assert head(http, alice, location).headers["upload-offset"] == "1000000"
    tus_client = client.TusClient(relay.url + UPLOADS, headers={"Authorization": f"Bearer {alice.token}"})
    uploader = tus_client.uploader(
        file_stream=io.BytesIO(data), chunk_size=700_000, upload_checksum=True, url=relay.url + location
    )
    assert uploader.offset == 1_000_000
    uploader.upload()
    blob_id = head(http, alice, location).headers["tetherless-blob-id"]
    url = f"/v1/blobs/{blob_id}"
    token = {"authorization": f"Bearer {alice.token}"}
    assert http.request("GET", url, None, token).body == data
    assert http.request("GET", url, None, {**token, "range": "bytes=2999990-3000009"}).body == data[2999990:3000010]
    other = create(http, alice, 100)
    patch(http, alice, other, 0, b"x" * 10)
    assert http.request("DELETE", other, None, tus(alice)).status == 204
    assert http.request("DELETE", url, None, token).status == 204
    assert server.object_keys() == []
    assert server.multipart_uploads() == []


def test_capability_downloads_are_rate_limited_per_address_owner_downloads_are_not(tmp_path: Path) -> None:
    """A download that brings only a capability is unauthenticated: the source address's budget pays for it (a
    guessing or hammering client gets 429), while the owner's downloads count against its device budget only."""
    limited = RelayProcess(
        tmp_path / "data",
        env={**LIMITS, "TETHERLESS_RATE_IP_PER_SECOND": "0.001", "TETHERLESS_RATE_IP_BURST": "30"},
    )
    limited.start()
    try:
        http = Http11(limited.url)
        alice = peer(http)  # registration and login spend some of the address's burst
        capability, data = os.urandom(32), os.urandom(100)
        location = create(http, alice, len(data), capability=capability)
        blob_id = patch(http, alice, location, 0, data).headers["tetherless-blob-id"]
        url = f"/v1/blobs/{blob_id}"
        cap = {"tetherless-capability": base64.urlsafe_b64encode(capability).decode()}
        answers = [http.request("GET", url, None, cap) for _ in range(40)]
        assert answers[0].body == data
        assert (answers[-1].status, answers[-1].code) == (429, "rate_limited")
        owner = http.request("GET", url, None, {"authorization": f"Bearer {alice.token}"})
        assert owner.body == data  # the device's own budget
    finally:
        assert limited.stop() == 0
