"""Compute the protocol test vectors from their inputs (and regenerate protocol/vectors/v1.json, v2.json, v3.json)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import nacl.signing

from protocol import auth, codec, device_list, enrolment, handshake, log, recovery, signing
from protocol.errors import TetherlessError
from protocol.ids import Address, account_id_for, device_id_for
from protocol.messages import (
    Challenge,
    Heartbeat,
    InboxEnvelope,
    OutboundEnvelope,
    Policy,
    SendRequest,
    SignedDeviceList,
)
from tests.protocol import vectors_enrolment, vectors_sessions
from tests.support.soft_authenticator import SoftAuthenticator

VECTORS = Path(__file__).resolve().parents[2] / "protocol" / "vectors" / "v1.json"

SEEDS = ["00" * 32, "01" * 32, "9d61b19deffd5a60ba844af492ec2cc44449c5697b326919703bac031cae7f60"]


def _field(spec: dict[str, Any]) -> signing.Field:
    ((kind, value),) = spec.items()
    return {"i": lambda v: int(v), "b": bytes.fromhex, "s": str}[kind](value)


def ids(seed_hex: str) -> dict[str, str]:
    key = bytes(nacl.signing.SigningKey(bytes.fromhex(seed_hex)).verify_key)
    return {"seed": seed_hex, "sign_key": key.hex(), "device_id": device_id_for(key), "account_id": account_id_for(key)}


def layout_case(domain: str, fields: list[dict[str, Any]]) -> dict[str, Any]:
    raw = signing.layout(domain, *[_field(f) for f in fields])
    return {"domain": domain, "fields": fields, "bytes": raw.hex()}


def challenge_case(seed_hex: str, relay: str, nonce_hex: str, expires_at_ms: int) -> dict[str, Any]:
    key = nacl.signing.SigningKey(bytes.fromhex(seed_hex))
    device = device_id_for(bytes(key.verify_key))
    challenge = Challenge(relay=relay, device_id=device, nonce=bytes.fromhex(nonce_hex), expires_at_ms=expires_at_ms)
    return {
        "seed": seed_hex,
        "relay": relay,
        "device_id": device,
        "nonce": nonce_hex,
        "expires_at_ms": expires_at_ms,
        "layout": auth.challenge_layout(relay, device, challenge.nonce, expires_at_ms).hex(),
        "signature": auth.sign_challenge(key, challenge).hex(),
    }


def genesis_case(seed_hex: str, box_key_hex: str, name: str, now_ms: int) -> dict[str, Any]:
    key = nacl.signing.SigningKey(bytes.fromhex(seed_hex))
    signed = device_list.genesis(key, bytes.fromhex(box_key_hex), name=name, now_ms=now_ms)
    return {
        "seed": seed_hex,
        "box_key": box_key_hex,
        "name": name,
        "now_ms": now_ms,
        "layout": device_list.list_layout(signed.device_list).hex(),
        "hash": device_list.list_hash(signed.device_list).hex(),
        "signature": signed.signatures[0].signature.hex(),
        "msgpack": codec.encode(signed).hex(),
    }


def encodings() -> dict[str, Any]:
    envelope = InboxEnvelope(
        cursor=42,
        id=bytes(range(16)),
        sent_at_ms=1_700_000_000_000,
        expires_at_ms=1_702_592_000_000,
        ciphertext=b"\x00\x01opaque",
    )
    send = SendRequest(
        envelopes=[
            OutboundEnvelope(
                recipient="aaaa@relay.example", idempotency_key=bytes(range(16)), ciphertext=b"ct", ttl_seconds=60
            )
        ]
    )
    heartbeat = Heartbeat(cursor=42, at_ms=1_700_000_000_500)
    return {
        "inbox_envelope": {
            "msgpack": codec.encode(envelope).hex(),
            "json": codec.encode(envelope, codec.JSON).decode(),
        },
        "send_request": {"msgpack": codec.encode(send).hex(), "json": codec.encode(send, codec.JSON).decode()},
        "stream_msgpack": (codec.encode_stream_item(envelope) + codec.encode_stream_item(heartbeat)).hex(),
        "stream_jsonl": (
            codec.encode_stream_item(envelope, codec.JSON) + codec.encode_stream_item(heartbeat, codec.JSON)
        ).decode(),
    }


def address_case(text: str) -> dict[str, Any]:
    try:
        parsed = Address.parse(text)
    except TetherlessError:
        return {"text": text, "parsed": None}
    return {"text": text, "parsed": {"device": parsed.device, "account": parsed.account, "relay": parsed.relay}}


ADDRESSES = [
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@Relay.Example:8443",
    "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@[::1]:8080",
    "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "aaaa.bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@relay.example",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb",
    "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb@bad host",
]


def build() -> dict[str, Any]:
    return {
        "version": "v1",
        "ids": [ids(seed) for seed in SEEDS],
        "layouts": [
            layout_case("example", [{"i": 1}, {"b": "00ff"}, {"s": "héllo"}]),
            layout_case("empty", []),
        ],
        "challenge": challenge_case(SEEDS[2], "relay.example:8443", "11" * 32, 1_700_000_060_000),
        "genesis": genesis_case(SEEDS[1], "22" * 32, "laptop", 1_700_000_000_000),
        "encodings": encodings(),
        "addresses": [address_case(a) for a in ADDRESSES],
    }


# -- protocol v2 (protocol/vectors/v2.json, docs/crypto.md §15) -------------------------------------
#
# One function per section, registered in V2_SECTIONS: to add a section, write a function returning a
# JSON-able dict and add one line to V2_SECTIONS (and its checks to test_vectors.py). Keep inputs fixed
# (seeds, entropy) so the file is reproducible.

VECTORS_V2 = VECTORS.with_name("v2.json")
V2_RP_ID = "relay.example"
V2_T0 = 1_700_000_000_000


def _seed_key(seed_hex: str) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(bytes.fromhex(seed_hex))


def _signed_case(signed: SignedDeviceList) -> dict[str, Any]:
    return {
        "layout": device_list.list_layout(signed.device_list).hex(),
        "hash": device_list.list_hash(signed.device_list).hex(),
        "msgpack": codec.encode(signed).hex(),
    }


def v2_device_lists() -> dict[str, Any]:
    """A format-2 chain: genesis with a recovery key; add a device and a credential under threshold 1 and
    set threshold 2; then the recovery key alone removes the first device (epoch 1)."""
    first, second = _seed_key("a1" * 32), _seed_key("a2" * 32)
    box_first, box_second = bytes.fromhex("b1" * 32), bytes.fromhex("b2" * 32)
    recovery_entropy = bytes.fromhex("c0" * 20)
    account_id = account_id_for(bytes(first.verify_key))
    recovery_key = recovery.recovery_keys(recovery_entropy, account_id).signing_key
    authenticator = SoftAuthenticator(V2_RP_ID, private_value=0xA5A5)

    genesis = device_list.genesis_v2(first, box_first, now_ms=V2_T0, recovery_key=recovery_key)
    v2 = device_list.next_version(
        genesis.device_list,
        add_devices=[device_list.device_entry(bytes(second.verify_key), box_second, added_at_ms=V2_T0 + 1000)],
        add_credentials=[authenticator.credential(V2_T0 + 1000)],
        policy=Policy(threshold=2),
        now_ms=V2_T0 + 1000,
    )
    signed2 = device_list.signed_list(
        v2,
        [device_list.approve(v2, first), device_list.approve(v2, second)],
        webauthn_assertions=[authenticator.get_assertion(device_list.list_hash(v2), counter=1)],
    )
    v3 = device_list.next_version(v2, remove_device_ids=[genesis.device_list.devices[0].device_id], now_ms=V2_T0 + 2000)
    v3 = msgspec.structs.replace(v3, policy=Policy(threshold=1))
    signed3 = device_list.signed_list(v3, recovery_signatures=[device_list.sign_recovery(v3, recovery_key)])
    v4 = device_list.next_version(
        v3, policy=Policy(threshold=1, require_webauthn=True, require_user_verification=True), now_ms=V2_T0 + 3000
    )
    signed4 = device_list.signed_list(v4, [device_list.approve(v4, second)])
    third, box_third = _seed_key("a3" * 32), bytes.fromhex("b3" * 32)
    v5 = device_list.next_version(
        v4,
        add_devices=[device_list.device_entry(bytes(third.verify_key), box_third, added_at_ms=V2_T0 + 4000)],
        now_ms=V2_T0 + 4000,
    )
    signed5 = device_list.signed_list(
        v5,
        [device_list.approve(v5, third)],
        webauthn_assertions=[authenticator.get_assertion(device_list.list_hash(v5), counter=2, user_verified=True)],
    )
    return {
        "description": (
            "v1 genesis (threshold 1, recovery key); v2 adds device 2 and a credential, sets threshold 2 "
            "(approval by device 1, self-signature of device 2, assertion as proof of possession); v3 removes "
            "device 1 with the recovery key alone (epoch 1) and sets threshold 1; v4 sets require_webauthn and "
            "require_user_verification (approved by device 2); v5 adds device 3 approved by the credential "
            "alone (UV assertion, counter 2)"
        ),
        "inputs": {
            "device_seeds": ["a1" * 32, "a2" * 32, "a3" * 32],
            "box_keys": [box_first.hex(), box_second.hex(), box_third.hex()],
            "recovery_entropy": recovery_entropy.hex(),
            "authenticator_p256_private_value": 0xA5A5,
            "rp_id": V2_RP_ID,
        },
        "account_id": account_id,
        "versions": [_signed_case(v) for v in (genesis, signed2, signed3, signed4, signed5)],
    }


def v2_webauthn() -> dict[str, Any]:
    """A fixed-key ES256 credential (packed self attestation) and one assertion over a list hash."""
    authenticator = SoftAuthenticator(V2_RP_ID, private_value=0x1234567, counter=41)
    challenge = signing.digest("example", "a list hash")
    registration = authenticator.make_credential(b"\x07" * 32, fmt="packed", user_verified=True)
    assertion = authenticator.get_assertion(challenge, user_verified=True)
    return {
        "rp_id": V2_RP_ID,
        "p256_private_value": 0x1234567,
        "credential_id": authenticator.credential_id.hex(),
        "cose_public_key": authenticator.public_key().hex(),
        "registration": {
            "challenge": ("07" * 32),
            "client_data_json": registration.client_data_json.decode(),
            "attestation_object": registration.attestation_object.hex(),
        },
        "assertion": {
            "challenge": challenge.hex(),
            "authenticator_data": assertion.authenticator_data.hex(),
            "client_data_json": assertion.client_data_json.decode(),
            "signature": assertion.signature.hex(),
            "sign_count": 42,
            "user_verified": True,
        },
    }


def v2_recovery() -> dict[str, Any]:
    """Recovery secrets: entropy -> printed text -> keys for an account (docs/crypto.md §3.4)."""
    cases = []
    for entropy_hex, account_id in (
        ("00" * 20, "a" * 32),
        ("0123456789abcdef0123456789abcdef01234567", ids(SEEDS[1])["account_id"]),
    ):
        entropy = bytes.fromhex(entropy_hex)
        keys = recovery.recovery_keys(entropy, account_id)
        cases.append(
            {
                "entropy": entropy_hex,
                "text": recovery.new_recovery_secret(entropy),
                "account_id": account_id,
                "recovery_key": keys.public_key.hex(),
                "recovery_sign_seed": bytes(keys.signing_key).hex(),
                "backup_seed": keys.backup_seed.hex(),
            }
        )
    return {"cases": cases}


V2_SECTIONS: dict[str, Callable[[], Any]] = {
    "device_lists": v2_device_lists,
    "webauthn": v2_webauthn,
    "recovery": v2_recovery,
    "sessions": vectors_sessions.sessions_section,  # handshake, ratchet, sealed sender v2 (owner "sessions")
    "enrolment": vectors_enrolment.compute,  # link codes and signed prekeys (owner "prekeys-enrolment")
}


def build_v2() -> dict[str, Any]:
    return {"version": "v2", **{name: section() for name, section in V2_SECTIONS.items()}}


# -- device-list format 3 (protocol/vectors/v3.json, docs/crypto.md §3.6) ------------------------------------
#
# Same pattern as V2_SECTIONS. Device n has Ed25519 seed "a<n>"*32, box key "b<n>"*32 and ML-KEM-768 seed
# "c<n>"*64 (d ‖ z of FIPS 203); tests/protocol/test_device_list_v3.py checks the file.

VECTORS_V3 = VECTORS.with_name("v3.json")


def _v3_device(n: int) -> tuple[nacl.signing.SigningKey, bytes, bytes]:
    """(signing key, box key, kem_key) of device ``n`` (1-9)."""
    kem_seed = bytes.fromhex(f"c{n}" * 64)
    return _seed_key(f"a{n}" * 32), bytes.fromhex(f"b{n}" * 32), handshake.mlkem_public(kem_seed)


def _v3_entry(n: int, at: int, role: str = "device", scopes: tuple[str, ...] = ()) -> Any:
    key, box, kem = _v3_device(n)
    return device_list.device_entry(
        bytes(key.verify_key),
        box,
        added_at_ms=at,
        kem_key=kem,
        role=role,  # type: ignore[arg-type]
        scopes=scopes,  # type: ignore[arg-type]
    )


def _v3_inputs(ns: tuple[int, ...]) -> dict[str, Any]:
    return {
        "device_seeds": [f"a{n}" * 32 for n in ns],
        "box_keys": [f"b{n}" * 32 for n in ns],
        "kem_seeds": [f"c{n}" * 64 for n in ns],
    }


def v3_roles() -> dict[str, Any]:
    """A format-3 genesis, then a device, an integration (receive, send) and an archiver added by device 1."""
    first, box_first, kem_first = _v3_device(1)
    genesis = device_list.genesis_v3(first, box_first, kem_first, now_ms=V2_T0)
    versions, head = [genesis], genesis.device_list
    for step, (n, role, scopes) in enumerate(
        [(2, "device", ()), (3, "integration", ("receive", "send")), (4, "archiver", ())], start=1
    ):
        t = V2_T0 + 1000 * step
        dl = device_list.next_version(head, add_devices=[_v3_entry(n, t, role, scopes)], now_ms=t)
        versions.append(
            device_list.signed_list(dl, [device_list.approve(dl, first), device_list.approve(dl, _v3_device(n)[0])])
        )
        head = dl
    return {
        "description": (
            "v1 format-3 genesis of device 1; v2 adds device 2 (role device); v3 adds device 3 (role integration, "
            "scopes receive and send); v4 adds device 4 (role archiver); each approved by device 1 and self-signed "
            "by the added device"
        ),
        "inputs": _v3_inputs((1, 2, 3, 4)),
        "account_id": genesis.device_list.account_id,
        "receives_account_key_grants": {d.device_id: device_list.receives_account_key_grants(d) for d in head.devices},
        "versions": [_signed_case(v) for v in versions],
    }


def v3_upgrade() -> dict[str, Any]:
    """A format-2 account with two devices upgraded to format 3: device 1 upgrades (its kem_key only), then
    device 2 publishes its own kem_key by a version it signs."""
    (first, box_first, kem_first), (second, box_second, kem_second) = _v3_device(1), _v3_device(2)
    genesis = device_list.genesis_v2(first, box_first, now_ms=V2_T0)
    first_id = genesis.device_list.devices[0].device_id
    v2 = device_list.next_version(
        genesis.device_list,
        add_devices=[device_list.device_entry(bytes(second.verify_key), box_second, added_at_ms=V2_T0 + 1000)],
        now_ms=V2_T0 + 1000,
    )
    signed2 = device_list.signed_list(v2, [device_list.approve(v2, first), device_list.approve(v2, second)])
    v3 = device_list.next_version(
        v2, format=device_list.FORMAT_3, set_kem_keys={first_id: kem_first}, now_ms=V2_T0 + 2000
    )
    signed3 = device_list.signed_list(v3, [device_list.approve(v3, first)])
    second_id = device_list.device_entry(bytes(second.verify_key), box_second, added_at_ms=0).device_id
    v4 = device_list.next_version(v3, set_kem_keys={second_id: kem_second}, now_ms=V2_T0 + 3000)
    signed4 = device_list.signed_list(v4, [device_list.approve(v4, second)])
    return {
        "description": (
            "v1 format-2 genesis; v2 adds device 2 (format 2); v3 upgrades to format 3 with device 1's kem_key only "
            "(device 2's entry carried over with an empty kem_key), signed by device 1; v4 sets device 2's kem_key, "
            "signed by device 2"
        ),
        "inputs": _v3_inputs((1, 2)),
        "account_id": genesis.device_list.account_id,
        "versions": [_signed_case(v) for v in (genesis, signed2, signed3, signed4)],
    }


def v3_refused() -> dict[str, Any]:
    """Versions after the head of ``v3_roles`` that every relay and client must refuse, with their error code."""
    roles = v3_roles()
    head = codec.decode(bytes.fromhex(roles["versions"][-1]["msgpack"]), SignedDeviceList).device_list
    t = V2_T0 + 10_000
    integration, archiver = _v3_device(3)[0], _v3_device(4)[0]
    newcomer = _v3_device(5)[0]
    cases = []
    for name, signers, changes in (
        ("integration approves an added device", [integration, newcomer], {"add_devices": [_v3_entry(5, t)]}),
        ("archiver approves an added device", [archiver, newcomer], {"add_devices": [_v3_entry(5, t)]}),
        (
            "integration changes the policy",
            [integration],
            {"policy": Policy(threshold=1, require_user_verification=True)},
        ),
        (
            "integration co-signs beside device 1",
            [_v3_device(1)[0], integration, newcomer],
            {"add_devices": [_v3_entry(5, t)]},
        ),
    ):
        dl = device_list.next_version(head, now_ms=t, **changes)  # type: ignore[arg-type]
        signed = device_list.signed_list(dl, [device_list.approve(dl, k) for k in signers])
        try:
            device_list.evaluate_version(head, signed)
        except TetherlessError as exc:
            code = exc.code.value
        else:  # pragma: no cover - the generator refuses to write a vector that is not refused
            raise AssertionError(name)
        cases.append({"name": name, "after_version": head.version, "code": code, **_signed_case(signed)})
    return {"inputs": _v3_inputs((1, 3, 4, 5)), "cases": cases}


def v3_enrolment_offer() -> dict[str, Any]:
    """The offer MAC over a kem_key (domain link-offer/2, crypto.md §5.1) for the first link secret of v2.json."""
    secret, relay = bytes.fromhex(vectors_enrolment.SECRETS[0]), vectors_enrolment.RELAYS[0]
    sign_key = bytes(_seed_key(vectors_enrolment.SIGN_SEED).verify_key)
    box_key = bytes.fromhex(vectors_enrolment.BOX_KEY)
    kem_key = _v3_device(1)[2]
    created = vectors_enrolment.CREATED_AT_MS
    return {
        "secret": secret.hex(),
        "relay": relay,
        "sign_key": sign_key.hex(),
        "box_key": box_key.hex(),
        "kem_key": kem_key.hex(),
        "created_at_ms": created,
        "layout": signing.layout(
            "link-offer/2", relay, enrolment.lookup_id(secret, relay), sign_key, box_key, kem_key, created
        ).hex(),
        "offer_mac": enrolment.offer_mac(secret, relay, sign_key, box_key, created, kem_key).hex(),
    }


V3_SECTIONS: dict[str, Callable[[], Any]] = {
    "roles": v3_roles,
    "upgrade": v3_upgrade,
    "refused": v3_refused,
    "enrolment_offer": v3_enrolment_offer,
}


def build_v3() -> dict[str, Any]:
    return {"version": "v3", **{name: section() for name, section in V3_SECTIONS.items()}}


# -- recovery backup records (protocol/vectors/recovery-v2.json, docs/account-log.md §5.7) ----------------
# ML-KEM encapsulation draws its own randomness, so its ciphertext is an *input* (kept from the file when it
# exists); the shared secret follows by deterministic decapsulation, everything else is recomputed.

VECTORS_RECOVERY_V2 = VECTORS.with_name("recovery-v2.json")


def build_recovery_v2(existing: dict[str, Any] | None = None) -> dict[str, Any]:
    """Recovery text -> backup public keys -> a backup record (epochs 1-2, written by SEEDS[1]) that opens."""
    entropy = bytes.fromhex("0123456789abcdef0123456789abcdef01234567")
    writer = _seed_key(SEEDS[1])
    account_id, writer_device = ids(SEEDS[1])["account_id"], ids(SEEDS[1])["device_id"]
    keys = recovery.recovery_keys(entropy, account_id)
    recipient = recovery.backup_recipient(keys)
    key_hash = recovery.backup_key_hash(recipient)
    epoch_keys = {1: bytes([0x11]) * 32, 2: bytes([0x22]) * 32}
    if existing is not None:
        kem_ciphertext = bytes.fromhex(existing["kem_ciphertext"])
    else:
        kem_ciphertext, _ = handshake.encapsulate(recipient.kem_public)
    ephemeral = bytes(range(32))
    version, created_at_ms = 3, 1_764_000_000_000
    ciphertext = log.make_recovery_backup(
        writer,
        account_id=account_id,
        writer_device=writer_device,
        epoch=2,
        keys=epoch_keys,
        device_list_version=version,
        recipient=recipient,
        created_at_ms=created_at_ms,
        ephemeral_private_key=ephemeral,
        kem_ciphertext=kem_ciphertext,
        kem_shared_secret=handshake.mlkem_decapsulate(keys.mlkem_seed, kem_ciphertext),
    )
    return {
        "version": "recovery-v2",
        "text": recovery.new_recovery_secret(entropy),
        "account_id": account_id,
        "backup_x25519_public": recipient.x25519_public.hex(),
        "backup_kem_public": recipient.kem_public.hex(),
        "recovery_backup_key_hash": key_hash.hex(),
        "writer_device": writer_device,
        "writer_sign_key": bytes(writer.verify_key).hex(),
        "device_list_version": version,
        "epoch": 2,
        "created_at_ms": created_at_ms,
        "keys": {str(e): k.hex() for e, k in epoch_keys.items()},
        "ephemeral_private_key": ephemeral.hex(),
        "kem_ciphertext": kem_ciphertext.hex(),
        "context": log.recovery_backup_context(account_id, 2, version, writer_device, key_hash).hex(),
        "record_id": log.recovery_backup_id(account_id, 2, key_hash).hex(),
        "ciphertext": ciphertext.hex(),
    }


if __name__ == "__main__":
    VECTORS.write_text(json.dumps(build(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    VECTORS_V2.write_text(json.dumps(build_v2(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    VECTORS_V3.write_text(json.dumps(build_v3(), indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    old = json.loads(VECTORS_RECOVERY_V2.read_text(encoding="utf-8")) if VECTORS_RECOVERY_V2.exists() else None
    VECTORS_RECOVERY_V2.write_text(json.dumps(build_recovery_v2(old), indent=2) + "\n", encoding="utf-8")
    print(f"wrote {VECTORS}, {VECTORS_V2}, {VECTORS_V3} and {VECTORS_RECOVERY_V2}", file=sys.stderr)
