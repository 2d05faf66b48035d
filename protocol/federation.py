"""Relay-to-relay request signatures: HTTP Message Signatures (RFC 9421) with Ed25519, and Content-Digest (RFC 9530).

Pure: no I/O, no clock, no randomness — the caller passes the time (seconds
since the Unix epoch, as RFC 9421 ``created`` is) and the nonce. See
``docs/federation.md`` for the protocol; in short, a federation request
carries

- ``Content-Digest: sha-256=:<base64>:`` of the body (RFC 9530, also for an
  empty body),
- ``Tetherless-Origin`` (the sending relay's name) and
  ``Tetherless-Destination`` (the receiving relay's name),
- ``Signature-Input: tl=("@method" "@authority" "@path" "content-digest"
  "tetherless-origin" "tetherless-destination");created=…;expires=…;nonce="…";
  keyid="…";alg="ed25519";tag="tetherless-federation-v1"`` and
- ``Signature: tl=:<base64 Ed25519 signature over the signature base>:``.

The receiver parses (:func:`parse_signed_request`), checks freshness,
destination and digest (:func:`check_signed_request`), looks the key up by
``keyid`` among the origin's published keys (:func:`select_relay_key`) and
verifies (:func:`verify_signature`). Every failure raises
:class:`~protocol.errors.TetherlessError` with the code documented in
``docs/protocol.md`` §2.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Final

import nacl.signing

from . import signing
from .errors import ErrorCode, TetherlessError
from .messages import RelayKey

SIGNATURE_LABEL: Final = "tl"
SIGNATURE_TAG: Final = "tetherless-federation-v1"
ALGORITHM: Final = "ed25519"
ORIGIN_HEADER: Final = "tetherless-origin"
DESTINATION_HEADER: Final = "tetherless-destination"
COVERED_COMPONENTS: Final = (
    "@method",
    "@authority",
    "@path",
    "content-digest",
    ORIGIN_HEADER,
    DESTINATION_HEADER,
)
DEFAULT_VALIDITY_SECONDS: Final = 300
MAX_HEADER_CHARS: Final = 4096

# -- RFC 8941 structured fields (the subset RFC 9421/9530 need) ------------------------------

BareItem = int | str | bytes | bool
Params = list[tuple[str, BareItem]]


@dataclass(frozen=True, slots=True)
class Token:
    """An sf-token (unquoted), e.g. ``sha-256`` is a key, ``?1`` a boolean; tokens are rare here."""

    value: str


@dataclass(frozen=True, slots=True)
class InnerList:
    items: list[tuple[BareItem | Token, Params]]
    params: Params


@dataclass(frozen=True, slots=True)
class Item:
    value: BareItem | Token
    params: Params


Member = Item | InnerList

_KEY_RE = re.compile(r"[a-z*][a-z0-9_\-.*]*")
_TOKEN_RE = re.compile(r"[A-Za-z*][A-Za-z0-9!#$%&'*+\-.^_`|~:/]*")
_INT_RE = re.compile(r"-?[0-9]{1,15}")


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.pos = 0

    def fail(self, why: str) -> TetherlessError:
        return TetherlessError(ErrorCode.BAD_SIGNATURE, f"malformed structured field: {why}")

    def peek(self) -> str:
        return self.text[self.pos] if self.pos < len(self.text) else ""

    def skip_sp(self) -> None:
        while self.peek() == " ":
            self.pos += 1

    def skip_ows(self) -> None:
        while self.peek() in (" ", "\t"):
            self.pos += 1

    def key(self) -> str:
        m = _KEY_RE.match(self.text, self.pos)
        if not m:
            raise self.fail("expected a key")
        self.pos = m.end()
        return m.group()

    def bare_item(self) -> BareItem | Token:
        c = self.peek()
        if c == '"':
            return self.string()
        if c == ":":
            end = self.text.find(":", self.pos + 1)
            if end < 0:
                raise self.fail("unterminated byte sequence")
            raw = self.text[self.pos + 1 : end]
            self.pos = end + 1
            try:
                return base64.b64decode(raw, validate=True)
            except (binascii.Error, ValueError) as exc:
                raise self.fail("bad base64") from exc
        if c == "?":
            flag = self.text[self.pos + 1 : self.pos + 2]
            if flag not in ("0", "1"):
                raise self.fail("bad boolean")
            self.pos += 2
            return flag == "1"
        if c == "-" or c.isdigit():
            m = _INT_RE.match(self.text, self.pos)
            if not m or (m.end() < len(self.text) and self.text[m.end()] in ".0123456789"):
                raise self.fail("bad integer")
            self.pos = m.end()
            return int(m.group())
        m = _TOKEN_RE.match(self.text, self.pos)
        if not m:
            raise self.fail("expected an item")
        self.pos = m.end()
        return Token(m.group())

    def string(self) -> str:
        self.pos += 1
        out = []
        while True:
            c = self.peek()
            if not c:
                raise self.fail("unterminated string")
            self.pos += 1
            if c == "\\":
                nxt = self.peek()
                if nxt not in ('"', "\\"):
                    raise self.fail("bad escape")
                out.append(nxt)
                self.pos += 1
            elif c == '"':
                return "".join(out)
            elif not (" " <= c <= "~"):
                raise self.fail("non-ASCII in string")
            else:
                out.append(c)

    def params(self) -> Params:
        result: Params = []
        while self.peek() == ";":
            self.pos += 1
            self.skip_sp()
            name = self.key()
            value: BareItem | Token = True
            if self.peek() == "=":
                self.pos += 1
                value = self.bare_item()
            if isinstance(value, Token):
                raise self.fail("token parameters are not used here")
            result = [(k, v) for k, v in result if k != name] + [(name, value)]
        return result

    def member(self) -> Member:
        if self.peek() == "(":
            self.pos += 1
            items: list[tuple[BareItem | Token, Params]] = []
            while True:
                self.skip_sp()
                if self.peek() == ")":
                    self.pos += 1
                    return InnerList(items, self.params())
                item = self.bare_item()
                items.append((item, self.params()))
                if self.peek() not in (" ", ")"):
                    raise self.fail("bad inner list")
        item = self.bare_item()
        return Item(item, self.params())

    def dictionary(self) -> dict[str, Member]:
        result: dict[str, Member] = {}
        self.skip_sp()
        while self.pos < len(self.text):
            name = self.key()
            if self.peek() == "=":
                self.pos += 1
                result[name] = self.member()
            else:
                result[name] = Item(True, self.params())
            self.skip_ows()
            if self.pos >= len(self.text):
                break
            if self.peek() != ",":
                raise self.fail("expected ','")
            self.pos += 1
            self.skip_ows()
            if self.pos >= len(self.text):
                raise self.fail("trailing comma")
        return result


def parse_dictionary(text: str) -> dict[str, Member]:
    """Parse an RFC 8941 Dictionary; raises ``bad_signature`` for anything malformed."""
    if len(text) > MAX_HEADER_CHARS:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "structured field too long")
    return _Parser(text).dictionary()


def _serialize_bare(value: BareItem | Token) -> str:
    if isinstance(value, Token):
        return value.value
    if isinstance(value, bool):
        return "?1" if value else "?0"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, bytes):
        return ":" + base64.b64encode(value).decode("ascii") + ":"
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _serialize_params(params: Params) -> str:
    out = []
    for name, value in params:
        out.append(f";{name}" if value is True else f";{name}={_serialize_bare(value)}")
    return "".join(out)


def serialize_inner_list(components: Sequence[str], params: Params) -> str:
    """``("a" "b");k=v`` — the ``@signature-params`` value and a Signature-Input member."""
    return "(" + " ".join(_serialize_bare(c) for c in components) + ")" + _serialize_params(params)


# -- RFC 9530 Content-Digest -------------------------------------------------------------------


def content_digest(body: bytes) -> str:
    """The ``Content-Digest`` header value for ``body`` (sha-256)."""
    return "sha-256=:" + base64.b64encode(hashlib.sha256(body).digest()).decode("ascii") + ":"


def check_content_digest(header: str | None, body: bytes) -> None:
    """Raises ``digest_mismatch`` unless ``header`` has a sha-256 member equal to the body's digest."""
    if not header:
        raise TetherlessError(ErrorCode.DIGEST_MISMATCH, "Content-Digest (sha-256) is required")
    try:
        members = parse_dictionary(header)
    except TetherlessError as exc:
        raise TetherlessError(ErrorCode.DIGEST_MISMATCH, "Content-Digest is malformed") from exc
    member = members.get("sha-256")
    if not isinstance(member, Item) or not isinstance(member.value, bytes):
        raise TetherlessError(ErrorCode.DIGEST_MISMATCH, "Content-Digest has no sha-256 byte sequence")
    if not hmac.compare_digest(member.value, hashlib.sha256(body).digest()):
        raise TetherlessError(ErrorCode.DIGEST_MISMATCH, "the body does not match Content-Digest")


# -- RFC 9421 signature base -----------------------------------------------------------------


def component_value(name: str, *, method: str, authority: str, path: str, headers: Sequence[tuple[str, str]]) -> str:
    """The value of one covered component (RFC 9421 §2.1-2.2); raises ``bad_signature`` if absent."""
    if name == "@method":
        return method.upper()
    if name == "@authority":
        return authority.lower()
    if name == "@path":
        return path
    if name.startswith("@"):
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, f"unsupported derived component {name}")
    values = [value.strip() for key, value in headers if key.lower() == name]
    if not values:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, f"covered header {name} is missing")
    return ", ".join(values)


def signature_base(
    components: Sequence[str],
    params: Params,
    *,
    method: str,
    authority: str,
    path: str,
    headers: Sequence[tuple[str, str]],
) -> bytes:
    """The RFC 9421 §2.5 signature base: one ``"name": value`` line per component, then ``@signature-params``."""
    lines = []
    for name in components:
        value = component_value(name, method=method, authority=authority, path=path, headers=headers)
        if "\n" in value or "\r" in value:
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "component values cannot contain line breaks")
        lines.append(f'"{name}": {value}')
    lines.append('"@signature-params": ' + serialize_inner_list(components, params))
    return "\n".join(lines).encode("latin-1")


# -- signing -----------------------------------------------------------------------------------


def relay_key_id(public_key: bytes) -> str:
    """A relay key's id: 16 chars of lowercase base32 of a domain-separated SHA-256 of the key."""
    return base64.b32encode(signing.digest("relay-key-id", public_key)[:10]).decode("ascii").lower()


def sign_request(
    signing_key: nacl.signing.SigningKey,
    *,
    method: str,
    authority: str,
    path: str,
    body: bytes,
    origin: str,
    destination: str,
    created: int,
    nonce: str,
    validity_seconds: int = DEFAULT_VALIDITY_SECONDS,
) -> list[tuple[str, str]]:
    """The headers that make a federation request signed (add them to the request as they are).

    ``created`` is the signing time in whole seconds since the epoch; ``nonce``
    a fresh random string (≥ 16 bytes of entropy, base64url) that the receiver
    remembers while the signature is fresh. Pure and deterministic.
    """
    headers = [
        ("content-digest", content_digest(body)),
        (ORIGIN_HEADER, origin),
        (DESTINATION_HEADER, destination),
    ]
    params: Params = [
        ("created", created),
        ("expires", created + validity_seconds),
        ("nonce", nonce),
        ("keyid", relay_key_id(bytes(signing_key.verify_key))),
        ("alg", ALGORITHM),
        ("tag", SIGNATURE_TAG),
    ]
    base = signature_base(COVERED_COMPONENTS, params, method=method, authority=authority, path=path, headers=headers)
    signature = signing.sign(signing_key, base)
    headers.append(("signature-input", f"{SIGNATURE_LABEL}=" + serialize_inner_list(COVERED_COMPONENTS, params)))
    headers.append(("signature", f"{SIGNATURE_LABEL}=" + _serialize_bare(signature)))
    return headers


# -- verification ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SignedRequest:
    """A federation request's signature, parsed but not yet checked."""

    origin: str
    destination: str
    key_id: str
    created: int
    expires: int
    nonce: str
    components: tuple[str, ...]
    params: Params
    signature: bytes


def _header(headers: Sequence[tuple[str, str]], name: str) -> str | None:
    values = [value for key, value in headers if key.lower() == name]
    return ", ".join(values) if values else None


def parse_signed_request(headers: Sequence[tuple[str, str]]) -> SignedRequest:
    """Find and parse the Tetherless federation signature of a request.

    Raises ``signature_missing`` when there is no ``Signature-Input`` member
    tagged ``tetherless-federation-v1`` (or no ``Signature`` for it), and
    ``bad_signature`` when it is malformed, covers other components than
    :data:`COVERED_COMPONENTS`, or lacks a required parameter.
    """
    signature_input = _header(headers, "signature-input")
    signature_header = _header(headers, "signature")
    if not signature_input or not signature_header:
        raise TetherlessError(ErrorCode.SIGNATURE_MISSING, "federation requests need Signature-Input and Signature")
    inputs = parse_dictionary(signature_input)
    label = next(
        (
            name
            for name, member in inputs.items()
            if isinstance(member, InnerList) and dict(member.params).get("tag") == SIGNATURE_TAG
        ),
        None,
    )
    if label is None:
        raise TetherlessError(ErrorCode.SIGNATURE_MISSING, f"no signature tagged {SIGNATURE_TAG}")
    member = inputs[label]
    assert isinstance(member, InnerList)
    signature_member = parse_dictionary(signature_header).get(label)
    if signature_member is None:
        raise TetherlessError(ErrorCode.SIGNATURE_MISSING, f"no Signature member {label}")
    if not isinstance(signature_member, Item) or not isinstance(signature_member.value, bytes):
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "the signature is not a byte sequence")
    components = []
    for item, item_params in member.items:
        if not isinstance(item, str) or item_params:
            raise TetherlessError(ErrorCode.BAD_SIGNATURE, "covered components are plain strings")
        components.append(item)
    if tuple(components) != COVERED_COMPONENTS:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "the signature must cover " + " ".join(COVERED_COMPONENTS))
    params = dict(member.params)
    if params.get("alg", ALGORITHM) != ALGORITHM:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "alg must be ed25519")
    created, expires, nonce, key_id = (params.get(k) for k in ("created", "expires", "nonce", "keyid"))
    if not isinstance(created, int) or isinstance(created, bool) or created < 0:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "created (integer seconds) is required")
    if not isinstance(expires, int) or isinstance(expires, bool) or expires < created:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "expires (integer seconds, not before created) is required")
    if not isinstance(nonce, str) or not 16 <= len(nonce) <= 128:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "nonce (16-128 characters) is required")
    if not isinstance(key_id, str) or not key_id:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "keyid is required")
    origin = _header(headers, ORIGIN_HEADER)
    destination = _header(headers, DESTINATION_HEADER)
    if not origin or not destination:
        raise TetherlessError(ErrorCode.BAD_SIGNATURE, "Tetherless-Origin and Tetherless-Destination are required")
    return SignedRequest(
        origin=origin.strip().lower(),
        destination=destination.strip().lower(),
        key_id=key_id,
        created=created,
        expires=expires,
        nonce=nonce,
        components=tuple(components),
        params=list(member.params),
        signature=signature_member.value,
    )


def check_signed_request(
    signed: SignedRequest, *, body: bytes, content_digest_header: str | None, own_name: str, now: int, window: int
) -> None:
    """The checks that need no key: freshness, destination, body digest (in that order).

    ``now`` and ``window`` are seconds. Raises ``signature_expired`` when
    ``created`` is more than ``window`` away from ``now`` or ``expires`` has
    passed (or the signature claims a validity longer than ``window``),
    ``wrong_destination`` when the request names another relay, and
    ``digest_mismatch`` for a missing or wrong ``Content-Digest``.
    """
    if abs(now - signed.created) > window or signed.expires < now or signed.expires - signed.created > window:
        raise TetherlessError(ErrorCode.SIGNATURE_EXPIRED, "the signature is outside the freshness window")
    if signed.destination != own_name.lower():
        raise TetherlessError(ErrorCode.WRONG_DESTINATION, f"this relay is {own_name}, not {signed.destination}")
    check_content_digest(content_digest_header, body)


def select_relay_key(keys: Iterable[RelayKey], key_id: str, at_ms: int) -> bytes:
    """The public key ``key_id`` among ``keys`` valid at ``at_ms``; raises ``unknown_relay_key``."""
    for key in keys:
        if key.key_id == key_id and relay_key_id(key.public_key) == key_id:
            if key.valid_until_ms is not None and key.valid_until_ms < at_ms:
                raise TetherlessError(ErrorCode.UNKNOWN_RELAY_KEY, f"relay key {key_id} is retired")
            return key.public_key
    raise TetherlessError(ErrorCode.UNKNOWN_RELAY_KEY, f"the origin does not publish relay key {key_id}")


def verify_signature(
    signed: SignedRequest,
    public_key: bytes,
    *,
    method: str,
    authority: str,
    path: str,
    headers: Sequence[tuple[str, str]],
) -> None:
    """Raises ``bad_signature`` unless ``signed.signature`` is ``public_key``'s over this request's base."""
    base = signature_base(
        signed.components, signed.params, method=method, authority=authority, path=path, headers=headers
    )
    signing.verify(public_key, base, signed.signature)
