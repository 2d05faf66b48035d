"""Format-3 device lists (docs/crypto.md §3.6): ML-KEM keys, roles and scopes, the role rule, 2 -> 3 upgrades."""

from __future__ import annotations

import hashlib
import hmac
import json
from typing import Any

import msgspec
import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from protocol import codec, enrolment, handshake, signing
from protocol import device_list as dlm
from protocol.device_list import FORMAT_2, FORMAT_3, evaluate_version, receives_account_key_grants, verify_chain
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import DeviceEntry, DeviceList, DeviceListChain, Policy, SignedDeviceList
from tests.protocol import vectors_gen
from tests.protocol.test_device_list_v2 import RECOVERY, T0, box, code_of, device_id, key, sign


def kem(n: int) -> bytes:
    return handshake.mlkem_public(hashlib.sha512(b"kem %d" % n).digest())


def entry3(n: int, role: str = "device", scopes: tuple[str, ...] = (), at: int = T0) -> DeviceEntry:
    return dlm.device_entry(
        bytes(key(n).verify_key),
        box(n),
        added_at_ms=at,
        kem_key=kem(n),
        role=role,  # type: ignore[arg-type]
        scopes=scopes,  # type: ignore[arg-type]
    )


class Chain3:
    """A growing format-3 (or format-2, then upgraded) chain, checked with verify_chain at every step."""

    def __init__(self, *, format_2: bool = False, recovery: bool = False) -> None:
        rk = RECOVERY if recovery else None
        if format_2:
            genesis = dlm.genesis_v2(key(1), box(1), now_ms=T0, recovery_key=rk)
        else:
            genesis = dlm.genesis_v3(key(1), box(1), kem(1), now_ms=T0, recovery_key=rk)
        self.versions = [genesis]
        self.t = T0

    @property
    def head(self) -> DeviceList:
        return self.versions[-1].device_list

    def build(self, **changes: object) -> DeviceList:
        self.t += 1000
        return dlm.next_version(self.head, now_ms=self.t, **changes)  # type: ignore[arg-type]

    def push(self, signed: SignedDeviceList) -> dlm.VersionChange:
        ever = {d.device_id for v in self.versions for d in v.device_list.devices}
        change = evaluate_version(self.head, signed, removed_ids=ever - {d.device_id for d in self.head.devices})
        self.versions.append(signed)
        assert verify_chain(self.chain(), self.head.account_id).head == signed.device_list
        return change

    def chain(self) -> DeviceListChain:
        return DeviceListChain(account_id=self.head.account_id, versions=self.versions)


def with_integration(*, scopes: tuple[str, ...] = ("send",)) -> Chain3:
    """Devices 1 (device) and 2 (integration), 3 (archiver), added by device 1 with their self-signatures."""
    c = Chain3()
    c.push(sign(c.build(add_devices=[entry3(2, "integration", scopes)]), [1, 2]))
    c.push(sign(c.build(add_devices=[entry3(3, "archiver")]), [1, 3]))
    return c


# -- genesis and layout ---------------------------------------------------------------------------


def test_genesis_v3() -> None:
    signed = dlm.genesis_v3(key(1), box(1), kem(1), now_ms=T0)
    device = dlm.verify_genesis(signed)
    assert signed.device_list.format == FORMAT_3
    assert (device.kem_key, device.role, device.scopes) == (kem(1), "device", [])
    with pytest.raises(ValueError, match="kem_key"):
        dlm.genesis_v3(key(1), box(1), b"", now_ms=T0)


@pytest.mark.parametrize("how", ["integration", "no_kem_key"])
def test_bad_genesis_v3(how: str) -> None:
    signed = dlm.genesis_v3(key(1), box(1), kem(1), now_ms=T0)
    dl = signed.device_list
    device = dl.devices[0]
    if how == "integration":
        device = msgspec.structs.replace(device, role="integration", scopes=["send"])
    else:
        device = msgspec.structs.replace(device, kem_key=b"")
    dl = msgspec.structs.replace(dl, devices=[device])
    with pytest.raises(TetherlessError) as info:
        dlm.verify_genesis(sign(dl, [1]))
    assert info.value.code is ErrorCode.INVALID_DEVICE_LIST


def test_layout_v3_spelled_out() -> None:
    c = Chain3(recovery=True)
    dl = c.build(add_devices=[entry3(2, "integration", ("receive", "send"))], policy=Policy(threshold=1))
    fields: list[signing.Field] = [dl.account_id, dl.version, dl.prev_hash, dl.created_at_ms, 1, 0, 0, 0]
    fields += [bytes(RECOVERY.verify_key), b"", 2]
    for n in sorted((1, 2), key=device_id):
        fields += [device_id(n), bytes(key(n).verify_key), box(n), T0, kem(n)]
        fields += ["device", 0] if n == 1 else ["integration", 2, "receive", "send"]
    fields += [0]
    assert dlm.list_layout(dl) == signing.layout("device-list/3", *fields)
    # The same list in format 2 has another domain: a signature over one never verifies the other.
    assert dlm.list_layout(msgspec.structs.replace(dl, format=FORMAT_2))[:24] == b"tetherless/v1/device-lis"
    assert b"device-list/2" in dlm.list_layout(msgspec.structs.replace(dl, format=FORMAT_2))


def test_format_1_and_2_entries_encode_as_before() -> None:
    """The new DeviceEntry fields are omitted at their defaults; ``name`` stays encoded even when empty."""
    entry = dlm.device_entry(bytes(key(1).verify_key), box(1), added_at_ms=T0)
    raw = msgspec.msgpack.decode(codec.encode(entry))
    assert list(raw) == ["device_id", "sign_key", "box_key", "added_at_ms", "name"]
    full = msgspec.msgpack.decode(codec.encode(entry3(2, "integration", ("send",))))
    assert list(full) == ["device_id", "sign_key", "box_key", "added_at_ms", "name", "kem_key", "role", "scopes"]


def test_format_3_round_trips_in_both_encodings() -> None:
    c = with_integration()
    for message in (c.versions[-1], c.chain()):
        for media_type in (codec.MSGPACK, codec.JSON):
            assert codec.decode(codec.encode(message, media_type), type(message), media_type) == message


@pytest.mark.parametrize(
    ("path", "value"),
    [("role", "admin"), ("scopes", ["everything"]), ("kem_key", b"k" * 1185)],
)
def test_decoder_refuses_unknown_roles_scopes_and_long_keys(path: str, value: object) -> None:
    raw = msgspec.to_builtins(with_integration().versions[-1])
    raw["device_list"]["devices"][0][path] = value
    with pytest.raises(TetherlessError) as info:
        codec.decode(codec.encode(raw), SignedDeviceList)
    assert info.value.code is ErrorCode.INVALID_FIELD


# -- structure ------------------------------------------------------------------------------------


def structure_case(mutate: str) -> DeviceList:
    dl = with_integration().head
    devices = list(dl.devices)
    i = next(i for i, d in enumerate(devices) if d.device_id == device_id(2))  # the integration
    j = next(i for i, d in enumerate(devices) if d.device_id == device_id(1))  # the device
    if mutate == "format_2_with_kem_key":
        return msgspec.structs.replace(
            dl, format=FORMAT_2, devices=[msgspec.structs.replace(d, role="device", scopes=[]) for d in devices]
        )
    if mutate == "format_2_with_role":
        return msgspec.structs.replace(
            dl, format=FORMAT_2, devices=[msgspec.structs.replace(d, kem_key=b"") for d in devices]
        )
    if mutate == "short_kem_key":
        devices[i] = msgspec.structs.replace(devices[i], kem_key=b"k" * 1183)
    elif mutate == "invalid_kem_key":
        devices[i] = msgspec.structs.replace(devices[i], kem_key=b"\xff" * 1184)
    elif mutate == "shared_kem_key":
        devices[i] = msgspec.structs.replace(devices[i], kem_key=devices[j].kem_key)
    elif mutate == "unsorted_scopes":
        devices[i] = msgspec.structs.replace(devices[i], scopes=["send", "receive"])
    elif mutate == "repeated_scope":
        devices[i] = msgspec.structs.replace(devices[i], scopes=["send", "send"])
    elif mutate == "integration_without_scopes":
        devices[i] = msgspec.structs.replace(devices[i], scopes=[])
    elif mutate == "device_with_scopes":
        devices[j] = msgspec.structs.replace(devices[j], scopes=["send"])
    elif mutate == "archiver_with_scopes":
        k = next(k for k, d in enumerate(devices) if d.role == "archiver")
        devices[k] = msgspec.structs.replace(devices[k], scopes=["receive"])
    elif mutate == "threshold_counts_only_devices":
        return msgspec.structs.replace(dl, policy=Policy(threshold=2))
    elif mutate != "none":
        raise AssertionError(mutate)
    return msgspec.structs.replace(dl, devices=devices)


STRUCTURE_CASES = [
    "format_2_with_kem_key",
    "format_2_with_role",
    "short_kem_key",
    "invalid_kem_key",
    "shared_kem_key",
    "unsorted_scopes",
    "repeated_scope",
    "integration_without_scopes",
    "device_with_scopes",
    "archiver_with_scopes",
    "threshold_counts_only_devices",
]


@pytest.mark.parametrize("mutate", STRUCTURE_CASES)
def test_structure_rejections(mutate: str) -> None:
    with pytest.raises(TetherlessError) as info:
        dlm.check_structure(structure_case(mutate))
    assert info.value.code is ErrorCode.INVALID_DEVICE_LIST


def test_unchanged_structure_case_is_valid() -> None:
    dlm.check_structure(structure_case("none"))


# -- the role rule ----------------------------------------------------------------------------------


def test_roles_and_history() -> None:
    c = with_integration()
    roles = {d.role: receives_account_key_grants(d) for d in c.head.devices}
    assert roles == {"device": True, "integration": False, "archiver": True}
    assert receives_account_key_grants(dlm.device_entry(bytes(key(9).verify_key), box(9), added_at_ms=T0))


def test_an_integration_is_added_by_a_device_with_its_self_signature() -> None:
    c = Chain3()
    change = c.push(sign(c.build(add_devices=[entry3(2, "integration", ("receive",))]), [1, 2]))
    assert change.approving_devices == [device_id(1)]
    c2 = Chain3()
    # Its self-signature alone is a proof of possession, not an approval.
    assert code_of(c2.head, sign(c2.build(add_devices=[entry3(2, "integration", ("send",))]), [2])) is (
        ErrorCode.POLICY_NOT_MET
    )


@pytest.mark.parametrize("signer", [2, 3], ids=["integration", "archiver"])
def test_a_non_device_role_cannot_approve(signer: int) -> None:
    """Adding a device, changing the policy or removing one: refused when approved only by an integration or an
    archiver, and refused too when its signature sits beside a valid device approval."""
    c = with_integration()
    add = c.build(add_devices=[entry3(4)])
    assert code_of(c.head, sign(add, [signer, 4])) is ErrorCode.POLICY_NOT_MET
    assert code_of(c.head, sign(add, [1, signer, 4])) is ErrorCode.POLICY_NOT_MET
    policy = c.build(policy=Policy(threshold=1, require_user_verification=True))
    assert code_of(c.head, sign(policy, [signer])) is ErrorCode.POLICY_NOT_MET
    remove = c.build(remove_device_ids=[device_id(5 - signer)])  # the other non-device entry
    assert code_of(c.head, sign(remove, [signer])) is ErrorCode.POLICY_NOT_MET
    # Removing the last role-device entry leaves nobody who may approve: refused as a structure error.
    assert code_of(c.head, sign(c.build(remove_device_ids=[device_id(1)]), [1])) is ErrorCode.INVALID_DEVICE_LIST
    c.push(sign(add, [1, 4]))  # control: the device alone approves


def test_a_device_removes_an_integration() -> None:
    c = with_integration()
    change = c.push(sign(c.build(remove_device_ids=[device_id(2)]), [1]))
    assert [d.device_id for d in change.removed] == [device_id(2)]
    assert c.head.account_key_epoch == 1


def test_a_role_or_scope_never_changes() -> None:
    c = with_integration()
    for changed in (
        msgspec.structs.replace(entry3(2, "integration", ("send",)), role="device", scopes=[]),
        msgspec.structs.replace(entry3(2, "integration", ("send",)), scopes=["receive", "send"]),
        msgspec.structs.replace(entry3(2, "integration", ("send",)), kem_key=kem(7)),
    ):
        dl = c.build()
        devices = sorted([*(d for d in dl.devices if d.device_id != device_id(2)), changed], key=lambda d: d.device_id)
        assert code_of(c.head, sign(msgspec.structs.replace(dl, devices=devices), [1, 2])) is (
            ErrorCode.INVALID_DEVICE_LIST
        )


def test_an_added_device_needs_a_kem_key_in_format_3() -> None:
    c = Chain3()
    bare = dlm.device_entry(bytes(key(2).verify_key), box(2), added_at_ms=T0)
    assert code_of(c.head, sign(c.build(add_devices=[bare]), [1, 2])) is ErrorCode.INVALID_DEVICE_LIST


# -- format transitions ----------------------------------------------------------------------------------


def upgraded_pair() -> Chain3:
    """A format-2 account with devices 1 and 2, upgraded to format 3 by device 1 (its own kem_key only)."""
    c = Chain3(format_2=True)
    c.push(sign(c.build(add_devices=[dlm.device_entry(bytes(key(2).verify_key), box(2), added_at_ms=T0)]), [1, 2]))
    change = c.push(sign(c.build(format=FORMAT_3, set_kem_keys={device_id(1): kem(1)}), [1]))
    assert change.approving_devices == [device_id(1)]
    return c


def test_upgrade_from_format_2() -> None:
    c = upgraded_pair()
    kems = {d.device_id: d.kem_key for d in c.head.devices}
    assert (c.head.format, kems) == (FORMAT_3, {device_id(1): kem(1), device_id(2): b""})
    # Device 2 then publishes its own key by a version it signs (its signature approves it, threshold 1) ...
    c.push(sign(c.build(set_kem_keys={device_id(2): kem(2)}), [2]))
    assert all(d.kem_key for d in c.head.devices)


def test_a_kem_key_is_set_only_by_its_device() -> None:
    c = upgraded_pair()
    assert code_of(c.head, sign(c.build(set_kem_keys={device_id(2): kem(2)}), [1])) is ErrorCode.POLICY_NOT_MET
    # ... and under a threshold of 2 its own signature is not enough: another device approves too.
    c.push(sign(c.build(policy=Policy(threshold=2)), [1]))
    assert code_of(c.head, sign(c.build(set_kem_keys={device_id(2): kem(2)}), [2])) is ErrorCode.POLICY_NOT_MET
    c.push(sign(c.build(set_kem_keys={device_id(2): kem(2)}), [1, 2]))


def test_an_upgrade_version_cannot_clear_a_kem_key() -> None:
    c = Chain3()
    dl = c.build()
    dl = msgspec.structs.replace(dl, devices=[msgspec.structs.replace(dl.devices[0], kem_key=b"")])
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.INVALID_DEVICE_LIST


def test_format_3_cannot_go_back_to_2() -> None:
    c = upgraded_pair()
    dl = c.build(format=FORMAT_2)
    dl = msgspec.structs.replace(dl, devices=[msgspec.structs.replace(d, kem_key=b"") for d in dl.devices])
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.INVALID_DEVICE_LIST


def test_format_1_upgrades_to_format_3() -> None:
    genesis = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    dl = dlm.next_version(genesis.device_list, format=FORMAT_3, set_kem_keys={device_id(1): kem(1)}, now_ms=T0 + 1)
    chain = DeviceListChain(account_id=dl.account_id, versions=[genesis, sign(dl, [1])])
    head = verify_chain(chain, dl.account_id).head
    assert (head.format, head.devices[0].name, head.devices[0].kem_key) == (FORMAT_3, "", kem(1))


def test_next_version_keeps_format_3_and_refuses_unknown_kem_targets() -> None:
    c = Chain3()
    assert c.build().format == FORMAT_3
    assert Chain3(format_2=True).build().format == FORMAT_2
    with pytest.raises(ValueError, match="no such device"):
        c.build(set_kem_keys={device_id(9): kem(9)})


# -- a relay's forged chain, as a client verifies it ----------------------------------------------------


def test_client_refuses_a_chain_with_a_version_approved_only_by_an_integration() -> None:
    """The relay inserts a version that adds its own device, signed by a (compromised) integration: the whole
    chain is refused by verify_chain (what RelayClient.device_chain runs), not just that version."""
    c = with_integration()
    forged = c.build(add_devices=[entry3(66)])
    chain = DeviceListChain(account_id=c.head.account_id, versions=[*c.versions, sign(forged, [2, 66])])
    with pytest.raises(TetherlessError) as info:
        verify_chain(chain, c.head.account_id)
    assert info.value.code is ErrorCode.POLICY_NOT_MET
    assert "role integration" in info.value.detail


# -- protocol/vectors/v3.json --------------------------------------------------------------------------

VECTORS_V3 = json.loads(vectors_gen.VECTORS_V3.read_text(encoding="utf-8"))


@pytest.mark.parametrize("section", list(vectors_gen.V3_SECTIONS))
def test_v3_file_matches_computation(section: str) -> None:
    assert vectors_gen.V3_SECTIONS[section]() == VECTORS_V3[section], "regenerate v3.json only on purpose"


def _versions(case: dict[str, Any]) -> list[SignedDeviceList]:
    versions = [codec.decode(bytes.fromhex(v["msgpack"]), SignedDeviceList) for v in case["versions"]]
    for signed, v in zip(versions, case["versions"], strict=True):
        assert dlm.list_layout(signed.device_list).hex() == v["layout"]
        assert hashlib.sha256(bytes.fromhex(v["layout"])).hexdigest() == v["hash"]
    return versions


def test_v3_roles_chain_verifies() -> None:
    case = VECTORS_V3["roles"]
    versions = _versions(case)
    result = verify_chain(DeviceListChain(account_id=case["account_id"], versions=versions), case["account_id"])
    assert [v.device_list.format for v in versions] == [FORMAT_3] * 4
    assert {d.device_id: receives_account_key_grants(d) for d in result.devices} == case["receives_account_key_grants"]
    assert sorted(d.kem_key.hex() for d in result.devices) == sorted(
        handshake.mlkem_public(bytes.fromhex(seed)).hex() for seed in case["inputs"]["kem_seeds"]
    )


def test_v3_genesis_layout_spelled_out() -> None:
    # Written from docs/crypto.md §3.6, independent of protocol.device_list.
    case = VECTORS_V3["roles"]
    genesis = codec.decode(bytes.fromhex(case["versions"][0]["msgpack"]), SignedDeviceList).device_list
    (device,) = genesis.devices
    expected = signing.layout(
        "device-list/3",
        case["account_id"],
        1,
        b"",
        genesis.created_at_ms,
        1,  # threshold
        0,  # require_webauthn
        0,  # require_user_verification
        0,  # account_key_epoch
        b"",  # recovery_key
        b"",  # recovery_backup_key_hash
        1,
        device.device_id,
        device.sign_key,
        bytes.fromhex(case["inputs"]["box_keys"][0]),
        genesis.created_at_ms,
        handshake.mlkem_public(bytes.fromhex(case["inputs"]["kem_seeds"][0])),
        "device",
        0,  # no scopes
        0,  # no credentials
    )
    assert expected.hex() == case["versions"][0]["layout"]


def test_v3_upgrade_chain_verifies() -> None:
    case = VECTORS_V3["upgrade"]
    versions = _versions(case)
    assert [v.device_list.format for v in versions] == [FORMAT_2, FORMAT_2, FORMAT_3, FORMAT_3]
    upgraded = {d.sign_key: d.kem_key for d in versions[2].device_list.devices}
    first = bytes(vectors_gen._seed_key(case["inputs"]["device_seeds"][0]).verify_key)
    assert {k: bool(v) for k, v in upgraded.items()} == {k: k == first for k in upgraded}
    result = verify_chain(DeviceListChain(account_id=case["account_id"], versions=versions), case["account_id"])
    assert all(d.kem_key for d in result.devices)


@pytest.mark.parametrize("index", range(len(VECTORS_V3["refused"]["cases"])))
def test_v3_refused_versions(index: int) -> None:
    case = VECTORS_V3["refused"]["cases"][index]
    versions = _versions(VECTORS_V3["roles"])
    head = versions[case["after_version"] - 1].device_list
    signed = codec.decode(bytes.fromhex(case["msgpack"]), SignedDeviceList)
    assert code_of(head, signed) is ErrorCode(case["code"])


def test_v3_offer_mac_spelled_out() -> None:
    case = VECTORS_V3["enrolment_offer"]
    secret, relay = bytes.fromhex(case["secret"]), case["relay"]
    key_offer = HKDF(
        algorithm=hashes.SHA256(), length=32, salt=bytes(32), info=signing.layout("link-offer", relay)
    ).derive(secret)
    lookup = HKDF(algorithm=hashes.SHA256(), length=10, salt=bytes(32), info=signing.layout("link-lookup", relay))
    layout = signing.layout(
        "link-offer/2",
        relay,
        lookup.derive(secret),
        bytes.fromhex(case["sign_key"]),
        bytes.fromhex(case["box_key"]),
        bytes.fromhex(case["kem_key"]),
        case["created_at_ms"],
    )
    assert layout.hex() == case["layout"]
    assert hmac.new(key_offer, layout, hashlib.sha256).hexdigest() == case["offer_mac"]


# -- the enrolment offer carries the kem_key under its MAC (crypto.md §5.1) -------------------------------


def test_offer_mac_covers_the_kem_key() -> None:
    """The relay stores the offer: stripping N's kem_key, or swapping in its own, breaks the MAC."""
    from tests.protocol.test_enrolment import RELAY, SECRET, new_device

    key_n, box_key, bundle = new_device()
    offer = enrolment.make_offer(SECRET, RELAY, key_n, box_key, bundle, 1234, kem_key=kem(1))
    enrolment.verify_offer_mac(SECRET, offer)
    enrolment.verify_offer_prekeys(offer)
    for changed in (msgspec.structs.replace(offer, kem_key=b""), msgspec.structs.replace(offer, kem_key=kem(2))):
        with pytest.raises(enrolment.LinkCodeMismatchError):
            enrolment.verify_offer_mac(SECRET, changed)
    legacy = enrolment.make_offer(SECRET, RELAY, key_n, box_key, bundle, 1234)
    with pytest.raises(enrolment.LinkCodeMismatchError):  # a legacy MAC does not admit an added kem_key either
        enrolment.verify_offer_mac(SECRET, msgspec.structs.replace(legacy, kem_key=kem(1)))
    with pytest.raises(TetherlessError) as info:
        enrolment.verify_offer_prekeys(msgspec.structs.replace(offer, kem_key=b"\xff" * 1184))
    assert info.value.code is ErrorCode.PREKEY_INVALID
