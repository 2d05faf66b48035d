"""Enrolment without a primary: the link code and what it derives (docs/crypto.md §5.1).

A new device N draws a 120-bit **link secret** ``K`` (15 random bytes, passed
in: this module is pure) and shows it as text (:func:`link_code_text`) and as
a QR code (:func:`link_qr`). Everything else is derived from ``K`` and the
account's home relay name::

    lookup_id    = HKDF(0^32, K, info("link-lookup", relay), 10)   (16 base32 characters in URLs)
    k_offer      = HKDF(0^32, K, info("link-offer", relay), 32)
    k_approve    = HKDF(0^32, K, info("link-approve", relay), 32)
    offer_mac    = HMAC(k_offer, layout("link-offer", relay, lookup_id, sign_key, box_key, created_at_ms))
                   with a kem_key (format 3, crypto.md §3.6):
                   HMAC(k_offer, layout("link-offer/2", relay, lookup_id, sign_key, box_key, kem_key, created_at_ms))
    approval_tag = HMAC(k_approve, layout("link-approval", relay, lookup_id, account_id, version, list_hash))

The relay stores the offer under ``lookup_id`` and never learns ``K``, so it
can neither forge ``offer_mac`` (proving N's keys to the approving device)
nor ``approval_tag`` (proving the proposed list to N). MAC checks use
:func:`hmac.compare_digest` and raise :class:`LinkCodeMismatchError`.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
from typing import Final
from urllib.parse import parse_qs, quote, urlsplit

import nacl.signing
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from .errors import ErrorCode, TetherlessError
from .handshake import mlkem_check_public
from .ids import device_id_for
from .messages import EnrolmentBundle, EnrolmentOffer, PrekeyBundle, SignedPrekey
from .prekeys import MLKEM_LAST_RESORT, X25519_SIGNED, verify_prekey
from .signing import layout

LINK_SECRET_BYTES: Final = 15
LOOKUP_ID_BYTES: Final = 10
LOOKUP_ID_CHARS: Final = 16
CODE_PREFIX: Final = "tl-"
QR_PREFIX: Final = "tetherless:link?"
_CODE_CHARS: Final = 24  # base32 of 15 bytes, no padding
_SALT: Final = bytes(32)
_BASE32_RE = re.compile(r"[a-z2-7]*")


class LinkCodeMismatchError(ValueError):
    """A MAC made with the link code does not verify: wrong code, or not the device that shows it."""


# -- the link secret and its two presentations --------------------------------------------------


def new_link_secret(entropy: bytes) -> bytes:
    """The link secret ``K`` from 15 random bytes (drawn by the caller)."""
    if len(entropy) != LINK_SECRET_BYTES:
        raise ValueError(f"a link secret is {LINK_SECRET_BYTES} random bytes")
    return bytes(entropy)


def _b32(raw: bytes) -> str:
    return base64.b32encode(raw).decode("ascii").rstrip("=").lower()


def link_code_text(secret: bytes) -> str:
    """``"tl-"`` + base32(K) in six groups of four characters, e.g. ``tl-abcd-efgh-ijkl-mnop-qrst-uvwx``."""
    code = _b32(new_link_secret(secret))
    return CODE_PREFIX + "-".join(code[i : i + 4] for i in range(0, _CODE_CHARS, 4))


def parse_link_code(text: str) -> bytes:
    """The link secret in a typed or scanned code; ignores case, ``-`` and spaces; ``tl-`` is optional.

    Raises ``ValueError`` with a message fit for the user for anything else.
    """
    cleaned = "".join(text.split()).lower()
    if cleaned.startswith(CODE_PREFIX):
        cleaned = cleaned[len(CODE_PREFIX) :]
    cleaned = cleaned.replace("-", "")
    if len(cleaned) == _CODE_CHARS + 2 and cleaned.startswith("tl"):
        cleaned = cleaned[2:]
    bad = sorted({ch for ch in cleaned if not _BASE32_RE.fullmatch(ch)})
    if bad:
        hint = " (codes use letters a-z and digits 2-7 only)"
        raise ValueError(f"the link code contains {', '.join(repr(c) for c in bad)}{hint}")
    if len(cleaned) != _CODE_CHARS:
        raise ValueError(f"a link code has {_CODE_CHARS} letters and digits after 'tl-', this one has {len(cleaned)}")
    return base64.b32decode(cleaned.upper())


def link_qr(relay: str, secret: bytes) -> str:
    """The QR payload ``tetherless:link?v=1&r=<relay>&k=<base32(K)>``."""
    return f"{QR_PREFIX}v=1&r={quote(relay, safe=':')}&k={_b32(new_link_secret(secret))}"


def parse_link_qr(text: str) -> tuple[str, bytes]:
    """(relay, K) from a scanned QR payload; raises ``ValueError`` for anything else."""
    if not text.startswith(QR_PREFIX):
        raise ValueError("not a Tetherless link code QR")
    params = parse_qs(urlsplit(text).query, strict_parsing=False)
    if params.get("v") != ["1"]:
        raise ValueError("unsupported link code version")
    relay, code = params.get("r", [""]), params.get("k", [])
    if len(relay) != 1 or not relay[0] or len(code) != 1:
        raise ValueError("the QR link code lacks the relay or the code")
    return relay[0].lower(), parse_link_code(code[0])


# -- derivations ------------------------------------------------------------------------------


def _derive(secret: bytes, domain: str, relay: str, length: int) -> bytes:
    hkdf = HKDF(algorithm=hashes.SHA256(), length=length, salt=_SALT, info=layout(domain, relay))
    return hkdf.derive(new_link_secret(secret))


def lookup_id(secret: bytes, relay: str) -> bytes:
    """The 10-byte id the offer is stored under on ``relay``."""
    return _derive(secret, "link-lookup", relay, LOOKUP_ID_BYTES)


def lookup_id_text(raw: bytes) -> str:
    """A lookup id as it appears in URLs: 16 lowercase base32 characters."""
    if len(raw) != LOOKUP_ID_BYTES:
        raise ValueError(f"a lookup id is {LOOKUP_ID_BYTES} bytes")
    return _b32(raw)


def parse_lookup_id(text: str) -> bytes | None:
    """The lookup id in a URL path segment (any case), or None when it is not 16 base32 characters."""
    if len(text) != LOOKUP_ID_CHARS or not _BASE32_RE.fullmatch(text.lower()):
        return None
    return base64.b32decode(text.upper())


def k_offer(secret: bytes, relay: str) -> bytes:
    return _derive(secret, "link-offer", relay, 32)


def k_approve(secret: bytes, relay: str) -> bytes:
    return _derive(secret, "link-approve", relay, 32)


def offer_mac(
    secret: bytes, relay: str, sign_key: bytes, box_key: bytes, created_at_ms: int, kem_key: bytes = b""
) -> bytes:
    """HMAC by ``k_offer`` over the offer's relay, lookup id, keys and time.

    An offer with a ``kem_key`` uses the domain ``link-offer/2``, which covers
    it: a relay that strips or swaps the key breaks the MAC either way.
    """
    lookup = lookup_id(secret, relay)
    if kem_key:
        message = layout("link-offer/2", relay, lookup, sign_key, box_key, kem_key, created_at_ms)
    else:
        message = layout("link-offer", relay, lookup, sign_key, box_key, created_at_ms)
    return hmac.new(k_offer(secret, relay), message, hashlib.sha256).digest()


def approval_tag(secret: bytes, relay: str, account_id: str, version: int, list_hash: bytes) -> bytes:
    """HMAC by ``k_approve`` over the proposed device-list version (by its ``list_hash``)."""
    message = layout("link-approval", relay, lookup_id(secret, relay), account_id, version, list_hash)
    return hmac.new(k_approve(secret, relay), message, hashlib.sha256).digest()


def verify_offer_mac(secret: bytes, offer: EnrolmentOffer) -> None:
    """Check an offer fetched from the relay against the code the user entered.

    Raises :class:`LinkCodeMismatchError` when the lookup id or the MAC does
    not match (a mistyped code, or keys that are not those of the device
    showing the code). Pure.
    """
    expected_lookup = lookup_id(secret, offer.relay)
    expected = offer_mac(secret, offer.relay, offer.sign_key, offer.box_key, offer.created_at_ms, offer.kem_key)
    lookup_ok = hmac.compare_digest(expected_lookup, offer.lookup_id)
    if not (hmac.compare_digest(expected, offer.offer_mac) and lookup_ok):
        raise LinkCodeMismatchError("the code does not match this device's offer")


def verify_approval_tag(secret: bytes, relay: str, account_id: str, version: int, list_hash: bytes, tag: bytes) -> None:
    """Check a proposal's ``approval_tag``; raises :class:`LinkCodeMismatchError`. Pure."""
    if not hmac.compare_digest(approval_tag(secret, relay, account_id, version, list_hash), tag):
        raise LinkCodeMismatchError("the proposal was not made by a device that knows the link code")


# -- offers -------------------------------------------------------------------------------------


def make_offer(
    secret: bytes,
    relay: str,
    signing_key: nacl.signing.SigningKey,
    box_key: bytes,
    bundle: EnrolmentBundle,
    created_at_ms: int,
    kem_key: bytes = b"",
) -> EnrolmentOffer:
    """N's offer for ``POST /v1/enrolments`` (``bundle`` signed with ``signing_key``; ``kem_key``: N's
    long-term ML-KEM-768 key for a format-3 entry, MAC-protected)."""
    sign_key = bytes(signing_key.verify_key)
    return EnrolmentOffer(
        relay=relay,
        lookup_id=lookup_id(secret, relay),
        sign_key=sign_key,
        box_key=box_key,
        bundle=bundle,
        created_at_ms=created_at_ms,
        offer_mac=offer_mac(secret, relay, sign_key, box_key, created_at_ms, kem_key),
        kem_key=kem_key,
    )


def verify_offer_prekeys(offer: EnrolmentOffer) -> None:
    """The offer's bundle: an ``x25519-signed`` and an ``mlkem768-last-resort`` key signed by ``sign_key``,
    and its ``kem_key``, if any, a valid ML-KEM-768 encapsulation key.

    Run by the relay on ``POST /v1/enrolments`` and by the approving device.
    Raises ``prekey_invalid``. Pure.
    """
    try:
        device_id = device_id_for(offer.sign_key)
    except ValueError as exc:  # pragma: no cover - the message type fixes the length
        raise TetherlessError(ErrorCode.PREKEY_INVALID, "sign_key is not an Ed25519 public key") from exc
    verify_prekey(offer.sign_key, device_id, offer.bundle.signed_prekey, kind=X25519_SIGNED)
    verify_prekey(offer.sign_key, device_id, offer.bundle.pq_prekey, kind=MLKEM_LAST_RESORT)
    if offer.kem_key:
        mlkem_check_public(offer.kem_key)


def offer_bundle(offer: EnrolmentOffer, account_id: str, one_time_prekey: SignedPrekey | None = None) -> PrekeyBundle:
    """The offer's prekeys as the :class:`PrekeyBundle` of N once it joins ``account_id`` on ``offer.relay``."""
    address = f"{device_id_for(offer.sign_key)}.{account_id}@{offer.relay}"
    return PrekeyBundle(
        address=address,
        identity_key=offer.box_key,
        signed_prekey=offer.bundle.signed_prekey,
        pq_prekey=offer.bundle.pq_prekey,
        one_time_prekey=one_time_prekey,
    )
