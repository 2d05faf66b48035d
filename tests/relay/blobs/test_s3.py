"""What only the S3 backend promises: its layout in the bucket, signing, settings, retries and errors.

The layout and signature tests run against moto on loopback (tests/support/s3_server.py); retries and
odd answers against httpx's MockTransport, which is the only way to make a store answer 503 on cue.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import aclosing

import httpx
import pytest

from relay.blobs.base import BlobStorageError
from relay.blobs.s3 import MIB, S3Storage, part_bytes_for
from tests.relay.blobs.conftest import PART_BYTES
from tests.support.s3_server import MotoS3Server

SECRET = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
ENVIRONMENT = {"AWS_ACCESS_KEY_ID": "AKIDEXAMPLE", "AWS_SECRET_ACCESS_KEY": SECRET}
CREATED = b"<InitiateMultipartUploadResult><UploadId>u-1</UploadId></InitiateMultipartUploadResult>"


def new_key() -> str:
    return uuid.uuid4().hex


def state_of(part_bytes: int) -> str:
    return json.dumps({"upload_id": "u-1", "part_bytes": part_bytes})


async def chunks_of(data: bytes, size: int = 65_536) -> AsyncIterator[bytes]:
    for start in range(0, len(data), size):
        yield data[start : start + size]


def mocked(
    handler: Callable[[httpx.Request], httpx.Response], environ: dict[str, str] | None = None, **settings: object
) -> S3Storage:
    storage = S3Storage.from_environment("bucket", environ or ENVIRONMENT, **settings)  # type: ignore[arg-type]
    # Swap the network for the handler, keeping the client's other settings; no retry waits.
    storage._client._transport = httpx.MockTransport(handler)
    storage._retry_delays = (0.0, 0.0, 0.0)
    return storage


def recording(responses: list[httpx.Response], seen: list[httpx.Request]) -> Callable[[httpx.Request], httpx.Response]:
    def handler(request: httpx.Request) -> httpx.Response:
        request.read()
        seen.append(request)
        return responses.pop(0)

    return handler


# -- settings ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"])
def test_missing_credentials_are_one_clear_line(missing: str) -> None:
    environ = {name: value for name, value in ENVIRONMENT.items() if name != missing}
    with pytest.raises(ValueError, match=missing) as caught:
        S3Storage.from_environment("bucket", environ)
    assert "\n" not in str(caught.value)
    assert SECRET not in str(caught.value)


@pytest.mark.parametrize("bucket", ["", "Bucket", "b", "a..b", "bucket/x"])
def test_a_bad_bucket_name_is_refused(bucket: str) -> None:
    with pytest.raises(ValueError, match="bucket"):
        S3Storage.from_environment(bucket, ENVIRONMENT)


@pytest.mark.parametrize("endpoint", ["ftp://host", "http://host/path", "host:9000", "http://host?x=1"])
def test_a_bad_endpoint_is_refused(endpoint: str) -> None:
    with pytest.raises(ValueError, match="endpoint"):
        S3Storage.from_environment("bucket", {**ENVIRONMENT, "AWS_ENDPOINT_URL": endpoint})


@pytest.mark.parametrize(
    ("extra", "settings", "url"),
    [
        ({}, {}, "https://s3.us-east-1.amazonaws.com/bucket/blobs/"),
        ({"AWS_REGION": "eu-central-1"}, {}, "https://s3.eu-central-1.amazonaws.com/bucket/blobs/"),
        ({"AWS_ENDPOINT_URL": "http://127.0.0.1:9000"}, {}, "http://127.0.0.1:9000/bucket/blobs/"),
        ({"AWS_ENDPOINT_URL": "https://minio.example"}, {"virtual_host": True}, "https://bucket.minio.example/blobs/"),
    ],
)
async def test_the_endpoint_follows_aws_conventions(
    extra: dict[str, str], settings: dict[str, object], url: str
) -> None:
    seen: list[httpx.Request] = []
    storage = mocked(recording([httpx.Response(200, content=CREATED)], seen), {**ENVIRONMENT, **extra}, **settings)
    key = new_key()
    await storage.start(key, 10)
    await storage.aclose()
    assert str(seen[0].url) == f"{url}{key}?uploads"
    region = extra.get("AWS_REGION", "us-east-1")
    assert "Credential=AKIDEXAMPLE/" in seen[0].headers["Authorization"]
    assert f"/{region}/s3/aws4_request" in seen[0].headers["Authorization"]


async def test_a_session_token_is_sent_and_signed() -> None:
    seen: list[httpx.Request] = []
    storage = mocked(
        recording([httpx.Response(200, content=CREATED)], seen), {**ENVIRONMENT, "AWS_SESSION_TOKEN": "tok"}
    )
    await storage.start(new_key(), 10)
    await storage.aclose()
    assert seen[0].headers["X-Amz-Security-Token"] == "tok"
    assert "x-amz-security-token" in seen[0].headers["Authorization"]


async def test_parts_are_signed_with_their_sha256() -> None:
    seen: list[httpx.Request] = []
    responses = [
        httpx.Response(200, content=b"<ListBucketResult/>"),  # no stale tails
        httpx.Response(200, headers={"ETag": '"e1"'}),
        httpx.Response(200),  # the tail
    ]
    storage = mocked(recording(responses, seen))
    data = bytes(range(256)) * (PART_BYTES // 256 * 2 + 3)
    state = state_of(2 * PART_BYTES)
    result = await storage.append(new_key(), state, 0, len(data), chunks_of(data))
    await storage.aclose()
    assert result.written == len(data)
    part, tail = seen[1], seen[2]
    assert part.url.params["partNumber"] == "1"
    assert part.content == data[: 2 * PART_BYTES]
    assert part.headers["X-Amz-Content-SHA256"] == hashlib.sha256(part.content).hexdigest()
    assert part.headers["Content-Length"] == str(2 * PART_BYTES)
    assert "Transfer-Encoding" not in part.headers
    assert tail.url.path.endswith(f"/tail-{len(data)}")
    assert tail.headers["X-Amz-Content-SHA256"] == hashlib.sha256(data[2 * PART_BYTES :]).hexdigest()


def test_the_part_size_keeps_every_upload_within_10000_parts() -> None:
    assert part_bytes_for(0) == 8 * MIB
    assert part_bytes_for(10_000 * 8 * MIB) == 8 * MIB
    assert part_bytes_for(10_000 * 8 * MIB + 1) == 9 * MIB
    assert part_bytes_for(1000, min_part_bytes=5 * MIB) == 5 * MIB
    for length in (1, 10 * 1024 * MIB, 100 * 1024 * MIB, 5 * 1024 * 1024 * MIB):
        part = part_bytes_for(length)
        assert part % MIB == 0
        assert -(-length // part) <= 10_000


def test_parts_below_the_s3_minimum_are_refused() -> None:
    with pytest.raises(ValueError, match="min_part_bytes"):
        S3Storage.from_environment("bucket", ENVIRONMENT, min_part_bytes=MIB)


@pytest.mark.parametrize("key", ["../escape", "a/b", "", "x" * 129, "a.b", "a b"])
async def test_a_key_cannot_reach_other_objects(key: str) -> None:
    storage = mocked(recording([], []))
    with pytest.raises(ValueError, match="key"):
        await storage.start(key, 10)
    with pytest.raises(ValueError, match="key"):
        await storage.delete(key)
    await storage.aclose()


async def test_a_state_from_another_backend_is_refused() -> None:
    storage = mocked(recording([], []))
    for state in ("", "{}", '{"upload_id":"u","part_bytes":1}', "files"):
        with pytest.raises(ValueError, match="state"):
            await storage.append(new_key(), state, 0, 10, chunks_of(b"x"))
    await storage.aclose()


async def test_chunks_past_the_declared_length_are_refused() -> None:
    storage = mocked(recording([httpx.Response(200, content=b"<ListBucketResult/>")], []))
    state = state_of(PART_BYTES)
    async with aclosing(chunks_of(b"x" * 11)) as chunks:
        with pytest.raises(ValueError, match="past"):
            await storage.append(new_key(), state, 0, 10, chunks)
    await storage.aclose()


# -- retries and errors -----------------------------------------------------------------------------------


async def test_5xx_and_429_are_retried_with_the_request_signed_again() -> None:
    seen: list[httpx.Request] = []
    responses = [httpx.Response(503), httpx.Response(429), httpx.Response(500), httpx.Response(200, content=CREATED)]
    storage = mocked(recording(responses, seen))
    state = await storage.start(new_key(), 10)
    await storage.aclose()
    assert '"u-1"' in state
    assert len(seen) == 4


@pytest.mark.parametrize(
    ("status", "code", "attempts"),
    [
        (503, "SlowDown", 4),  # retried, but only three times
        (403, "AccessDenied", 1),  # a 4xx is never retried
        (404, "NoSuchBucket", 1),
    ],
)
async def test_retries_are_bounded_and_never_for_4xx(status: int, code: str, attempts: int) -> None:
    seen: list[httpx.Request] = []
    error = f"<Error><Code>{code}</Code><Message>said the store</Message></Error>".encode()
    storage = mocked(recording([httpx.Response(status, content=error) for _ in range(10)], seen))
    with pytest.raises(BlobStorageError, match=f"HTTP {status} {code}$"):
        await storage.start(new_key(), 10)
    await storage.aclose()
    assert len(seen) == attempts


async def test_connection_errors_are_retried_then_reported_without_credentials() -> None:
    attempts: list[httpx.Request] = []

    def refuse(request: httpx.Request) -> httpx.Response:
        attempts.append(request)
        raise httpx.ConnectError("[Errno 111] Connection refused", request=request)

    storage = mocked(refuse, {**ENVIRONMENT, "AWS_SESSION_TOKEN": "session-secret"})
    with pytest.raises(BlobStorageError) as caught:
        await storage.start(new_key(), 10)
    await storage.aclose()
    assert len(attempts) == 4
    message = str(caught.value)
    assert "ConnectError" in message
    assert "\n" not in message
    for secret in (SECRET, "session-secret", "Signature="):
        assert secret not in message


async def test_an_error_inside_a_200_completion_is_an_error() -> None:
    # S3 sends the 200 before it finishes a CompleteMultipartUpload; a failure then arrives in the body.
    part = PART_BYTES
    responses = [
        httpx.Response(200, content=b"x" * 10),  # the last tail
        httpx.Response(200, headers={"ETag": '"e2"'}),  # the tail as part 2
        httpx.Response(
            200,
            content=b'<ListPartsResult><Part><PartNumber>1</PartNumber><ETag>"e1"</ETag>'
            b"<Size>%d</Size></Part><IsTruncated>false</IsTruncated></ListPartsResult>" % part,
        ),
        httpx.Response(200, content=b"<Error><Code>InternalError</Code><Message>We encountered</Message></Error>"),
    ]
    storage = mocked(recording(responses, []))
    state = state_of(part)
    with pytest.raises(BlobStorageError, match="HTTP 200 InternalError"):
        await storage.complete(new_key(), state, part + 10)
    await storage.aclose()


async def test_complete_refuses_a_missing_part() -> None:
    part = PART_BYTES
    responses = [
        httpx.Response(200, content=b"x" * 10),
        httpx.Response(200, headers={"ETag": '"e3"'}),
        httpx.Response(200, content=b"<ListPartsResult><IsTruncated>false</IsTruncated></ListPartsResult>"),
    ]
    storage = mocked(recording(responses, []))
    state = state_of(part)
    with pytest.raises(BlobStorageError, match="part 1 is missing"):
        await storage.complete(new_key(), state, 2 * part + 10)
    await storage.aclose()


async def test_a_store_that_ignores_range_still_yields_the_asked_bytes() -> None:
    data = bytes(range(256)) * 4096
    storage = mocked(recording([httpx.Response(200, stream=httpx.ByteStream(data))], []))
    got = b"".join([chunk async for chunk in storage.read(new_key(), 1000, 300_000)])
    await storage.aclose()
    assert got == data[1000:300_000]


async def test_a_short_answer_is_an_error() -> None:
    storage = mocked(recording([httpx.Response(206, stream=httpx.ByteStream(b"x" * 10))], []))
    with pytest.raises(BlobStorageError, match="short"):
        _ = [chunk async for chunk in storage.read(new_key(), 0, 100)]
    await storage.aclose()


# -- against moto: signatures, the layout of tails --------------------------------------------------------


async def test_a_wrong_secret_is_refused_and_not_echoed(s3_server: MotoS3Server) -> None:
    environ = {**s3_server.environment(), "AWS_SECRET_ACCESS_KEY": SECRET}
    storage = S3Storage.from_environment(s3_server.bucket, environ)
    with pytest.raises(BlobStorageError, match="HTTP 403 SignatureDoesNotMatch") as caught:
        await storage.start(new_key(), 10)
    await storage.aclose()
    assert SECRET not in str(caught.value)


def tails(server: MotoS3Server, key: str) -> list[str]:
    return [name.rpartition("/")[2] for name in server.object_keys() if name.startswith(f"uploads/{key}/")]


async def test_tails_are_named_after_their_end_and_the_committed_one_is_never_written(
    s3_server: MotoS3Server,
) -> None:
    storage = S3Storage.from_environment(s3_server.bucket, s3_server.environment(), min_part_bytes=PART_BYTES)
    s3 = s3_server.client("s3")
    key, length = new_key(), 3 * PART_BYTES
    state = await storage.start(key, length)
    await storage.append(key, state, 0, length, chunks_of(b"a" * 100))
    await storage.append(key, state, 100, length, chunks_of(b"b" * 100))  # committed: 200
    assert sorted(tails(s3_server, key)) == ["tail-100", "tail-200"]
    # A failed PATCH from 200 writes a tail above 200 and leaves tail-200 as it was (tail-100 is stale: gone).
    await storage.append(key, state, 200, length, chunks_of(b"!" * 50))
    assert sorted(tails(s3_server, key)) == ["tail-200", "tail-250"]
    assert (
        s3.get_object(Bucket=s3_server.bucket, Key=f"uploads/{key}/tail-200")["Body"].read() == b"a" * 100 + b"b" * 100
    )
    # The retry at 200 drops the tails below 200 only: tail-250 might be an append being committed.
    await storage.append(key, state, 200, length, chunks_of(b"c" * 10))
    assert sorted(tails(s3_server, key)) == ["tail-200", "tail-210", "tail-250"]
    # Reaching a part boundary leaves no tail for it.
    await storage.append(key, state, 210, length, chunks_of(b"d" * (PART_BYTES - 210)))
    assert f"tail-{PART_BYTES}" not in tails(s3_server, key)
    await storage.append(key, state, PART_BYTES, length, chunks_of(b"e" * (2 * PART_BYTES)))
    await storage.complete(key, state, length)
    assert tails(s3_server, key) == []
    assert f"blobs/{key}" in s3_server.object_keys()
    await storage.delete(key)
    await storage.aclose()


async def test_the_canary_scan_sees_clear_bytes_in_the_bucket(s3_server: MotoS3Server) -> None:
    # The e2e tests prove "ciphertext only" with scan_bucket_for; this proves the scan finds what is there.
    storage = S3Storage.from_environment(s3_server.bucket, s3_server.environment(), min_part_bytes=PART_BYTES)
    key, marker = new_key(), f"canary-{uuid.uuid4().hex}".encode()
    data = b"x" * 1000 + marker + b"y" * 1000
    state = await storage.start(key, len(data))
    await storage.append(key, state, 0, len(data), chunks_of(data, 700))  # the marker straddles two chunks
    assert s3_server.scan_bucket_for(marker) == [f"uploads/{key}/tail-{len(data)}"]
    await storage.complete(key, state, len(data))
    assert s3_server.scan_bucket_for(marker) == [f"blobs/{key}"]
    assert s3_server.scan_bucket_for(f"canary-{uuid.uuid4().hex}".encode()) == []
    await storage.delete(key)
    await storage.aclose()
