"""A device's keys and small state, in a local directory (the client's ``--home``).

Layout::

    <home>/            0700
      device.json      0600  keys, relay URL, account/device ids, address, name
      state.json       0600  inbox cursor

Files are JSON (bytes as base64) so that a human can inspect what is stored;
every write is atomic (temporary file, fsync, rename, fsync of the directory)
so a crash leaves either the old or the new file, never half of one.

Like ssh, loading refuses a home directory or key file that other users can
read or write (:class:`InsecurePermissionsError`): a key that others could read
must be considered leaked, and one they could write could be swapped.

The keys are not yet encrypted at rest (DESIGN.md §8 asks for it; a later
issue adds an Argon2id-derived key or the OS keyring); the permissions are
the protection for now.
"""

from __future__ import annotations

import contextlib
import os
import stat
from pathlib import Path
from typing import Annotated, Final

import msgspec
import nacl.public
import nacl.signing
from msgspec import Meta

KEY_FILE: Final = "device.json"
STATE_FILE: Final = "state.json"
FORMAT_VERSION: Final = 1

Key32 = Annotated[bytes, Meta(min_length=32, max_length=32)]


class KeystoreError(Exception):
    """Base of keystore problems; the message is meant for the user."""


class NotInitialisedError(KeystoreError):
    """No device in this home directory (run ``tetherless device init``)."""


class AlreadyInitialisedError(KeystoreError):
    """A device exists already; refusing to overwrite its keys."""


class InsecurePermissionsError(KeystoreError):
    """The home directory or a file in it is accessible to other users."""


class CorruptKeystoreError(KeystoreError):
    """A file exists but cannot be parsed."""


class DeviceKeys(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a device needs to talk to its relay. ``signing_seed`` and ``box_private_key`` are secret."""

    signing_seed: Key32
    box_private_key: Key32
    relay_url: str
    account_id: str
    device_id: str
    address: str
    device_name: str
    ca_file: str | None = None
    format_version: int = FORMAT_VERSION

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.signing_seed)

    @property
    def sign_public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def box_public_key(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.box_private_key).public_key)

    def __repr__(self) -> str:
        # Never let a secret reach a log line or a traceback through repr().
        return f"DeviceKeys(address={self.address!r}, relay_url={self.relay_url!r})"


class ClientState(msgspec.Struct, kw_only=True):
    """Small mutable client state. ``inbox_cursor``: everything up to it was processed."""

    inbox_cursor: int = 0


def _atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` with ``data`` (mode 0600) so that a crash leaves the old or the new file."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o600)
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    # The rename is durable only once the directory entry is.
    dir_fd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _check_private(path: Path, *, what: str) -> None:
    info = path.stat()
    if info.st_mode & 0o077:
        raise InsecurePermissionsError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod {'700' if path.is_dir() else '600'} {path}"
        )
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise InsecurePermissionsError(f"{what} {path} is owned by another user")


class Keystore:
    """The device files under one home directory. Methods are blocking (small local files)."""

    def __init__(self, home: str | os.PathLike[str]) -> None:
        self.home = Path(home)
        self.key_path = self.home / KEY_FILE
        self.state_path = self.home / STATE_FILE

    def exists(self) -> bool:
        return self.key_path.exists()

    def create(self, keys: DeviceKeys) -> None:
        """Store a new device's keys; creates the home directory (0700).

        Raises :class:`AlreadyInitialisedError` rather than overwrite existing keys,
        and :class:`InsecurePermissionsError` when an existing home is too open.
        """
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not any(self.home.iterdir()):
            # We made it (or it was empty): make sure the umask did not widen it.
            self.home.chmod(0o700)
        _check_private(self.home, what="home directory")
        if self.key_path.exists():
            raise AlreadyInitialisedError(f"a device already exists in {self.home}")
        _atomic_write(self.key_path, msgspec.json.encode(keys))

    def load(self) -> DeviceKeys:
        """The stored device keys.

        Raises :class:`NotInitialisedError`, :class:`InsecurePermissionsError` or
        :class:`CorruptKeystoreError`.
        """
        if not self.key_path.exists():
            raise NotInitialisedError(f"no device in {self.home}; run `tetherless device init --relay URL` first")
        _check_private(self.home, what="home directory")
        _check_private(self.key_path, what="key file")
        try:
            keys = msgspec.json.decode(self.key_path.read_bytes(), type=DeviceKeys)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptKeystoreError(f"cannot read {self.key_path}: {exc}") from exc
        if keys.format_version != FORMAT_VERSION:
            raise CorruptKeystoreError(f"{self.key_path} has unknown format version {keys.format_version}")
        return keys

    def load_state(self) -> ClientState:
        """The stored state (defaults when there is none). Raises :class:`CorruptKeystoreError`."""
        if not self.state_path.exists():
            return ClientState()
        _check_private(self.state_path, what="state file")
        try:
            return msgspec.json.decode(self.state_path.read_bytes(), type=ClientState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptKeystoreError(f"cannot read {self.state_path}: {exc}") from exc

    def save_state(self, state: ClientState) -> None:
        """Atomically replace the state file."""
        _atomic_write(self.state_path, msgspec.json.encode(state))

    def save_cursor(self, cursor: int) -> None:
        """Remember that everything up to ``cursor`` was processed (never moves backwards)."""
        state = self.load_state()
        if cursor > state.inbox_cursor:
            state.inbox_cursor = cursor
            self.save_state(state)
