"""Format-2 device lists (docs/crypto.md §3): policies, approvals, proofs of possession, every rejection."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import msgspec
import nacl.signing
import pytest

from protocol import codec, signing
from protocol import device_list as dlm
from protocol.device_list import (
    DeviceListForkError,
    DeviceListRollbackError,
    VersionChange,
    evaluate_version,
    verify_chain,
    verify_genesis,
)
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import (
    DeviceEntry,
    DeviceList,
    DeviceListAccepted,
    DeviceListChain,
    DeviceListChanged,
    DeviceListSignature,
    Policy,
    PostDeviceListRequest,
    SignedDeviceList,
    StreamItem,
    WebAuthnAssertion,
)
from tests.support.soft_authenticator import SoftAuthenticator

RP = "relay.example"
T0 = 1_700_000_000_000


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"device %d" % n).digest())


def box(n: int) -> bytes:
    return hashlib.sha256(b"box %d" % n).digest()


def entry(n: int, at: int = T0) -> DeviceEntry:
    return dlm.device_entry(bytes(key(n).verify_key), box(n), added_at_ms=at)


def device_id(n: int) -> str:
    return entry(n).device_id


RECOVERY = nacl.signing.SigningKey(b"\x11" * 32)
NEW_RECOVERY = nacl.signing.SigningKey(b"\x12" * 32)


def sign(
    dl: DeviceList,
    signers: Sequence[int] = (),
    *,
    recovery: Sequence[nacl.signing.SigningKey] = (),
    assertions: Sequence[SoftAuthenticator] = (),
    uv: bool = False,
) -> SignedDeviceList:
    challenge = dlm.list_hash(dl)
    return dlm.signed_list(
        dl,
        [dlm.approve(dl, key(n)) for n in signers],
        recovery_signatures=[dlm.sign_recovery(dl, k) for k in recovery],
        webauthn_assertions=[a.get_assertion(challenge, user_verified=uv) for a in assertions],
    )


def code_of(prev: DeviceList, signed: SignedDeviceList, **kwargs: object) -> ErrorCode:
    with pytest.raises(TetherlessError) as info:
        evaluate_version(prev, signed, **kwargs)  # type: ignore[arg-type]
    return info.value.code


class Chain:
    """A growing chain with helpers, checked against verify_chain at every step."""

    def __init__(self, *, recovery: bool = False) -> None:
        genesis = dlm.genesis_v2(key(1), box(1), now_ms=T0, recovery_key=RECOVERY if recovery else None)
        self.versions = [genesis]
        self.t = T0

    @property
    def head(self) -> DeviceList:
        return self.versions[-1].device_list

    def build(self, **changes: object) -> DeviceList:
        self.t += 1000
        return dlm.next_version(self.head, now_ms=self.t, **changes)  # type: ignore[arg-type]

    def push(self, signed: SignedDeviceList) -> VersionChange:
        change = evaluate_version(self.head, signed, removed_ids=self.removed_ids())
        self.versions.append(signed)
        assert verify_chain(self.chain(), self.account).head == signed.device_list
        return change

    def removed_ids(self) -> set[str]:
        ever = {d.device_id for v in self.versions for d in v.device_list.devices}
        return ever - {d.device_id for d in self.head.devices}

    @property
    def account(self) -> str:
        return self.head.account_id

    def chain(self, versions: list[SignedDeviceList] | None = None) -> DeviceListChain:
        return DeviceListChain(account_id=self.account, versions=versions if versions is not None else self.versions)


def with_devices(*ns: int) -> Chain:
    """A chain whose head has devices ``ns`` (1 first), each added by device 1 with its self-signature."""
    c = Chain()
    for n in ns:
        if n != 1:
            c.push(sign(c.build(add_devices=[entry(n)]), [1, n]))
    return c


# -- genesis --------------------------------------------------------------------------------------


def test_genesis_v2() -> None:
    signed = dlm.genesis_v2(key(1), box(1), now_ms=T0)
    dl = signed.device_list
    assert (dl.format, dl.version, dl.prev_hash, dl.policy, dl.recovery_key) == (2, 1, b"", Policy(), b"")
    assert verify_genesis(signed) == entry(1)
    assert dlm.list_layout(dl).startswith(b"tetherless/v1/device-list/2\x00")
    result = verify_chain(DeviceListChain(account_id=dl.account_id, versions=[signed]), dl.account_id)
    assert result.devices == [entry(1)]
    assert result.mark == (1, dlm.list_hash(dl))


def test_genesis_v2_with_recovery_key_and_policy() -> None:
    policy = Policy(require_user_verification=True)
    signed = dlm.genesis_v2(key(1), box(1), now_ms=T0, policy=policy, recovery_key=RECOVERY)
    assert signed.device_list.recovery_key == bytes(RECOVERY.verify_key)
    assert len(signed.recovery_signatures) == 1
    verify_genesis(signed)


def genesis_code(signed: SignedDeviceList) -> ErrorCode:
    with pytest.raises(TetherlessError) as info:
        verify_genesis(signed)
    return info.value.code


def test_bad_genesis_v2() -> None:
    good = dlm.genesis_v2(key(1), box(1), now_ms=T0, recovery_key=RECOVERY)
    dl = good.device_list
    assert genesis_code(msgspec.structs.replace(good, recovery_signatures=[])) is ErrorCode.INVALID_DEVICE_LIST
    wrong = dlm.sign_recovery(dl, NEW_RECOVERY)
    assert genesis_code(msgspec.structs.replace(good, recovery_signatures=[wrong])) is ErrorCode.BAD_SIGNATURE
    assert genesis_code(msgspec.structs.replace(good, signatures=[])) is ErrorCode.INVALID_DEVICE_LIST
    named = msgspec.structs.replace(dl, devices=[msgspec.structs.replace(entry(1), name="laptop")])
    assert genesis_code(sign(named, [1], recovery=[RECOVERY])) is ErrorCode.INVALID_DEVICE_LIST
    two = msgspec.structs.replace(dl, policy=Policy(threshold=2))
    assert genesis_code(sign(two, [1], recovery=[RECOVERY])) is ErrorCode.INVALID_DEVICE_LIST
    webauthn = msgspec.structs.replace(dl, policy=Policy(require_webauthn=True))
    assert genesis_code(sign(webauthn, [1], recovery=[RECOVERY])) is ErrorCode.INVALID_DEVICE_LIST
    auth = SoftAuthenticator(RP)
    with_credential = msgspec.structs.replace(dl, credentials=[auth.credential()])
    assert genesis_code(sign(with_credential, [1], recovery=[RECOVERY])) is ErrorCode.INVALID_DEVICE_LIST
    short_key = msgspec.structs.replace(dl, recovery_key=b"\x01" * 31)
    assert genesis_code(sign(short_key, [1])) is ErrorCode.INVALID_DEVICE_LIST
    # signed by the genesis device's key, but the entry names another box key than the one it signed
    swapped = msgspec.structs.replace(good, device_list=msgspec.structs.replace(dl, devices=[entry(1, at=T0 + 1)]))
    assert genesis_code(swapped) is ErrorCode.BAD_SIGNATURE


def test_v1_genesis_still_verifies_and_keeps_its_encoding() -> None:
    v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    assert v1.device_list.format == 1
    verify_genesis(v1)
    encoded = msgspec.msgpack.encode(v1)
    for absent in (b"format", b"policy", b"credentials", b"recovery", b"epoch", b"webauthn_assertions"):
        assert absent not in encoded
    assert b"prev_hash" in encoded
    # a format-1 list cannot carry format-2 fields
    smuggled = msgspec.structs.replace(v1.device_list, policy=Policy(threshold=1, require_user_verification=True))
    assert genesis_code(sign(smuggled, [1])) is ErrorCode.INVALID_DEVICE_LIST


# -- threshold 1 ----------------------------------------------------------------------------------


def test_any_one_device_adds_a_device() -> None:
    c = Chain()
    dl = c.build(add_devices=[entry(2)])
    change = c.push(sign(dl, [1, 2]))
    assert change.added == [entry(2)]
    assert (change.removed, change.approving_devices, change.list_hash) == ([], [device_id(1)], dlm.list_hash(dl))
    assert [d.device_id for d in c.head.devices] == sorted([device_id(1), device_id(2)])


def test_the_backup_key_hash_changes_only_with_the_recovery_keys_signature() -> None:
    """account-log.md §5.7: a device alone cannot point the recovery backups at a key of its own choosing."""
    c = Chain(recovery=True)
    hash_a, hash_b = bytes([0xA]) * 32, bytes([0xB]) * 32
    dl = c.build(recovery_backup_key_hash=hash_a)
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET
    c.push(sign(dl, [1], recovery=[RECOVERY]))  # the secret's holder (device init, device recovery-key)
    new_recovery = nacl.signing.SigningKey(b"\x22" * 32)
    dl = c.build(recovery_key=bytes(new_recovery.verify_key), recovery_backup_key_hash=hash_b)
    c.push(sign(dl, [1], recovery=[new_recovery]))  # replaced together with the recovery key it belongs to
    dl = c.build(recovery_backup_key_hash=b"")
    c.push(sign(dl, [1]))  # clearing stops the backups and needs no secret
    dl = c.build(recovery_backup_key_hash=hash_a)
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET


def test_added_device_must_self_sign() -> None:
    c = Chain()
    dl = c.build(add_devices=[entry(2)])
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET


def test_self_signature_is_not_an_approval() -> None:
    c = Chain()
    dl = c.build(add_devices=[entry(2)])
    assert code_of(c.head, sign(dl, [2])) is ErrorCode.POLICY_NOT_MET


def test_a_device_removes_itself_and_the_epoch_advances() -> None:
    c = with_devices(1, 2)
    dl = c.build(remove_device_ids=[device_id(2)])
    assert dl.account_key_epoch == 1
    change = c.push(sign(dl, [2]))
    assert change.removed == [entry(2)]


def test_epoch_must_advance_by_one_on_removal_and_never_go_down() -> None:
    c = with_devices(1, 2)
    for epoch in (0, 2):
        dl = c.build(remove_device_ids=[device_id(2)], account_key_epoch=epoch)
        assert code_of(c.head, sign(dl, [1])) is ErrorCode.INVALID_DEVICE_LIST
    c.push(sign(c.build(account_key_epoch=5), [1]))  # rotation without removal: any step up
    dl = c.build(account_key_epoch=4)
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.INVALID_DEVICE_LIST


# -- k of n ---------------------------------------------------------------------------------------


def test_k_of_n() -> None:
    c = with_devices(1, 2, 3)
    c.push(sign(c.build(policy=Policy(threshold=2)), [1]))  # set by the threshold-1 policy of P
    dl = c.build(add_devices=[entry(4)])
    assert code_of(c.head, sign(dl, [1, 4])) is ErrorCode.POLICY_NOT_MET  # one approval, a dropped one
    change = c.push(sign(dl, [1, 3, 4]))
    assert change.approving_devices == sorted([device_id(1), device_id(3)])


def test_duplicate_approvals_do_not_count_twice() -> None:
    c = with_devices(1, 2)
    c.push(sign(c.build(policy=Policy(threshold=2)), [1]))
    dl = c.build(add_devices=[entry(3)])
    one = dlm.approve(dl, key(1))
    doubled = dlm.signed_list(dl, [one, one, dlm.approve(dl, key(3))])
    assert code_of(c.head, doubled) is ErrorCode.INVALID_DEVICE_LIST


def test_lowering_the_threshold_needs_the_current_one() -> None:
    c = with_devices(1, 2)
    c.push(sign(c.build(policy=Policy(threshold=2)), [1]))
    dl = c.build(policy=Policy(threshold=1))
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET
    assert c.push(sign(dl, [1, 2])).policy_changed


def test_threshold_above_members() -> None:
    c = with_devices(1, 2)
    dl = c.build(policy=Policy(threshold=3))
    assert code_of(c.head, sign(dl, [1, 2])) is ErrorCode.INVALID_DEVICE_LIST
    # also by removing a member under a threshold that no longer fits
    c.push(sign(c.build(policy=Policy(threshold=2)), [1]))
    dl = c.build(remove_device_ids=[device_id(2)])
    assert code_of(c.head, sign(dl, [1, 2])) is ErrorCode.INVALID_DEVICE_LIST


# -- approvers are P's, never L's -----------------------------------------------------------------


def test_foreign_approval_is_rejected_even_beside_a_valid_one() -> None:
    c = with_devices(1, 2)
    dl = c.build()
    assert code_of(c.head, sign(dl, [1, 9])) is ErrorCode.BAD_SIGNATURE


def test_revoked_device_cannot_approve() -> None:
    c = with_devices(1, 2)
    c.push(sign(c.build(remove_device_ids=[device_id(2)]), [1]))
    dl = c.build(add_devices=[entry(5)])
    assert code_of(c.head, sign(dl, [2, 5])) is ErrorCode.BAD_SIGNATURE


def test_wrong_signature_by_a_device_of_p() -> None:
    c = with_devices(1, 2)
    dl = c.build()
    other = c.build(account_key_epoch=3)
    forged = dlm.signed_list(
        dl, [DeviceListSignature(device_id=device_id(1), signature=dlm.approve(other, key(1)).signature)]
    )
    assert code_of(c.head, forged) is ErrorCode.BAD_SIGNATURE
    garbage = dlm.signed_list(dl, [DeviceListSignature(device_id=device_id(1), signature=b"\x00" * 3)])
    assert code_of(c.head, garbage) is ErrorCode.BAD_SIGNATURE


def test_removed_ids_never_return() -> None:
    c = with_devices(1, 2)
    c.push(sign(c.build(remove_device_ids=[device_id(2)]), [1]))
    dl = c.build(add_devices=[entry(2)])
    signed = sign(dl, [1, 2])
    evaluate_version(c.head, signed)  # the single step cannot know ...
    assert code_of(c.head, signed, removed_ids={device_id(2)}) is ErrorCode.INVALID_DEVICE_LIST
    with pytest.raises(TetherlessError) as info:  # ... the chain does
        verify_chain(c.chain([*c.versions, signed]), c.account)
    assert info.value.code is ErrorCode.INVALID_DEVICE_LIST


# -- structure ------------------------------------------------------------------------------------


def structure_case(mutate: str) -> tuple[DeviceList, SignedDeviceList]:
    c = with_devices(1, 2)
    dl = c.build(add_devices=[entry(3)])
    devices = list(dl.devices)
    if mutate == "reordered":
        dl = msgspec.structs.replace(dl, devices=devices[::-1])
    elif mutate == "duplicate":
        dl = msgspec.structs.replace(dl, devices=sorted([*devices, devices[0]], key=lambda d: d.device_id))
    elif mutate == "swapped key":  # device 3's id with device 4's sign key
        swapped = msgspec.structs.replace(entry(3), sign_key=bytes(key(4).verify_key))
        dl = msgspec.structs.replace(dl, devices=[d if d.device_id != device_id(3) else swapped for d in devices])
    elif mutate == "swapped box key":  # a kept device's identity key replaced
        changed = msgspec.structs.replace(entry(2), box_key=box(9))
        dl = msgspec.structs.replace(dl, devices=[d if d.device_id != device_id(2) else changed for d in devices])
    elif mutate == "shared box key":
        shared = msgspec.structs.replace(entry(3), box_key=box(1))
        dl = msgspec.structs.replace(dl, devices=[d if d.device_id != device_id(3) else shared for d in devices])
    elif mutate == "named":
        dl = msgspec.structs.replace(dl, devices=[msgspec.structs.replace(d, name="x") for d in devices])
    elif mutate == "prev_hash":
        dl = msgspec.structs.replace(dl, prev_hash=b"\x00" * 32)
    elif mutate == "version gap":
        dl = msgspec.structs.replace(dl, version=dl.version + 1)
    elif mutate == "same version":
        dl = msgspec.structs.replace(dl, version=dl.version - 1)
    elif mutate == "other account":
        dl = msgspec.structs.replace(dl, account_id="a" * 32)
    elif mutate == "back in time":
        dl = msgspec.structs.replace(dl, created_at_ms=T0 - 1)
    elif mutate == "format 1":
        dl = msgspec.structs.replace(dl, format=1)
    elif mutate == "short recovery key":
        dl = msgspec.structs.replace(dl, recovery_key=b"\x01" * 16)
    return c.head, sign(dl, [1, 3])


@pytest.mark.parametrize(
    "mutate",
    [
        "reordered",
        "duplicate",
        "swapped key",
        "swapped box key",
        "shared box key",
        "named",
        "prev_hash",
        "version gap",
        "same version",
        "other account",
        "back in time",
        "format 1",
        "short recovery key",
    ],
)
def test_structure_rejections(mutate: str) -> None:
    prev, signed = structure_case(mutate)
    assert code_of(prev, signed) is ErrorCode.INVALID_DEVICE_LIST


def test_unchanged_structure_case_is_valid() -> None:
    prev, signed = structure_case("nothing")
    evaluate_version(prev, signed)


# -- recovery key ---------------------------------------------------------------------------------


def test_recovery_key_meets_any_threshold_alone() -> None:
    c = Chain(recovery=True)
    for n in (2, 3):
        c.push(sign(c.build(add_devices=[entry(n)]), [1, n]))
    c.push(sign(c.build(policy=Policy(threshold=3)), [1]))
    # every device lost: a new device joins and removes the others with the recovery key alone
    dl = c.build(add_devices=[entry(7)], remove_device_ids=[device_id(1), device_id(2)], policy=Policy(threshold=1))
    assert code_of(c.head, sign(dl, [7])) is ErrorCode.POLICY_NOT_MET
    change = c.push(sign(dl, [7], recovery=[RECOVERY]))
    assert change.recovery_approved
    assert sorted(d.device_id for d in change.removed) == sorted([device_id(1), device_id(2)])


def test_recovery_signature_by_another_key() -> None:
    c = Chain(recovery=True)
    dl = c.build()
    assert code_of(c.head, sign(dl, [1], recovery=[NEW_RECOVERY])) is ErrorCode.BAD_SIGNATURE
    assert code_of(c.head, sign(dl, [1], recovery=[RECOVERY, RECOVERY])) is ErrorCode.INVALID_DEVICE_LIST


def test_new_recovery_key_must_sign() -> None:
    c = Chain(recovery=True)
    dl = c.build(recovery_key=bytes(NEW_RECOVERY.verify_key))
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET
    assert code_of(c.head, sign(dl, [1], recovery=[RECOVERY])) is ErrorCode.POLICY_NOT_MET
    change = c.push(sign(dl, [1], recovery=[NEW_RECOVERY]))
    assert change.recovery_key_changed
    assert not change.recovery_approved
    # the old key is no approver any more
    dl = c.build(add_devices=[entry(4)])
    assert code_of(c.head, sign(dl, [4], recovery=[RECOVERY])) is ErrorCode.BAD_SIGNATURE


def test_recovery_does_not_replace_a_required_webauthn_cosignature() -> None:
    c, auth = webauthn_chain(Policy(threshold=1, require_webauthn=True), recovery=True)
    dl = c.build(add_devices=[entry(5)])
    assert code_of(c.head, sign(dl, [5], recovery=[RECOVERY])) is ErrorCode.POLICY_NOT_MET
    c.push(sign(dl, [5], recovery=[RECOVERY], assertions=[auth]))


# -- WebAuthn -------------------------------------------------------------------------------------


def webauthn_chain(
    policy: Policy, *, recovery: bool = False, auth: SoftAuthenticator | None = None
) -> tuple[Chain, SoftAuthenticator]:
    """Devices 1 and 2, one credential (added with its proof of possession), then ``policy``."""
    c = Chain(recovery=recovery)
    c.push(sign(c.build(add_devices=[entry(2)]), [1, 2]))
    auth = auth or SoftAuthenticator(RP)
    dl = c.build(add_credentials=[auth.credential(T0)])
    assert code_of(c.head, sign(dl, [1])) is ErrorCode.POLICY_NOT_MET  # no proof of possession
    change = c.push(sign(dl, [1], assertions=[auth]))
    assert change.added_credentials == [auth.credential(T0)]
    assert change.approving_credentials == []  # a proof of possession is not an approval
    assert change.assertion_counters == {auth.credential_id: auth.counter}
    c.push(sign(c.build(policy=policy), [1]))
    return c, auth


def test_hardware_key_must_cosign() -> None:
    c, auth = webauthn_chain(Policy(threshold=1, require_webauthn=True))
    dl = c.build(add_devices=[entry(3)])
    assert code_of(c.head, sign(dl, [1, 2, 3])) is ErrorCode.POLICY_NOT_MET
    change = c.push(sign(dl, [3], assertions=[auth]))  # threshold 1: the key approves alone
    assert change.approving_credentials == [auth.credential_id]
    assert change.assertion_counters == {auth.credential_id: auth.counter}


def test_hardware_key_plus_device() -> None:
    c, auth = webauthn_chain(Policy(threshold=2, require_webauthn=True))
    dl = c.build(add_devices=[entry(3)])
    assert code_of(c.head, sign(dl, [3], assertions=[auth])) is ErrorCode.POLICY_NOT_MET
    assert code_of(c.head, sign(dl, [1, 2, 3])) is ErrorCode.POLICY_NOT_MET
    c.push(sign(dl, [2, 3], assertions=[auth]))


def test_user_verification_required() -> None:
    c, auth = webauthn_chain(Policy(threshold=1, require_webauthn=True, require_user_verification=True))
    dl = c.build()
    assert code_of(c.head, sign(dl, [1], assertions=[auth])) is ErrorCode.WEBAUTHN_INVALID
    c.push(sign(dl, [1], assertions=[auth], uv=True))


def test_removing_the_last_credential_under_require_webauthn() -> None:
    c, auth = webauthn_chain(Policy(threshold=1, require_webauthn=True))
    dl = c.build(remove_credential_ids=[auth.credential_id])
    assert code_of(c.head, sign(dl, [1], assertions=[auth])) is ErrorCode.INVALID_DEVICE_LIST
    dl = c.build(remove_credential_ids=[auth.credential_id], policy=Policy())
    assert dl.account_key_epoch == c.head.account_key_epoch + 1
    change = c.push(sign(dl, [1], assertions=[auth]))
    assert change.removed_credentials == [auth.credential(T0)]


def assertion_case(how: str) -> tuple[DeviceList, SignedDeviceList]:
    c, auth = webauthn_chain(Policy(threshold=1, require_webauthn=True))
    dl = c.build(add_devices=[entry(3)])
    challenge = dlm.list_hash(dl)
    assertion: WebAuthnAssertion
    if how == "wrong origin":
        assertion = auth.get_assertion(challenge, origin="https://evil.example")
    elif how == "another list hash":
        assertion = auth.get_assertion(dlm.list_hash(c.head))
    elif how == "wrong rp id":
        assertion = auth.get_assertion(challenge, rp_id="evil.example")
    elif how == "no user presence":
        assertion = auth.get_assertion(challenge, user_present=False)
    elif how == "bad signature":
        good = auth.get_assertion(challenge)
        assertion = msgspec.structs.replace(good, signature=auth.get_assertion(b"x" * 32).signature)
    elif how == "unknown credential":
        assertion = SoftAuthenticator(RP).get_assertion(challenge)
    else:
        assertion = auth.get_assertion(challenge)
    signed = dlm.signed_list(dl, [dlm.approve(dl, key(3))], webauthn_assertions=[assertion])
    return c.head, signed


@pytest.mark.parametrize(
    "how",
    ["wrong origin", "another list hash", "wrong rp id", "no user presence", "bad signature", "unknown credential"],
)
def test_assertion_rejections(how: str) -> None:
    prev, signed = assertion_case(how)
    assert code_of(prev, signed) is ErrorCode.WEBAUTHN_INVALID


def test_assertion_case_control() -> None:
    prev, signed = assertion_case("valid")
    evaluate_version(prev, signed)


def test_a_credential_asserting_twice() -> None:
    c, auth = webauthn_chain(Policy(threshold=2))
    dl = c.build()
    twice = dlm.signed_list(
        dl, webauthn_assertions=[auth.get_assertion(dlm.list_hash(dl)), auth.get_assertion(dlm.list_hash(dl))]
    )
    assert code_of(c.head, twice) is ErrorCode.INVALID_DEVICE_LIST


def test_a_credential_cannot_change_its_entry() -> None:
    c, _auth = webauthn_chain(Policy())
    dl = c.build()
    moved = msgspec.structs.replace(dl, credentials=[msgspec.structs.replace(dl.credentials[0], rp_id="other.example")])
    assert code_of(c.head, sign(moved, [1])) is ErrorCode.INVALID_DEVICE_LIST


def test_counters_must_increase_along_the_chain() -> None:
    c, auth = webauthn_chain(Policy(require_webauthn=True))
    for counter in (auth.counter, auth.counter - 1):  # equal, then lower
        dl = c.build()
        stale = dlm.signed_list(dl, webauthn_assertions=[auth.get_assertion(dlm.list_hash(dl), counter=counter)])
        evaluate_version(c.head, stale)  # one step does not know counters ...
        with pytest.raises(TetherlessError) as info:  # ... the chain does
            verify_chain(c.chain([*c.versions, stale]), c.account)
        assert info.value.code is ErrorCode.WEBAUTHN_REPLAYED
    c.push(sign(c.build(), assertions=[auth]))
    assert verify_chain(c.chain(), c.account).counters == {auth.credential_id: auth.counter}


def test_zero_counters_are_accepted() -> None:
    auth = SoftAuthenticator(RP, fixed_counter=True)
    c, auth = webauthn_chain(Policy(require_webauthn=True), auth=auth)
    for _ in range(2):
        c.push(sign(c.build(), assertions=[auth]))
    assert verify_chain(c.chain(), c.account).counters == {auth.credential_id: 0}


def test_check_counter() -> None:
    dlm.check_counter(b"c", None, 0)
    dlm.check_counter(b"c", 0, 0)
    dlm.check_counter(b"c", 4, 5)
    for stored, new in ((5, 5), (5, 4), (5, 0), (3, 0)):
        with pytest.raises(TetherlessError) as info:
            dlm.check_counter(b"c", stored, new)
        assert info.value.code is ErrorCode.WEBAUTHN_REPLAYED


# -- format upgrade and chains ----------------------------------------------------------------------


def test_format_1_chain_upgrades_to_format_2() -> None:
    v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    dl = dlm.next_version(v1.device_list, add_devices=[entry(2)], now_ms=T0 + 1)
    assert [d.name for d in dl.devices] == ["", ""]
    signed = sign(dl, [1, 2])
    change = evaluate_version(v1.device_list, signed)
    assert change.added == [entry(2)]
    result = verify_chain(DeviceListChain(account_id=dl.account_id, versions=[v1, signed]), dl.account_id)
    assert result.head == dl
    # and back to format 1 is refused
    back = DeviceList(
        account_id=dl.account_id,
        version=3,
        prev_hash=dlm.list_hash(dl),
        created_at_ms=T0 + 2,
        devices=[entry(1)],
    )
    assert code_of(dl, sign(back, [1])) is ErrorCode.INVALID_DEVICE_LIST


def test_format_1_versions_keep_the_v1_rule() -> None:
    v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    dl = DeviceList(
        account_id=v1.device_list.account_id,
        version=2,
        prev_hash=dlm.list_hash(v1.device_list),
        created_at_ms=T0,
        devices=[
            *v1.device_list.devices,
            dlm.device_entry(bytes(key(2).verify_key), box(2), name="phone", added_at_ms=T0),
        ],
    )
    # v1: a valid signature by a device of P suffices; an added device need not sign; others are ignored
    evaluate_version(v1.device_list, sign(dl, [1, 9]))
    assert code_of(v1.device_list, sign(dl, [2])) is ErrorCode.BAD_SIGNATURE


def test_signatures_may_be_empty_only_in_format_2() -> None:
    v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    assert genesis_code(msgspec.structs.replace(v1, signatures=[])) is ErrorCode.INVALID_DEVICE_LIST


def test_fork_and_rollback_against_the_mark() -> None:
    c = with_devices(1, 2, 3)
    mark = verify_chain(c.chain(), c.account).mark
    assert mark == (c.head.version, dlm.list_hash(c.head))
    # the same chain, and a longer one, pass
    c.push(sign(c.build(add_devices=[entry(4)]), [1, 4]))
    assert verify_chain(c.chain(), c.account, mark=mark).mark[0] == mark[0] + 1
    # rollback: the relay serves the chain up to below the mark
    with pytest.raises(DeviceListRollbackError) as rollback:
        verify_chain(c.chain(c.versions[:2]), c.account, mark=mark)
    assert rollback.value.code is ErrorCode.INVALID_DEVICE_LIST
    # fork: a different, validly signed version at the marked height
    forked = c.versions[: mark[0] - 1]
    prev = forked[-1].device_list
    other = dlm.next_version(prev, add_devices=[entry(8)], now_ms=c.t + 5)
    forked = [*forked, sign(other, [1, 8])]
    verify_chain(c.chain(forked), c.account)  # a valid chain on its own ...
    with pytest.raises(DeviceListForkError) as fork:  # ... that contradicts the mark
        verify_chain(c.chain(forked), c.account, mark=mark)
    assert fork.value.code is ErrorCode.INVALID_DEVICE_LIST
    assert not isinstance(fork.value, DeviceListRollbackError)


def test_chain_errors() -> None:
    c = with_devices(1, 2)
    for versions in ([], c.versions[1:], [c.versions[0], c.versions[0]], c.versions[::-1]):
        with pytest.raises(TetherlessError) as info:
            verify_chain(c.chain(versions), c.account)
        assert info.value.code is ErrorCode.INVALID_DEVICE_LIST
    with pytest.raises(TetherlessError) as info:
        verify_chain(c.chain(), "c" * 32)  # another account's id
    assert info.value.code is ErrorCode.INVALID_DEVICE_LIST


def test_layout_v2_spelled_out() -> None:
    auth = SoftAuthenticator(RP, private_value=7)
    c = Chain(recovery=True)
    dl = c.build(add_devices=[entry(2)], add_credentials=[auth.credential(5)], policy=Policy(threshold=2))
    fields: list[signing.Field] = [
        dl.account_id,
        dl.version,
        dl.prev_hash,
        dl.created_at_ms,
        2,
        0,
        0,
        0,
        bytes(RECOVERY.verify_key),
        b"",
        2,
    ]
    for n in sorted((1, 2), key=device_id):
        fields += [device_id(n), bytes(key(n).verify_key), box(n), T0]
    fields += [1, auth.credential_id, auth.public_key(), RP, 5]
    assert dlm.list_layout(dl) == signing.layout("device-list/2", *fields)
    assert dlm.list_hash(dl) == hashlib.sha256(signing.layout("device-list/2", *fields)).digest()


# -- wire ---------------------------------------------------------------------------------------------


def test_new_messages_round_trip_in_both_encodings() -> None:
    c, _auth = webauthn_chain(Policy(threshold=2, require_webauthn=True, require_user_verification=True), recovery=True)
    head = c.versions[-1]
    messages: list[object] = [
        head,
        PostDeviceListRequest(signed=head),
        DeviceListAccepted(account_id=c.account, version=head.device_list.version, list_hash=dlm.list_hash(c.head)),
        DeviceListChanged(account_id=c.account, version=4),
        c.chain(),
    ]
    for message in messages:
        for media_type in (codec.MSGPACK, codec.JSON):
            assert codec.decode(codec.encode(message, media_type), type(message), media_type) == message
    item = codec.encode_stream_item(DeviceListChanged(account_id=c.account, version=4), codec.JSON)
    assert b'"type":"device_list"' in item
    (decoded,) = codec.StreamDecoder(StreamItem, codec.JSON).feed(item)
    assert decoded == DeviceListChanged(account_id=c.account, version=4)


def test_decoder_bounds() -> None:
    c, _auth = webauthn_chain(Policy())
    raw = msgspec.to_builtins(c.versions[-1])
    raw["device_list"]["policy"]["threshold"] = 17
    with pytest.raises(TetherlessError) as info:
        codec.decode(codec.encode(raw), SignedDeviceList)
    assert info.value.code is ErrorCode.INVALID_FIELD
    raw["device_list"]["policy"]["threshold"] = 1
    raw["recovery_signatures"] = [b"x" * 64] * 3
    with pytest.raises(TetherlessError):
        codec.decode(codec.encode(raw), SignedDeviceList)
    raw["recovery_signatures"] = []
    raw["device_list"]["format"] = 4
    with pytest.raises(TetherlessError):
        codec.decode(codec.encode(raw), SignedDeviceList)
