"""A device's keys and local state, in a local directory (the client's ``--home``), encrypted at rest.

Layout (crypto.md §13)::

    <home>/            0700
      keystore.tlk     0600  the DEK and the device keys, wrapped under a passphrase-derived key (KEK)
      state.db         0600  SQLite (WAL): every other piece of state, sealed row by row with the DEK
                             (:mod:`protocol.client.localdb`)
      identity.json    0600  public copy of the device's address and relay URL, for ``whoami`` without the
                             passphrase (:mod:`protocol.client.identity`; written on create and every unlock)

``keystore.tlk`` is::

    "TLKS" ‖ format u8 = 1 ‖ method u8 (1 = passphrase, 2 = OS keyring)
    method 1: salt[16] ‖ iterations u32 ‖ memory_kib u32 ‖ lanes u8
    method 2: item_len u16 ‖ item (UTF-8 "tetherless:<device-id>")
    ‖ nonce[24] ‖ XChaCha20-Poly1305(KEK, nonce, msgpack(KeystorePayload {dek, keys}), aad = all bytes before the nonce)

With a passphrase, ``KEK = Argon2id(NFC(passphrase), salt, iterations,
memory_kib, lanes, 32)``; the parameters travel in the header. New files use
RFC 9106's second recommended option (3 iterations, 64 MiB, 4 lanes), and a
file whose parameters are below it (fewer iterations or less memory) is
refused (:class:`WeakKdfError`) — **unless** ``TETHERLESS_INSECURE_KDF=1`` is
set, which also makes new files use 1 iteration, 8 KiB, 1 lane: *for tests
and CI only*, it makes the passphrase as cheap to guess as a plain hash. Such a
home stays marked by its own header (:meth:`Keystore.insecure_kdf_marked`)
until the keystore is re-wrapped at full cost, and the command line warns on
every command while the variable is set. Argon2id is
``cryptography``'s (OpenSSL) implementation: libsodium's ``crypto_pwhash``
(PyNaCl) fixes lanes at 1 and cannot compute the RFC 9106 parameter set.

The OS keyring (method 2) is offered only when the optional ``keyring``
package is importable and its backend is a real one (not the ``fail``,
``null`` or plaintext backends); the KEK is then 32 random bytes kept as
that item's secret.

Homes of the first format (``device.json`` and ``state.json``, keys in plain
JSON) are still read; :meth:`Keystore.protect` (``tetherless device
protect``) converts one: the new files are written and made durable first,
then the plaintext files are deleted (best effort on SSDs: the old blocks may
survive on the medium).

Like ssh, loading refuses a home directory or key file that other users can
read or write (:class:`InsecurePermissionsError`): a key that others could read
must be considered leaked, and one they could write could be swapped. Every
write is atomic (temporary file, fsync, rename, fsync of the directory).

The passphrase comes from the ``passphrase`` argument (a string, or a
callable asked only when the keystore actually needs one), else the
environment variable ``TETHERLESS_PASSPHRASE``; else loading raises
:class:`PassphraseRequiredError`. The CLI adds ``--passphrase-file`` and an
interactive prompt.
"""

from __future__ import annotations

import contextlib
import hmac
import os
import stat
import struct
import unicodedata
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any, Final

import msgspec
import nacl.bindings
import nacl.exceptions
import nacl.public
import nacl.signing
from cryptography.hazmat.primitives.kdf.argon2 import Argon2id
from msgspec import Meta

from ..handshake import MLKEM_SEED_BYTES, mlkem_public
from ..signing import digest
from .identity import IDENTITY_FILE, encode_identity
from .localdb import DB_FILE, DEK_BYTES, NONCE_BYTES, LocalDB
from .localdb import atomic_write as _atomic_write
from .localdb import fsync_dir as _fsync_dir
from .store import SEALED_COLUMNS, migrate

KEYSTORE_FILE: Final = "keystore.tlk"
KEY_FILE: Final = "device.json"  # format 1 (plaintext), still read
STATE_FILE: Final = "state.json"  # format 1 (plaintext), still read
FORMAT_VERSION: Final = 1
MAGIC: Final = b"TLKS"
KEYSTORE_FORMAT: Final = 1
METHOD_PASSPHRASE: Final = 1
METHOD_KEYRING: Final = 2
SALT_BYTES: Final = 16
KEK_BYTES: Final = 32
PASSPHRASE_ENV: Final = "TETHERLESS_PASSPHRASE"
INSECURE_KDF_ENV: Final = "TETHERLESS_INSECURE_KDF"
#: Replaced by ``TETHERLESS_INSECURE_KDF=1``; a leftover ``test`` value is refused with a message saying so.
KDF_PROFILE_ENV: Final = "TETHERLESS_KDF_PROFILE"
KEYRING_SERVICE: Final = "tetherless"
KEM_SEED_BYTES: Final = MLKEM_SEED_BYTES
STATE_TABLE: Final = "client_state"

Key32 = Annotated[bytes, Meta(min_length=32, max_length=32)]
PassphraseSource = str | Callable[[], str]


class KdfParams(msgspec.Struct, frozen=True):
    """Argon2id cost parameters (RFC 9106 names: t = iterations, m = memory in KiB, p = lanes)."""

    iterations: int
    memory_kib: int
    lanes: int


#: RFC 9106 §4, second recommended option (for memory-constrained environments).
KDF_DEFAULT: Final = KdfParams(iterations=3, memory_kib=64 * 1024, lanes=4)
#: TESTS AND CI ONLY (``TETHERLESS_INSECURE_KDF=1``): as cheap as Argon2id gets; never use for real keys.
KDF_TEST: Final = KdfParams(iterations=1, memory_kib=8, lanes=1)
KDF_PROFILES: Final = {"default": KDF_DEFAULT, "test": KDF_TEST}
_KDF_LIMITS: Final = KdfParams(iterations=64, memory_kib=4 * 1024 * 1024, lanes=64)  # refuse absurd headers


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


class WeakKdfError(KeystoreError):
    """The keystore's Argon2id parameters are below RFC 9106's second recommended option."""


class PassphraseRequiredError(KeystoreError):
    """The keystore needs a passphrase and none was provided."""


class WrongPassphraseError(KeystoreError):
    """The keystore did not open: wrong passphrase (or keyring secret), or the file was changed."""


class KeyringUnavailableError(KeystoreError):
    """The keystore uses the OS keyring, which is not usable here."""


class NotProtectedError(KeystoreError):
    """A format-1 (plaintext) home where an encrypted one is needed (run ``tetherless device protect``)."""


class DeviceKeys(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """Everything a device needs to talk to its relay. ``signing_seed``, ``box_private_key`` and ``kem_seed``
    are secret.

    ``list_format``: the format of the account's device list when this device
    joined (1 = protocol.md §4, 2 = crypto.md §3, 3 = crypto.md §3.6).
    ``kem_seed``: the 64-byte seed ``d‖z`` of the device's long-term
    ML-KEM-768 key (its encapsulation key is the ``kem_key`` of its format-3
    entry); empty in homes made before format 3 until
    :meth:`Keystore.ensure_kem_key` adds it. A payload without the field
    decodes with the default and older clients ignore it, so the keystore
    format number does not change; an empty one is not encoded, so a home
    without it keeps its exact bytes. (The older optional fields have
    ``default_factory`` defaults, which msgspec always encodes, as before.)
    """

    signing_seed: Key32
    box_private_key: Key32
    relay_url: str
    account_id: str
    device_id: str
    address: str
    device_name: str
    ca_file: str | None = msgspec.field(default_factory=lambda: None)
    format_version: int = msgspec.field(default_factory=lambda: FORMAT_VERSION)
    list_format: int = msgspec.field(default_factory=lambda: 1)
    kem_seed: Annotated[bytes, Meta(max_length=KEM_SEED_BYTES)] = b""

    @property
    def signing_key(self) -> nacl.signing.SigningKey:
        return nacl.signing.SigningKey(self.signing_seed)

    @property
    def sign_public_key(self) -> bytes:
        return bytes(self.signing_key.verify_key)

    @property
    def box_public_key(self) -> bytes:
        return bytes(nacl.public.PrivateKey(self.box_private_key).public_key)

    @property
    def kem_public_key(self) -> bytes:
        """The ML-KEM-768 encapsulation key (1184 bytes), or ``b""`` while the home has no ``kem_seed``."""
        return mlkem_public(self.kem_seed) if self.kem_seed else b""

    @property
    def account_address(self) -> str:
        """``account@relay``: the address that reaches every device of the account."""
        return self.address.split(".", 1)[1]

    def __repr__(self) -> str:
        # Never let a secret reach a log line or a traceback through repr().
        return f"DeviceKeys(address={self.address!r}, relay_url={self.relay_url!r})"


class KeystorePayload(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """What ``keystore.tlk`` wraps: the local-state key and the device keys.

    ``state_generation``: see the field. ``previous_dek``: set only while a DEK rotation
    (:meth:`Keystore.change_passphrase`) is under way:
    ``state.db`` may still be sealed under it until the re-sealing transaction commits (crypto.md §13).
    Empty otherwise, and then not encoded (older files keep their exact bytes).
    """

    dek: Key32
    keys: DeviceKeys
    previous_dek: Annotated[bytes, Meta(max_length=DEK_BYTES)] = b""
    #: The newest ``state.db`` generation this home opened (crypto.md §13.2): the counter kept apart from
    #: the state. 0 (not encoded) in homes made before it.
    state_generation: int = 0

    def __repr__(self) -> str:
        return f"KeystorePayload(keys={self.keys!r})"


class ClientState(msgspec.Struct, kw_only=True):
    """Small mutable client state. ``inbox_cursor``: everything up to it was processed."""

    inbox_cursor: int = 0


# -- file helpers ------------------------------------------------------------------------


def _check_private(path: Path, *, what: str) -> None:
    info = path.stat()
    if info.st_mode & 0o077:
        raise InsecurePermissionsError(
            f"{what} {path} is accessible by other users (mode {stat.S_IMODE(info.st_mode):04o}); "
            f"run: chmod {'700' if path.is_dir() else '600'} {path}"
        )
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        raise InsecurePermissionsError(f"{what} {path} is owned by another user")


# -- the keystore file format (pure given its inputs) ---------------------------------------


def insecure_kdf() -> bool:
    """True when ``TETHERLESS_INSECURE_KDF=1``: weak Argon2id parameters are allowed (tests and CI only).

    Raises :class:`KeystoreError` for any other non-empty value, and for the variable it replaced
    (``TETHERLESS_KDF_PROFILE=test``), so a script that meant to opt in never silently gets the opposite.
    """
    value = os.environ.get(INSECURE_KDF_ENV, "").strip()
    if value not in ("", "0", "1"):
        raise KeystoreError(f"{INSECURE_KDF_ENV}={value!r}: set it to 1 (tests only) or leave it unset")
    profile = os.environ.get(KDF_PROFILE_ENV, "").strip().lower()
    if profile not in ("", "default") and value != "1":
        raise KeystoreError(f"{KDF_PROFILE_ENV}={profile!r} is no longer read: use {INSECURE_KDF_ENV}=1 (tests only)")
    return value == "1"


def kdf_profile() -> KdfParams:
    """The cost for new keystores: RFC 9106's second option, or :data:`KDF_TEST` under :func:`insecure_kdf`."""
    return KDF_TEST if insecure_kdf() else KDF_DEFAULT


def kdf_is_weak(params: KdfParams) -> bool:
    """True when ``params`` cost less than :data:`KDF_DEFAULT` (fewer iterations or less memory).

    Lanes are not compared: they set parallelism, not the work an attacker must do per guess.
    """
    return params.iterations < KDF_DEFAULT.iterations or params.memory_kib < KDF_DEFAULT.memory_kib


def check_kdf_strength(params: KdfParams, *, path: Path) -> None:
    """Refuse a keystore below RFC 9106's second option unless :func:`insecure_kdf`; raises :class:`WeakKdfError`.

    Checked before deriving anything: a relay-independent attacker who can write the home could otherwise
    swap in a cheap keystore and learn the next passphrase typed from a fast offline search.
    """
    if kdf_is_weak(params) and not insecure_kdf():
        raise WeakKdfError(
            f"{path} uses Argon2id t={params.iterations} m={params.memory_kib} KiB p={params.lanes}, below "
            f"RFC 9106's second recommended option (t=3, m=64 MiB): refusing to open it "
            f"(a keystore made for tests; {INSECURE_KDF_ENV}=1 opens it anyway)"
        )


def derive_kek(passphrase: str, salt: bytes, params: KdfParams) -> bytes:
    """``Argon2id(NFC(passphrase), salt, params, 32)`` (RFC 9106)."""
    secret = unicodedata.normalize("NFC", passphrase).encode("utf-8")
    return Argon2id(
        salt=salt, length=KEK_BYTES, iterations=params.iterations, lanes=params.lanes, memory_cost=params.memory_kib
    ).derive(secret)


def passphrase_header(salt: bytes, params: KdfParams) -> bytes:
    if len(salt) != SALT_BYTES:
        raise ValueError(f"salt must be {SALT_BYTES} bytes")
    return (
        MAGIC
        + bytes([KEYSTORE_FORMAT, METHOD_PASSPHRASE])
        + salt
        + struct.pack(">IIB", params.iterations, params.memory_kib, params.lanes)
    )


def keyring_header(item: str) -> bytes:
    raw = item.encode("utf-8")
    return MAGIC + bytes([KEYSTORE_FORMAT, METHOD_KEYRING]) + struct.pack(">H", len(raw)) + raw


def seal_keystore(header: bytes, kek: bytes, payload: KeystorePayload, nonce: bytes) -> bytes:
    """``header ‖ nonce ‖ XAEAD(kek, nonce, msgpack(payload), aad = header)``."""
    body = msgspec.msgpack.encode(payload)
    return header + nonce + nacl.bindings.crypto_aead_xchacha20poly1305_ietf_encrypt(body, header, nonce, kek)


class KeystoreHeader(msgspec.Struct, frozen=True):
    """A parsed ``keystore.tlk`` header; ``raw`` is the associated data (everything before the nonce)."""

    method: int
    raw: bytes
    salt: bytes = b""
    params: KdfParams | None = None
    item: str = ""


def parse_keystore(data: bytes) -> tuple[KeystoreHeader, bytes, bytes]:
    """``(header, nonce, ciphertext)``; raises :class:`CorruptKeystoreError`."""
    if len(data) < 6 or data[:4] != MAGIC:
        raise CorruptKeystoreError("not a Tetherless keystore (no TLKS header)")
    if data[4] != KEYSTORE_FORMAT:
        raise CorruptKeystoreError(f"unknown keystore format {data[4]}")
    method, pos = data[5], 6
    header: KeystoreHeader
    if method == METHOD_PASSPHRASE:
        end = pos + SALT_BYTES + 9
        if len(data) < end:
            raise CorruptKeystoreError("truncated keystore header")
        salt = data[pos : pos + SALT_BYTES]
        iterations, memory_kib, lanes = struct.unpack(">IIB", data[pos + SALT_BYTES : end])
        params = KdfParams(iterations=iterations, memory_kib=memory_kib, lanes=lanes)
        if not (
            1 <= iterations <= _KDF_LIMITS.iterations
            and 1 <= lanes <= _KDF_LIMITS.lanes
            and 8 * lanes <= memory_kib <= _KDF_LIMITS.memory_kib
        ):
            raise CorruptKeystoreError(f"keystore KDF parameters out of range: {params}")
        header = KeystoreHeader(method=method, raw=data[:end], salt=salt, params=params)
    elif method == METHOD_KEYRING:
        if len(data) < pos + 2:
            raise CorruptKeystoreError("truncated keystore header")
        (length,) = struct.unpack(">H", data[pos : pos + 2])
        end = pos + 2 + length
        if len(data) < end:
            raise CorruptKeystoreError("truncated keystore header")
        try:
            item = data[pos + 2 : end].decode("utf-8")
        except UnicodeDecodeError:
            raise CorruptKeystoreError("keystore keyring item is not UTF-8") from None
        header = KeystoreHeader(method=method, raw=data[:end], item=item)
    else:
        raise CorruptKeystoreError(f"unknown keystore method {method}")
    nonce, ciphertext = data[end : end + NONCE_BYTES], data[end + NONCE_BYTES :]
    if len(nonce) != NONCE_BYTES or len(ciphertext) < 16:
        raise CorruptKeystoreError("truncated keystore")
    return header, nonce, ciphertext


def open_keystore(header: KeystoreHeader, nonce: bytes, ciphertext: bytes, kek: bytes) -> KeystorePayload:
    """Decrypt and decode; raises :class:`WrongPassphraseError` or :class:`CorruptKeystoreError`."""
    try:
        body = nacl.bindings.crypto_aead_xchacha20poly1305_ietf_decrypt(ciphertext, header.raw, nonce, kek)
    except nacl.exceptions.CryptoError:
        what = "passphrase" if header.method == METHOD_PASSPHRASE else "keyring secret"
        raise WrongPassphraseError(f"the keystore does not open: wrong {what}, or the file was changed") from None
    try:
        payload = msgspec.msgpack.decode(body, type=KeystorePayload)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise CorruptKeystoreError(f"keystore contents do not decode: {exc}") from exc
    if payload.keys.format_version != FORMAT_VERSION:
        raise CorruptKeystoreError(f"keystore has unknown key format version {payload.keys.format_version}")
    return payload


def legacy_dek(signing_seed: bytes) -> bytes:
    """The DEK that seals ``state.db`` in a format-1 home: ``digest("local-dek", signing_seed)``.

    Same derivation as ``protocol.client.store.default_dek``; as secret as the seed it comes from.
    """
    return digest("local-dek", signing_seed)


# -- OS keyring (optional) ---------------------------------------------------------------------


def keyring_available() -> bool:
    """True if the optional ``keyring`` package is importable with a real (secure) backend."""
    return _keyring_module() is not None


def _keyring_module() -> Any:
    try:
        import keyring  # type: ignore[import-not-found, unused-ignore]
    except Exception:
        return None
    try:
        backend = keyring.get_keyring()
    except Exception:
        return None
    module = type(backend).__module__.lower()
    refused = ("keyring.backends.fail", "keyring.backends.null", "keyrings.alt.file", "keyring.backends.chainer")
    if any(module.startswith(name) for name in refused) or "plaintext" in type(backend).__name__.lower():
        if module.startswith("keyring.backends.chainer") and getattr(backend, "backends", None):
            return keyring
        return None
    return keyring


# -- the keystore ------------------------------------------------------------------------------


class Keystore:
    """The device files under one home directory. Methods are blocking (small local files).

    ``passphrase``: a string, or a callable asked at most once and only when
    a passphrase is needed; without it ``$TETHERLESS_PASSPHRASE`` is used.
    The unlocked keys are cached in this object (one KDF run per process).
    """

    def __init__(self, home: str | os.PathLike[str], *, passphrase: PassphraseSource | None = None) -> None:
        self.home = Path(home)
        self.keystore_path = self.home / KEYSTORE_FILE
        self.db_path = self.home / DB_FILE
        self.key_path = self.home / KEY_FILE
        self.state_path = self.home / STATE_FILE
        self._passphrase = passphrase
        self._payload: KeystorePayload | None = None
        self._sealing: tuple[bytes, bytes] | None = None  # (header, KEK) of the open keystore: reseal cheaply
        self._db: LocalDB | None = None

    # -- queries ----------------------------------------------------------------------

    def exists(self) -> bool:
        return self.keystore_path.exists() or self.key_path.exists()

    def is_protected(self) -> bool:
        """True for an encrypted (``keystore.tlk``) home, False for a format-1 plaintext one."""
        return self.keystore_path.exists()

    def _get_passphrase(self, *, purpose: str) -> str:
        source = self._passphrase
        if source is None:
            env = os.environ.get(PASSPHRASE_ENV)
            if env is None:
                raise PassphraseRequiredError(
                    f"a passphrase is needed to {purpose}: set {PASSPHRASE_ENV} or use --passphrase-file FILE"
                )
            value = env
        elif isinstance(source, str):
            value = source
        else:
            value = source()
            self._passphrase = value  # ask once
        if not value:
            raise PassphraseRequiredError("the passphrase is empty")
        return value

    # -- creating ----------------------------------------------------------------------

    def _prepare_home(self) -> None:
        self.home.mkdir(mode=0o700, parents=True, exist_ok=True)
        if not any(self.home.iterdir()):
            # We made it (or it was empty): make sure the umask did not widen it.
            self.home.chmod(0o700)
        _check_private(self.home, what="home directory")

    def create(self, keys: DeviceKeys, *, use_keyring: bool = False) -> None:
        """Store a new device's keys, encrypted (``keystore.tlk``); creates the home directory (0700).

        Raises :class:`AlreadyInitialisedError` rather than overwrite existing keys,
        :class:`InsecurePermissionsError` when an existing home is too open, and
        :class:`PassphraseRequiredError` / :class:`KeyringUnavailableError`.
        """
        self._prepare_home()
        if self.exists():
            raise AlreadyInitialisedError(f"a device already exists in {self.home}")
        payload = KeystorePayload(dek=os.urandom(DEK_BYTES), keys=keys)
        self._write_keystore(payload, use_keyring=use_keyring)
        self._payload = payload
        self._remember_identity(keys)

    def _write_keystore(self, payload: KeystorePayload, *, use_keyring: bool) -> None:
        if use_keyring:
            keyring = _keyring_module()
            if keyring is None:
                raise KeyringUnavailableError("the OS keyring is not available (install `keyring` with a backend)")
            item = f"tetherless:{payload.keys.device_id}"
            kek = os.urandom(KEK_BYTES)
            keyring.set_password(KEYRING_SERVICE, item, kek.hex())
            header = keyring_header(item)
        else:
            passphrase = self._get_passphrase(purpose="protect the keys of this device")
            salt, params = os.urandom(SALT_BYTES), kdf_profile()
            kek = derive_kek(passphrase, salt, params)
            header = passphrase_header(salt, params)
        _atomic_write(self.keystore_path, seal_keystore(header, kek, payload, os.urandom(NONCE_BYTES)))
        self._sealing = (header, kek)

    def insecure_kdf_marked(self) -> bool:
        """True when this home's keystore was written with test-only costs (``TETHERLESS_INSECURE_KDF=1``).

        The mark is the keystore header itself: its Argon2id parameters are in clear and authenticated
        (the header is the AEAD's associated data), so no separate file can be lost or forged apart from it.
        Raises :class:`CorruptKeystoreError` for an unreadable header; False for a keyring or format-1 home.
        """
        if not self.keystore_path.exists():
            return False
        params = parse_keystore(self.keystore_path.read_bytes())[0].params
        return params is not None and kdf_is_weak(params)

    # -- loading -----------------------------------------------------------------------

    def unlock(self) -> KeystorePayload:
        """The DEK and device keys of a protected home (cached after the first call).

        Raises :class:`NotInitialisedError`, :class:`NotProtectedError` (format-1
        home), :class:`InsecurePermissionsError`, :class:`CorruptKeystoreError`,
        :class:`PassphraseRequiredError`, :class:`WrongPassphraseError`,
        :class:`KeyringUnavailableError`.
        """
        if self._payload is not None:
            return self._payload
        if not self.keystore_path.exists():
            if self.key_path.exists():
                raise NotProtectedError(
                    f"{self.home} holds unencrypted keys; run `tetherless --home {self.home} device protect`"
                )
            raise NotInitialisedError(f"no device in {self.home}; run `tetherless device init --relay URL` first")
        _check_private(self.home, what="home directory")
        _check_private(self.keystore_path, what="keystore")
        header, nonce, ciphertext = parse_keystore(self.keystore_path.read_bytes())
        if header.method == METHOD_PASSPHRASE:
            assert header.params is not None
            check_kdf_strength(header.params, path=self.keystore_path)
            kek = derive_kek(self._get_passphrase(purpose=f"unlock {self.home}"), header.salt, header.params)
        else:
            keyring = _keyring_module()
            if keyring is None:
                raise KeyringUnavailableError(
                    f"{self.keystore_path} is protected by the OS keyring, which is not available here"
                )
            secret = keyring.get_password(KEYRING_SERVICE, header.item)
            if not secret:
                raise WrongPassphraseError(f"the OS keyring has no item {header.item!r}")
            kek = bytes.fromhex(secret)
        self._payload = open_keystore(header, nonce, ciphertext, kek)
        self._sealing = (header.raw, kek)
        self._remember_identity(self._payload.keys)
        return self._payload

    def _remember_identity(self, keys: DeviceKeys) -> None:
        """Keep ``identity.json`` (the public copy ``whoami`` reads) equal to the sealed keys' address.

        Best effort: a home that cannot be written (read-only medium) still unlocks; ``whoami`` then unlocks too.
        """
        data = encode_identity(keys.address, keys.relay_url)
        path = self.home / IDENTITY_FILE
        try:
            if path.exists() and path.read_bytes() == data:
                return
            _atomic_write(path, data)
        except OSError:
            pass

    def load(self) -> DeviceKeys:
        """The stored device keys (a protected home is unlocked; a format-1 home is read as before).

        Raises :class:`NotInitialisedError`, :class:`InsecurePermissionsError`,
        :class:`CorruptKeystoreError`, and for protected homes the errors of :meth:`unlock`.
        """
        if self.keystore_path.exists():
            return self.unlock().keys
        return self._load_v1()

    def _load_v1(self) -> DeviceKeys:
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

    def local_db(self) -> LocalDB:
        """The home's ``state.db`` opened with the DEK (one per Keystore; unlocks if needed).

        Every first open checks ``state.db`` against the generation counter kept beside it and advances
        both (:meth:`LocalDB.advance_generation`, crypto.md §13.2), then brings it to the current schema
        (:func:`protocol.client.store.migrate`).

        Raises :class:`NotProtectedError` for a format-1 home (it has no DEK), and
        :class:`~protocol.client.localdb.StateRolledBackError` for an old ``state.db`` put back (nothing is
        opened then; :meth:`recover_from_rollback` is the way on), and the errors of ``migrate``.
        """
        if self._db is None:
            if self.unlock().previous_dek:
                self._finish_dek_rotation()
            payload = self.unlock()
            db = LocalDB.open(self.home, payload.dek)
            try:
                self._record_generation(db.advance_generation(payload.state_generation))
                migrate(db)
            except BaseException:
                db.close()
                raise
            self._db = db
        return self._db

    def recover_from_rollback(self) -> LocalDB:
        """Accept this home's ``state.db`` after :class:`~protocol.client.localdb.StateRolledBackError`: the
        generation counter moves past both sides. The caller must also start every session afresh
        (:func:`protocol.client.sessions.forget_after_rollback`) before sending anything. Returns the
        opened database. Raises the errors of :meth:`unlock`.
        """
        payload = self.unlock()
        if self._db is None:
            if payload.previous_dek:
                self._finish_dek_rotation()
                payload = self.unlock()
            self._db = LocalDB.open(self.home, payload.dek)
        self._record_generation(self._db.accept_generation(payload.state_generation))
        migrate(self._db)
        return self._db

    def _finish_dek_rotation(self) -> None:
        """Complete a rotation that :meth:`change_passphrase` started: re-seal ``state.db`` under the new DEK
        unless that already committed (its check row opens), then drop ``previous_dek`` from the keystore.
        Idempotent; a crash at any point leaves a home that the next call finishes."""
        payload = self.unlock()
        db = LocalDB.open(self.home, payload.dek)
        try:
            done = db.dek_check_opens()
        finally:
            db.close()
        if not done:
            old = LocalDB.open(self.home, payload.previous_dek)
            try:
                migrate(old)  # SEALED_COLUMNS names the current layout: an older file is brought to it first
                old.rekey(payload.dek, SEALED_COLUMNS)
            finally:
                old.close()
        self._reseal(msgspec.structs.replace(payload, previous_dek=b""))

    def _record_generation(self, generation: int) -> None:
        # Re-read first: another process (a `sync --follow` next to a `send`) may have rewritten the keystore
        # since this one unlocked it, and its keys or generation must not be overwritten with older ones.
        header, nonce, ciphertext = parse_keystore(self.keystore_path.read_bytes())
        assert self._sealing is not None  # set by unlock()
        if header.raw != self._sealing[0]:
            return  # re-wrapped meanwhile (new passphrase): the database stays ahead, which is allowed
        current = open_keystore(header, nonce, ciphertext, self._sealing[1])
        if current.state_generation < generation:
            self._reseal(msgspec.structs.replace(current, state_generation=generation))
        else:
            self._payload = current

    def _reseal(self, payload: KeystorePayload) -> None:
        # Same header and KEK as the open keystore: no passphrase prompt, no KDF run; a fresh nonce.
        assert self._sealing is not None  # set by unlock() / _write_keystore()
        header, kek = self._sealing
        _atomic_write(self.keystore_path, seal_keystore(header, kek, payload, os.urandom(NONCE_BYTES)))
        self._payload = payload

    def close(self) -> None:
        """Close the local database, if open, and forget the unlocked keys."""
        if self._db is not None:
            self._db.close()
            self._db = None
        self._payload = None
        self._sealing = None

    # -- small state -------------------------------------------------------------------

    def load_state(self) -> ClientState:
        """The stored state (defaults when there is none). Raises :class:`CorruptKeystoreError`."""
        if self.keystore_path.exists():
            try:
                state = self.local_db().get_struct(STATE_TABLE, "state", ClientState)
            except Exception as exc:
                if isinstance(exc, KeystoreError):
                    raise
                raise CorruptKeystoreError(f"cannot read the client state in {self.db_path}: {exc}") from exc
            return state if state is not None else ClientState()
        if not self.state_path.exists():
            return ClientState()
        _check_private(self.state_path, what="state file")
        try:
            return msgspec.json.decode(self.state_path.read_bytes(), type=ClientState)
        except (msgspec.DecodeError, msgspec.ValidationError) as exc:
            raise CorruptKeystoreError(f"cannot read {self.state_path}: {exc}") from exc

    def save_state(self, state: ClientState) -> None:
        """Durably replace the state."""
        if self.keystore_path.exists():
            db = self.local_db()
            with db.transaction():
                db.put_struct(STATE_TABLE, "state", state)
            return
        _atomic_write(self.state_path, msgspec.json.encode(state))

    def save_cursor(self, cursor: int) -> None:
        """Remember that everything up to ``cursor`` was processed (never moves backwards)."""
        state = self.load_state()
        if cursor > state.inbox_cursor:
            state.inbox_cursor = cursor
            self.save_state(state)

    # -- migration -----------------------------------------------------------------------

    def ensure_kem_key(self, seed: bytes) -> DeviceKeys:
        """The device keys with a long-term ML-KEM-768 key: ``seed`` (64 random bytes) becomes ``kem_seed``
        when the home has none yet (a home made before format 3, crypto.md §3.6); else nothing changes.

        Idempotent: a home that has a ``kem_seed`` keeps it (``seed`` is then unused). The new
        keystore is written atomically under the same header and KEK (no new passphrase prompt, no
        KDF run; a fresh nonce); a format-1 home rewrites ``device.json``. Raises the errors of
        :meth:`load`, ``ValueError`` for a seed that is not 64 bytes. A crash leaves the old or the
        new file; only a device whose list does not yet carry the key may get another one.
        """
        keys = self.load()
        if keys.kem_seed:
            return keys
        if len(seed) != KEM_SEED_BYTES:
            raise ValueError(f"an ML-KEM-768 seed is {KEM_SEED_BYTES} bytes")
        keys = msgspec.structs.replace(keys, kem_seed=bytes(seed))
        if not self.keystore_path.exists():
            _atomic_write(self.key_path, msgspec.json.encode(keys))
            return keys
        self._reseal(msgspec.structs.replace(self.unlock(), keys=keys))
        return keys

    def protect(self, *, use_keyring: bool = False) -> None:
        """Convert a format-1 home: write ``keystore.tlk`` and ``state.db``, then delete the plaintext files.

        Raises :class:`NotInitialisedError`, :class:`KeystoreError` when the home is
        already protected, and the errors of :meth:`create`. A crash in between
        leaves either the old home or both (the next run finishes the deletion).
        """
        if self.keystore_path.exists():
            if self.key_path.exists():
                # An earlier run crashed after writing the new files: check they open, then finish.
                keys = self.unlock().keys
                if not hmac.compare_digest(keys.signing_seed, self._load_v1().signing_seed):
                    raise KeystoreError(f"{self.home} holds two different devices; refusing to delete either")
                self._remove_plaintext()
                return
            raise KeystoreError(f"{self.home} is already protected")
        keys = self._load_v1()
        state = self.load_state()
        # A format-1 home that already has a state.db got it from the sync engine, sealed under a DEK derived
        # from the device seed (protocol.client.store.default_dek): keep that DEK so its rows stay readable.
        dek = legacy_dek(keys.signing_seed) if self.db_path.exists() else os.urandom(DEK_BYTES)
        payload = KeystorePayload(dek=dek, keys=keys)
        self._write_keystore(payload, use_keyring=use_keyring)
        self._payload = payload
        self._remember_identity(keys)
        self.save_state(state)  # into state.db now that keystore.tlk exists
        self._remove_plaintext()

    def _remove_plaintext(self) -> None:
        for path in (self.key_path, self.state_path):
            with contextlib.suppress(FileNotFoundError):
                size = path.stat().st_size
                with path.open("r+b") as file:  # overwrite first: best effort against casual recovery
                    file.write(b"\0" * size)
                    file.flush()
                    os.fsync(file.fileno())
                path.unlink()
        _fsync_dir(self.home)

    def change_passphrase(self, new_passphrase: str, *, rotate_dek: bool = True) -> None:
        """Wrap the keys under ``new_passphrase`` (fresh salt, current KDF profile) and rotate the data key.

        With ``rotate_dek`` (the default) ``state.db`` is re-sealed under a new random DEK, so a copy of the
        old keystore plus the old passphrase no longer opens the local state. Steps, each durable: the
        keystore holds the new DEK and the old one (``previous_dek``); ``state.db`` is re-sealed in one
        transaction; the keystore drops the old DEK. A crash in between is finished by the next
        :meth:`local_db`. Raises the errors of :meth:`unlock`, :class:`~protocol.client.localdb.TamperedRowError`
        (a row that did not open: nothing re-sealed, the old DEK is kept for it) and ``OSError``.
        Cancellation (KeyboardInterrupt) between the steps leaves the same recoverable states.
        """
        payload = self.unlock()
        if self._db is not None:
            self._db.close()
            self._db = None
        if payload.previous_dek:
            self._finish_dek_rotation()  # an earlier rotation first: never lose the DEK its rows are under
            payload = self.unlock()
        self._passphrase = new_passphrase
        if rotate_dek and self.db_path.exists():
            payload = msgspec.structs.replace(payload, dek=os.urandom(DEK_BYTES), previous_dek=payload.dek)
        self._write_keystore(payload, use_keyring=False)
        self._payload = payload
        if payload.previous_dek:
            self._finish_dek_rotation()


__all__ = [
    "KDF_DEFAULT",
    "KDF_PROFILE_ENV",
    "KDF_TEST",
    "KEYSTORE_FILE",
    "PASSPHRASE_ENV",
    "AlreadyInitialisedError",
    "ClientState",
    "CorruptKeystoreError",
    "DeviceKeys",
    "InsecurePermissionsError",
    "KdfParams",
    "KeyringUnavailableError",
    "Keystore",
    "KeystoreError",
    "KeystorePayload",
    "NotInitialisedError",
    "NotProtectedError",
    "PassphraseRequiredError",
    "WrongPassphraseError",
    "keyring_available",
]
