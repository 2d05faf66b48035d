"""Blob storage backends under test: the files backend on tmp_path and S3 on a real moto server on loopback.

``s3_server`` starts one moto server per test session (tests/support/s3_server.py: signatures and
the relay user's IAM policy are checked); under ``CI=true`` a server that cannot start fails the tests.
``backend`` is the contract suite's parameter: it opens a storage and says what a key left behind.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from relay.blobs.base import BlobStorage
from tests.support.s3_server import MotoS3Server

MIB = 1024 * 1024
PART_BYTES = 5 * MIB  # S3's minimum part size, the smallest the S3 backend accepts (min_part_bytes)


@pytest.fixture(scope="session")
def s3_server() -> Iterator[MotoS3Server]:
    server = MotoS3Server.start()
    try:
        yield server
    finally:
        server.stop()


@dataclass
class Backend:
    """One backend for the contract suite: how to open it and how to see what it keeps."""

    name: str
    root: Path | None = None  # files
    server: MotoS3Server | None = None  # s3
    part_bytes: int = PART_BYTES  # the S3 part size the tests cross; the files backend has none, the same sizes apply

    @asynccontextmanager
    async def open(self, **settings: Any) -> AsyncIterator[BlobStorage]:
        storage: BlobStorage
        if self.server is not None:
            from relay.blobs.s3 import S3Storage

            storage = S3Storage.from_environment(
                self.server.bucket, self.server.environment(), min_part_bytes=PART_BYTES, **settings
            )
        else:
            from relay.blobs.files import FileStorage  # type: ignore[import-not-found,unused-ignore]

            assert self.root is not None
            storage = FileStorage(self.root, **settings)
        try:
            yield storage
        finally:
            await storage.aclose()

    def leftovers(self, key: str) -> list[str]:
        """Everything stored for ``key``: objects (blob and tails) and unfinished multipart uploads, or files."""
        if self.server is not None:
            objects = [name for name in self.server.object_keys() if key in name]
            uploads = [f"multipart upload of {name}" for name, _ in self.server.multipart_uploads() if key in name]
            return objects + uploads
        assert self.root is not None
        return [str(path) for path in self.root.rglob("*") if path.is_file() and key in str(path)]


@pytest.fixture(params=["files", "s3"])
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Backend:
    if request.param == "files":
        root = tmp_path / "blobs"
        root.mkdir()
        return Backend("files", root=root)
    return Backend("s3", server=request.getfixturevalue("s3_server"))
