"""The one closed set of protocol errors.

Every error the relay can answer with has a stable wire ``code`` (a short
snake_case string clients may switch on) and exactly one HTTP status, given
in :data:`STATUS`. Errors travel as RFC 9457 problem details
(:class:`Problem`). Client code turns a received problem back into a
:class:`TetherlessError` with :func:`error_from_problem`.
"""

from __future__ import annotations

import enum
from typing import Final

import msgspec


class ErrorCode(enum.StrEnum):
    # -- request shape --------------------------------------------------------
    MALFORMED_BODY = "malformed_body"  # body is not valid MessagePack / JSON
    INVALID_FIELD = "invalid_field"  # decodes, but a field has a wrong type or value
    INVALID_QUERY = "invalid_query"  # query parameter missing, wrong type or out of range
    UNSUPPORTED_MEDIA_TYPE = "unsupported_media_type"  # Content-Type is neither msgpack nor JSON
    NOT_ACCEPTABLE = "not_acceptable"  # Accept names neither msgpack nor JSON
    BODY_TOO_LARGE = "body_too_large"  # request body larger than limits.max_body_bytes
    BATCH_TOO_LARGE = "batch_too_large"  # more envelopes than limits.max_batch_envelopes
    ENVELOPE_TOO_LARGE = "envelope_too_large"  # one ciphertext above limits.max_envelope_bytes
    BAD_REQUEST = "bad_request"  # HTTP-level violation (bad framing, smuggling attempt)
    NOT_FOUND = "not_found"  # no such route
    METHOD_NOT_ALLOWED = "method_not_allowed"  # route exists, method does not (see Allow)
    # -- authentication -------------------------------------------------------
    MISSING_TOKEN = "missing_token"  # no "Authorization: Bearer" header
    INVALID_TOKEN = "invalid_token"  # token unknown or malformed
    TOKEN_EXPIRED = "token_expired"  # token past its expiry
    TOKEN_REVOKED = "token_revoked"  # token (or its device) was revoked
    BAD_SIGNATURE = "bad_signature"  # signature wrong, short, or over other bytes
    CHALLENGE_UNKNOWN = "challenge_unknown"  # nonce never issued by this relay, or for another device
    CHALLENGE_USED = "challenge_used"  # nonce already exchanged for a session (replay)
    CHALLENGE_EXPIRED = "challenge_expired"  # nonce past its expiry
    FORBIDDEN = "forbidden"  # authenticated, but not allowed to touch this resource
    # -- accounts and devices -------------------------------------------------
    UNKNOWN_ACCOUNT = "unknown_account"
    UNKNOWN_DEVICE = "unknown_device"
    ACCOUNT_EXISTS = "account_exists"
    INVALID_DEVICE_LIST = "invalid_device_list"  # not a valid genesis / next version
    # -- messages -------------------------------------------------------------
    UNKNOWN_RECIPIENT = "unknown_recipient"  # recipient device not registered here
    REMOTE_RECIPIENT = "remote_recipient"  # recipient lives on another relay; federation not enabled
    IDEMPOTENCY_CONFLICT = "idempotency_conflict"  # key reused with a different envelope
    INBOX_FULL = "inbox_full"  # recipient's inbox quota reached
    # -- federation (relay to relay; docs/federation.md) --------------------------
    SIGNATURE_MISSING = "signature_missing"  # federation request without a Tetherless HTTP message signature
    SIGNATURE_EXPIRED = "signature_expired"  # signature created/expires outside the freshness window
    SIGNATURE_REPLAYED = "signature_replayed"  # signature nonce already seen from this origin
    WRONG_DESTINATION = "wrong_destination"  # the request is addressed to another relay
    DIGEST_MISMATCH = "digest_mismatch"  # Content-Digest missing, malformed, or not the body's
    UNKNOWN_RELAY_KEY = "unknown_relay_key"  # keyid not among the origin's published, unexpired keys
    PEER_FORBIDDEN = "peer_forbidden"  # federation with that relay is not allowed by policy
    PEER_UNAVAILABLE = "peer_unavailable"  # the other relay cannot be reached or answered garbage
    PEER_ADDRESS_REFUSED = "peer_address_refused"  # relay name is an IP literal or resolves to a non-public address
    UNKNOWN_RELAY = "unknown_relay"  # the relay name does not exist in DNS (no such name, or no address for it)
    # -- device lists v2, revocation, WebAuthn (docs/crypto.md) ---------------------
    DEVICE_LIST_CONFLICT = "device_list_conflict"  # version is not head + 1 / prev_hash is not the head's hash
    POLICY_NOT_MET = "policy_not_met"  # the approvals do not satisfy the previous version's policy
    DEVICE_REVOKED = "device_revoked"  # the device was removed from its account's device list
    RECIPIENT_REVOKED = "recipient_revoked"  # an envelope names a device that was revoked
    WEBAUTHN_INVALID = "webauthn_invalid"  # a WebAuthn attestation/assertion does not verify
    WEBAUTHN_REPLAYED = "webauthn_replayed"  # assertion sign counter not above the stored one
    # -- enrolment and prekeys ------------------------------------------------------
    ENROLMENT_UNKNOWN = "enrolment_unknown"  # no enrolment offer under this lookup id
    ENROLMENT_EXPIRED = "enrolment_expired"  # the enrolment offer is past its expiry
    ENROLMENT_USED = "enrolment_used"  # the link code was already used (offer/proposal exists or completed)
    PREKEY_INVALID = "prekey_invalid"  # a prekey has a bad signature, length, kind or reused id
    # -- account log (docs/account-log.md) ------------------------------------------
    LOG_CONFLICT = "log_conflict"  # expected_head is not the current head
    LOG_EPOCH_STALE = "log_epoch_stale"  # record epoch below the current one, or unknown
    LOG_REKEY_REQUIRED = "log_rekey_required"  # only a key record for a new epoch is accepted now
    RECORD_TOO_LARGE = "record_too_large"  # one log record above limits.max_log_record_bytes
    SNAPSHOT_INCOMPLETE = "snapshot_incomplete"  # snapshot manifest whose parts are not all stored
    NO_SNAPSHOT = "no_snapshot"  # no complete snapshot / not the newest one
    LOG_QUOTA = "log_quota"  # the account's log would exceed limits.max_log_bytes
    # -- media blobs, opened by the client (protocol/blobs.py; docs/crypto.md "Media blobs") -------------
    BLOB_CORRUPT = "blob_corrupt"  # a blob's header, chunk, length or padding is not what its reference says
    BLOB_KEY_MISMATCH = "blob_key_mismatch"  # the blob header's commitment is not the file key's
    # -- media blobs on the relay (tus uploads and downloads; docs/blobs.md) ------------------------------
    TUS_VERSION_UNSUPPORTED = "tus_version_unsupported"  # Tus-Resumable missing or not 1.0.0 (see Tus-Version)
    INVALID_HEADER = "invalid_header"  # a header the route needs is missing or malformed (Upload-Length, …)
    BLOB_NOT_FOUND = "blob_not_found"  # no such upload or blob, or no right to it (the two look the same)
    BLOB_OFFSET_MISMATCH = "blob_offset_mismatch"  # Upload-Offset is not the upload's committed offset
    BLOB_UPLOAD_LOCKED = "blob_upload_locked"  # another request is appending to this upload now
    BLOB_TOO_LARGE = "blob_too_large"  # Upload-Length above limits.max_blob_bytes, or a body past Upload-Length
    BLOB_QUOTA_EXCEEDED = "blob_quota_exceeded"  # the account's blobs and uploads would exceed its quota
    BLOB_CHECKSUM_UNSUPPORTED = "blob_checksum_unsupported"  # Upload-Checksum names an algorithm other than sha1/sha256
    BLOB_CHECKSUM_MISMATCH = "blob_checksum_mismatch"  # the PATCH body does not match Upload-Checksum (kept nothing)
    BLOB_DIGEST_MISMATCH = "blob_digest_mismatch"  # the complete upload does not hash to its declared sha256
    RANGE_NOT_SATISFIABLE = "range_not_satisfiable"  # Range is malformed, several ranges, or outside the blob
    # -- server ---------------------------------------------------------------
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"  # draining or store not ready; retry elsewhere/later
    INTERNAL = "internal"  # a bug: never expected, always logged


E = ErrorCode

STATUS: Final[dict[ErrorCode, int]] = {
    E.MALFORMED_BODY: 400,
    E.INVALID_FIELD: 422,
    E.INVALID_QUERY: 400,
    E.UNSUPPORTED_MEDIA_TYPE: 415,
    E.NOT_ACCEPTABLE: 406,
    E.BODY_TOO_LARGE: 413,
    E.BATCH_TOO_LARGE: 413,
    E.ENVELOPE_TOO_LARGE: 413,
    E.BAD_REQUEST: 400,
    E.NOT_FOUND: 404,
    E.METHOD_NOT_ALLOWED: 405,
    E.MISSING_TOKEN: 401,
    E.INVALID_TOKEN: 401,
    E.TOKEN_EXPIRED: 401,
    E.TOKEN_REVOKED: 401,
    E.BAD_SIGNATURE: 401,
    E.CHALLENGE_UNKNOWN: 401,
    E.CHALLENGE_USED: 401,
    E.CHALLENGE_EXPIRED: 401,
    E.FORBIDDEN: 403,
    E.UNKNOWN_ACCOUNT: 404,
    E.UNKNOWN_DEVICE: 404,
    E.ACCOUNT_EXISTS: 409,
    E.INVALID_DEVICE_LIST: 422,
    E.UNKNOWN_RECIPIENT: 404,
    E.REMOTE_RECIPIENT: 422,
    E.IDEMPOTENCY_CONFLICT: 409,
    E.INBOX_FULL: 507,
    E.SIGNATURE_MISSING: 401,
    E.SIGNATURE_EXPIRED: 401,
    E.SIGNATURE_REPLAYED: 401,
    E.WRONG_DESTINATION: 421,
    E.DIGEST_MISMATCH: 400,
    E.UNKNOWN_RELAY_KEY: 401,
    E.PEER_FORBIDDEN: 403,
    E.PEER_UNAVAILABLE: 502,
    E.PEER_ADDRESS_REFUSED: 403,
    E.UNKNOWN_RELAY: 404,
    E.DEVICE_LIST_CONFLICT: 409,
    E.POLICY_NOT_MET: 403,
    E.DEVICE_REVOKED: 401,
    E.RECIPIENT_REVOKED: 410,
    E.WEBAUTHN_INVALID: 401,
    E.WEBAUTHN_REPLAYED: 401,
    E.ENROLMENT_UNKNOWN: 404,
    E.ENROLMENT_EXPIRED: 410,
    E.ENROLMENT_USED: 409,
    E.PREKEY_INVALID: 422,
    E.LOG_CONFLICT: 409,
    E.LOG_EPOCH_STALE: 409,
    E.LOG_REKEY_REQUIRED: 409,
    E.RECORD_TOO_LARGE: 413,
    E.SNAPSHOT_INCOMPLETE: 422,
    E.NO_SNAPSHOT: 404,
    E.LOG_QUOTA: 507,
    E.BLOB_CORRUPT: 422,
    E.BLOB_KEY_MISMATCH: 422,
    E.TUS_VERSION_UNSUPPORTED: 412,
    E.INVALID_HEADER: 400,
    E.BLOB_NOT_FOUND: 404,
    E.BLOB_OFFSET_MISMATCH: 409,
    E.BLOB_UPLOAD_LOCKED: 423,
    E.BLOB_TOO_LARGE: 413,
    E.BLOB_QUOTA_EXCEEDED: 507,
    E.BLOB_CHECKSUM_UNSUPPORTED: 400,
    E.BLOB_CHECKSUM_MISMATCH: 460,
    E.BLOB_DIGEST_MISMATCH: 409,
    E.RANGE_NOT_SATISFIABLE: 416,
    E.RATE_LIMITED: 429,
    E.UNAVAILABLE: 503,
    E.INTERNAL: 500,
}

TITLES: Final[dict[ErrorCode, str]] = {code: code.value.replace("_", " ").capitalize() for code in ErrorCode}

#: The codes that say "not now" rather than "not this": the same request may succeed later (``retryable``).
RETRYABLE_CODES: Final = frozenset({ErrorCode.UNAVAILABLE, ErrorCode.RATE_LIMITED, ErrorCode.INTERNAL})


class LocalErrorCode(enum.StrEnum):
    """Stable codes of what a client finds wrong in its own local state (docs/crypto.md §13): the ``code`` of
    ``protocol.client.localdb.LocalDBError`` and its subclasses. Never sent on the wire, so no HTTP status; the
    message the CLI prints starts with the same words (``local state tampered: …``)."""

    LOCAL_STATE_TAMPERED = "local_state_tampered"  # a sealed row does not open, or a guarded set lost/gained rows
    LOCAL_STATE_ROLLED_BACK = "local_state_rolled_back"  # state.db (or the home) is older than evidence kept apart
    LOCAL_STATE_TOO_NEW = "local_state_too_new"  # state.db was migrated by a newer client than this one


PROBLEM_TYPE_BASE: Final = "https://tetherless.dev/problems/"
PROBLEM_CONTENT_TYPE: Final = "application/problem+json"


class Problem(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """RFC 9457 problem details, plus the stable ``code`` extension member."""

    type: str
    title: str
    status: int
    code: str
    detail: str = ""
    retry_after_seconds: int | None = None
    head: int | None = None  # log_conflict: the account log's current head
    epoch: int | None = None  # log_epoch_stale: the account log's current epoch


class TetherlessError(Exception):
    """Root of every error that has a wire code.

    ``detail`` is shown to the remote party: never put secrets or message
    bodies in it.
    """

    def __init__(
        self,
        code: ErrorCode,
        detail: str = "",
        *,
        retry_after_seconds: int | None = None,
        head: int | None = None,
        epoch: int | None = None,
    ) -> None:
        super().__init__(f"{code.value}: {detail}" if detail else code.value)
        self.code = code
        self.detail = detail
        self.retry_after_seconds = retry_after_seconds
        self.head = head
        self.epoch = epoch

    @property
    def status(self) -> int:
        return STATUS[self.code]

    @property
    def retryable(self) -> bool:
        """The rule of the whole client exception tree (docs/cli.md "Errors"): True when the same request may
        succeed later with nothing changed on this side — the relay is busy, restarting or failed for the moment
        (:data:`RETRYABLE_CODES`; a :class:`RemoteError` also for any 5xx). False when only a change (of the
        request, the settings or the account) helps. A retry backs off and honours ``retry_after_seconds``."""
        return self.code in RETRYABLE_CODES

    def to_problem(self) -> Problem:
        return Problem(
            type=PROBLEM_TYPE_BASE + self.code.value,
            title=TITLES[self.code],
            status=self.status,
            code=self.code.value,
            detail=self.detail,
            retry_after_seconds=self.retry_after_seconds,
            head=self.head,
            epoch=self.epoch,
        )


class RemoteError(TetherlessError):
    """The other side answered with a problem (raised by clients)."""

    def __init__(
        self,
        code: ErrorCode,
        detail: str = "",
        *,
        http_status: int,
        retry_after_seconds: int | None = None,
        head: int | None = None,
        epoch: int | None = None,
    ) -> None:
        super().__init__(code, detail, retry_after_seconds=retry_after_seconds, head=head, epoch=epoch)
        self.http_status = http_status

    @property
    def retryable(self) -> bool:
        """:attr:`TetherlessError.retryable`, and any 5xx answer (the relay failed, not the request)."""
        return super().retryable or self.http_status >= 500


class UnknownRemoteError(Exception):
    """The other side answered with an error we cannot parse as a problem."""

    def __init__(self, http_status: int, body: bytes) -> None:
        super().__init__(f"HTTP {http_status}: {body[:200]!r}")
        self.http_status = http_status
        self.body = body

    @property
    def retryable(self) -> bool:
        """As :attr:`TetherlessError.retryable`: a 5xx or 429 without a problem document (e.g. from a proxy)."""
        return self.http_status >= 500 or self.http_status == 429


def problem_json(error: TetherlessError) -> bytes:
    return msgspec.json.encode(error.to_problem())


def error_from_problem(http_status: int, body: bytes) -> RemoteError | UnknownRemoteError:
    """Turn an error response body into an exception (never raises)."""
    try:
        problem = msgspec.json.decode(body, type=Problem)
        code = ErrorCode(problem.code)
    except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
        return UnknownRemoteError(http_status, body)
    return RemoteError(
        code,
        problem.detail,
        http_status=http_status,
        retry_after_seconds=problem.retry_after_seconds,
        head=problem.head,
        epoch=problem.epoch,
    )
