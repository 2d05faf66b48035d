"""A real S3-compatible server on loopback for tests: moto's server mode in a subprocess.

``MotoS3Server.start()`` runs ``python -m moto.server -H 127.0.0.1 -p PORT`` on a
free port, waits until it answers, and provisions it like an operator would
(docs/operations.md "S3-compatible storage"):

- moto's IAM is switched on (``INITIAL_NO_AUTH_ACTION_COUNT``), so every request
  after the first three is checked: its SigV4 signature against the secret key,
  and its action against the caller's IAM policy;
- an *admin* user (``s3:*``, ``iam:*``) that the tests use to look into the bucket;
- a *relay* user whose policy grants exactly the permissions the operations
  guide lists (:data:`RELAY_ACTIONS`), so a backend request outside that list
  fails the tests instead of a deployment;
- one bucket.

:meth:`MotoS3Server.environment` gives the relay user's settings in AWS's
conventions (what ``S3Storage.from_environment`` and ``tetherless serve`` read).
:meth:`MotoS3Server.scan_bucket_for` is the canary check: it reads every object
in the bucket and says which ones contain a marker (the e2e tests prove with it
that the bucket holds ciphertext only).

Under ``CI=true`` a server that cannot start fails the test; elsewhere it skips.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from typing import IO, Any

import pytest

REGION = "us-east-1"
START_TIMEOUT_SECONDS = 60.0  # moto imports all its services on start; a loaded CI host is slow

# What the relay's IAM user may do; docs/operations.md "S3-compatible storage" lists the same.
RELAY_ACTIONS = (
    "s3:PutObject",
    "s3:GetObject",
    "s3:DeleteObject",
    "s3:AbortMultipartUpload",
    "s3:ListMultipartUploadParts",
    "s3:ListBucket",
)

# moto authorises a request by its API operation's name rather than by the IAM action AWS checks
# (CreateMultipartUpload, UploadPart and CompleteMultipartUpload are all s3:PutObject on AWS). The relay user
# gets both spellings of each listed action, and no other: a request outside RELAY_ACTIONS is refused.
_MOTO_SPELLINGS = {
    "s3:PutObject": ("s3:CreateMultipartUpload", "s3:UploadPart", "s3:CompleteMultipartUpload"),
    "s3:GetObject": ("s3:HeadObject",),
    "s3:ListMultipartUploadParts": ("s3:ListParts",),
    "s3:ListBucket": ("s3:ListObjectsV2",),
}

# The requests moto serves before it starts checking signatures and policies: the three that create the
# admin user below (CreateUser, PutUserPolicy, CreateAccessKey). Everything after is signed and authorised.
_UNAUTHENTICATED_ACTIONS = 3


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _unavailable(message: str) -> None:
    if os.environ.get("CI") == "true":
        pytest.fail(message, pytrace=False)
    pytest.skip(message)


@dataclass
class Keys:
    access_key_id: str
    secret_access_key: str


@dataclass
class MotoS3Server:
    """One moto server process; :meth:`stop` kills it (idempotent)."""

    process: subprocess.Popen[bytes]
    port: int
    log: IO[bytes]  # moto's stderr (a request log line per request): a file, since a full pipe would stall moto
    bucket: str = ""
    admin: Keys = field(default_factory=lambda: Keys("", ""))
    relay: Keys = field(default_factory=lambda: Keys("", ""))

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @classmethod
    def start(cls, bucket: str = "tetherless-blobs") -> MotoS3Server:
        """Start, wait until it answers, provision users and the bucket; fails (CI) or skips when it cannot."""
        try:
            import boto3  # noqa: F401  (moto's own dependency; only the test helpers use it)
        except ImportError as exc:
            _unavailable(f"moto's server needs boto3 ({exc}); install the dev requirements")
        last_error = ""
        for _ in range(3):  # the free port may be taken between the probe and moto's bind
            port = _free_port()
            env = {**os.environ, "INITIAL_NO_AUTH_ACTION_COUNT": str(_UNAUTHENTICATED_ACTIONS)}
            env.pop("AWS_ENDPOINT_URL", None)
            log = tempfile.TemporaryFile()  # noqa: SIM115  (lives as long as the server; stop() closes it)
            process = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                env=env,
            )
            server = cls(process, port, log)
            error = server._wait_until_answering()
            if error is None:
                try:
                    server._provision(bucket)
                except Exception:
                    server.stop()
                    raise
                return server
            last_error = error
            server.stop()
        _unavailable(f"moto's S3 server did not start on loopback: {last_error}")
        raise AssertionError("unreachable")  # pytest.fail/skip raised

    def _wait_until_answering(self) -> str | None:
        deadline = time.monotonic() + START_TIMEOUT_SECONDS
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                self.log.seek(0)
                tail = self.log.read().decode(errors="replace").strip().splitlines()[-1:] or ["no output"]
                return f"exited with {self.process.returncode}: {tail[0]}"
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=1):
                    return None
            except OSError:
                time.sleep(0.1)
        return f"no answer on port {self.port} within {START_TIMEOUT_SECONDS:.0f} s"

    def client(self, service: str, keys: Keys | None = None) -> Any:
        """A boto3 client for the test's own look into the server (admin keys unless told)."""
        import boto3

        keys = keys or self.admin
        return boto3.client(
            service,
            endpoint_url=self.endpoint,
            region_name=REGION,
            aws_access_key_id=keys.access_key_id or "bootstrap",
            aws_secret_access_key=keys.secret_access_key or "bootstrap",
        )

    def _user(self, iam: Any, name: str, actions: list[str], resources: list[str]) -> Keys:
        iam.create_user(UserName=name)
        policy = {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": actions, "Resource": resources}]}
        iam.put_user_policy(UserName=name, PolicyName=f"{name}-policy", PolicyDocument=json.dumps(policy))
        key = iam.create_access_key(UserName=name)["AccessKey"]
        return Keys(key["AccessKeyId"], key["SecretAccessKey"])

    def _provision(self, bucket: str) -> None:
        self.admin = self._user(self.client("iam"), "tetherless-test-admin", ["s3:*", "iam:*"], ["*"])
        self.bucket = bucket
        self.client("s3").create_bucket(Bucket=bucket)
        self.relay = self._user(
            self.client("iam"),
            "tetherless-relay",
            [spelling for action in RELAY_ACTIONS for spelling in (action, *_MOTO_SPELLINGS.get(action, ()))],
            [f"arn:aws:s3:::{bucket}", f"arn:aws:s3:::{bucket}/*"],
        )

    def environment(self) -> dict[str, str]:
        """The relay user's settings, as ``S3Storage.from_environment`` and the relay read them."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint,
            "AWS_ACCESS_KEY_ID": self.relay.access_key_id,
            "AWS_SECRET_ACCESS_KEY": self.relay.secret_access_key,
            "AWS_REGION": REGION,
            "TETHERLESS_BLOB_BUCKET": self.bucket,
        }

    def object_keys(self, bucket: str | None = None) -> list[str]:
        """Every object key in the bucket (paginated)."""
        s3 = self.client("s3")
        keys: list[str] = []
        for page in s3.get_paginator("list_objects_v2").paginate(Bucket=bucket or self.bucket):
            keys.extend(item["Key"] for item in page.get("Contents", []))
        return sorted(keys)

    def multipart_uploads(self, bucket: str | None = None) -> list[tuple[str, str]]:
        """(key, upload id) of every unfinished multipart upload in the bucket."""
        s3 = self.client("s3")
        found: list[tuple[str, str]] = []
        for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=bucket or self.bucket):
            found.extend((item["Key"], item["UploadId"]) for item in page.get("Uploads", []))
        return sorted(found)

    def scan_bucket_for(self, marker: bytes, bucket: str | None = None) -> list[str]:
        """The keys of the objects whose bytes contain ``marker`` (the canary check).

        Reads every object, tails included, whole. Parts of an unfinished
        multipart upload cannot be read through the S3 API: a scan that must
        cover them completes or aborts the uploads first (the e2e tests scan
        after the upload completed).
        """
        s3 = self.client("s3")
        return [
            key
            for key in self.object_keys(bucket)
            if marker in s3.get_object(Bucket=bucket or self.bucket, Key=key)["Body"].read()
        ]

    def stop(self) -> None:
        """Kill the server and reap it. Idempotent."""
        if self.process.poll() is None:
            self.process.kill()
        self.process.wait()
        self.log.close()
