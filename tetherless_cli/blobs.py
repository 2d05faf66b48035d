"""``tetherless send ADDRESS --file PATH`` and ``tetherless blob get REF``: files, end-to-end encrypted
(docs/cli.md "Files"; the SDK side is :mod:`protocol.client.blobs`, docs/decisions/0014-media-blobs.md D6).

Imported only when a file is sent or fetched (``send --text`` stays lean: tests/cli/test_startup.py). Output:
``send --file`` prints what ``send`` prints (the message id once delivered, ``queued (…)`` while it waits); ``blob
get`` prints the path it wrote. A progress line on stderr only at a terminal; one error line otherwise (the
front door's :data:`tetherless_cli.main.LOCAL_ERRORS` prints a :class:`~protocol.client.blobs.MediaError` as
``tetherless: error: CODE: …``, exit 1).
"""

from __future__ import annotations

import argparse
import base64
import binascii
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

from protocol.client import blobs
from protocol.client.home import open_store
from protocol.client.http import TLSSetupError, TransportError
from protocol.client.keystore import DeviceKeys, Keystore
from protocol.client.sdk import RelayClient
from protocol.client.store import ClientStore
from protocol.errors import ErrorCode, RemoteError
from tetherless_cli.contacts import label, resolve_recipient
from tetherless_cli.exits import EXIT_OK, UsageError
from tetherless_cli.home import load
from tetherless_cli.messages import deliver, message_id_text
from tetherless_cli.progress import StatusLine


class TransferProgress(StatusLine):
    """``uploading report.pdf: 12.0 of 30.5 MiB (39%)`` on ``stream``, rewritten in place at most ten times a
    second, only when ``stream`` is a terminal (nothing at all on a pipe); the last state of a transfer is always
    drawn. The drawing is :class:`~tetherless_cli.progress.StatusLine`'s (``clear``, never raising for the
    stream's sake); called as a :data:`protocol.client.blobs.Progress`."""

    def __init__(self, stream: TextIO, label: str, *, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__(stream, clock=clock)
        self._label = label

    def __call__(self, phase: str, done: int, total: int) -> None:
        if not self.due(final=done >= total):
            return
        percent = 100 * done // total if total else 100
        self.draw(f"{phase} {self._label}: {_mib(done)} of {_mib(total)} MiB ({percent}%)")


def _mib(count: int) -> str:
    return f"{count / 1024 / 1024:.1f}"


# -- send --file ----------------------------------------------------------------------------------------------


async def run_send_file(args: argparse.Namespace, keystore: Keystore, keys: DeviceKeys) -> int:
    """``send ADDRESS --file PATH [--name N] [--content-type T]``: upload (or continue the upload of) PATH, queue
    the file message, one flush attempt — then ``send``'s outcome line. When the relay cannot be reached the
    upload waits (``queued (offline …)``, exit 0): the next ``send --file`` of PATH or ``sync`` continues it."""
    store = open_store(keystore, keys)
    address = resolve_recipient(store, args.address)
    contact = label(store, address)
    progress = TransferProgress(sys.stderr, Path(args.name or args.file).name)
    try:
        async with RelayClient.connect(
            keys.relay_url, keys=keys, max_attempts=3, request_timeout_seconds=30, local_db=store.db
        ) as client:
            entry = await blobs.send_file(
                client, store, address, args.file, name=args.name, content_type=args.content_type, progress=progress
            )
    except TLSSetupError:
        raise
    except TransportError as exc:
        progress.clear()
        to = f" for {contact}" if contact else ""
        print(f"queued{to} (offline: {exc}; the upload continues with `tetherless sync`)", flush=True)
        return EXIT_OK
    except blobs.MediaError as exc:
        progress.clear()
        if exc.code == "upload_stalled":
            print(f"queued (upload interrupted: {exc.detail})", flush=True)
            return EXIT_OK
        raise
    except RemoteError as exc:
        progress.clear()
        raise _explained(exc) from exc
    progress.clear()
    return await deliver(keys, store, entry, contact)


def _explained(exc: RemoteError) -> Exception:
    """The relay's refusal of an upload, with what the user can do about it."""
    if exc.code in (ErrorCode.BLOB_TOO_LARGE, ErrorCode.BODY_TOO_LARGE):
        return blobs.MediaError("file_too_large", f"the relay refuses a file that large ({exc.detail or exc.code})")
    if exc.code is ErrorCode.BLOB_QUOTA_EXCEEDED:
        return blobs.MediaError(
            exc.code.value, f"this account's media quota on the relay is full ({exc.detail or 'no detail'})"
        )
    return exc


async def resume_pending(keys: DeviceKeys, store: ClientStore) -> None:
    """``sync``'s first step when a ``send --file`` stopped mid-upload (``kill -9``): continue each upload and
    queue its file message (the engine sends it next). Problems are warnings: the sync goes on."""
    progress = TransferProgress(sys.stderr, "a file")
    try:
        async with RelayClient.connect(keys.relay_url, keys=keys, max_attempts=3, local_db=store.db) as client:
            queued = await blobs.resume_uploads(
                client, store, progress=progress, dropped=lambda state, exc: _warn_dropped(progress, state, exc)
            )
    except (TransportError, RemoteError, blobs.MediaError) as exc:
        progress.clear()
        print(f"tetherless: warning: an unfinished file upload waits: {exc}", file=sys.stderr, flush=True)
        return
    progress.clear()
    for entry in queued:
        print(f"tetherless: resumed an upload: message id {message_id_text(entry.message_uid)}", file=sys.stderr)


def _warn_dropped(progress: TransferProgress, state: blobs.UploadState, exc: blobs.MediaError) -> None:
    progress.clear()
    print(
        f"tetherless: warning: the unfinished upload of {state.path} was dropped ({exc.code}: the file changed or "
        "is gone since `send --file`); send it again to upload it as it is now",
        file=sys.stderr,
        flush=True,
    )


# -- blob get -------------------------------------------------------------------------------------------------


def parse_ref(text: str) -> bytes:
    """``blob get``'s REF: a message id as ``send`` and ``sync --json`` print it (unpadded base32); raises
    :class:`UsageError` otherwise."""
    cleaned = text.strip().upper()
    try:
        uid = base64.b32decode(cleaned + "=" * (-len(cleaned) % 8))
    except (binascii.Error, ValueError) as exc:
        raise UsageError(f"not a message id: {text!r} (use file.ref from `sync --json`)") from exc
    if not uid or message_id_text(uid) != text.strip().lower():
        raise UsageError(f"not a message id: {text!r} (use file.ref from `sync --json`)")
    return uid


async def cmd_blob_get(args: argparse.Namespace) -> int:
    """``blob get REF [-o PATH] [--force]``: download (or take from the media cache), verify and decrypt the file
    of message REF; prints the path written. Exit 1 with one line for a digest or commitment mismatch (nothing
    is written), a refused capability (``blob_not_found``), an existing PATH without ``--force``."""
    uid = parse_ref(args.ref)
    keystore, keys = load(args)
    store = open_store(keystore, keys)
    _, ref = blobs.find_file(store, uid)
    args.relay_url = blobs.relay_url_for(ref.relay, keys)  # named by a connection error
    cache = blobs.MediaCache(keystore.home, store.db)
    progress = TransferProgress(sys.stderr, ref.safe_name())
    try:
        written = await blobs.download(
            ref,
            args.output,
            cache=cache,
            relay=lambda r: blobs.blob_relay(r, keys, request_timeout_seconds=30),
            force=args.force,
            progress=progress,
        )
    finally:
        progress.clear()
    print(written, flush=True)
    return EXIT_OK


__all__ = ["TransferProgress", "cmd_blob_get", "parse_ref", "resume_pending", "run_send_file"]
