"""The checks of protocol/device_list.py that mutation testing found unpinned (docs/security.md "Mutation testing").

The other device-list tests assert the error *code* of each refusal; several checks share a code, so
a test of one check still passed with that check deleted as long as a later one refused. Here each
refusal is asserted with its exact detail (what the relay's problem and the client's alarm say), and
the builders' arguments are checked to reach the list they build.
"""

from __future__ import annotations

from collections.abc import Callable

import msgspec
import pytest

from protocol import device_list as dlm
from protocol.device_list import DeviceListForkError, DeviceListRollbackError, verify_chain
from protocol.errors import ErrorCode, TetherlessError
from protocol.messages import DeviceList, DeviceListChain, Policy, SignedDeviceList
from tests.protocol.test_device_list_v2 import (
    NEW_RECOVERY,
    RECOVERY,
    RP,
    T0,
    Chain,
    box,
    device_id,
    entry,
    key,
    sign,
    webauthn_chain,
    with_devices,
)
from tests.protocol.test_device_list_v2 import structure_case as structure_case_v2
from tests.protocol.test_device_list_v3 import (
    STRUCTURE_CASES,
    Chain3,
    kem,
    structure_case,
    upgraded_pair,
    with_integration,
)
from tests.support.soft_authenticator import SoftAuthenticator


def refusal(call: Callable[..., object], *args: object) -> tuple[ErrorCode, str]:
    """The code and detail ``call(*args)`` raises."""
    with pytest.raises(TetherlessError) as info:
        call(*args)
    return info.value.code, info.value.detail


INTEGRATION, ARCHIVER, DEVICE = device_id(2), device_id(3), device_id(1)

STRUCTURE_DETAILS = {
    "format_2_with_kem_key": "kem_key, role and scopes need format 3 (this list is format 2)",
    "format_2_with_role": "kem_key, role and scopes need format 3 (this list is format 2)",
    "short_kem_key": f"device {INTEGRATION}: kem_key: an ML-KEM-768 public key is 1184 bytes",
    "invalid_kem_key": f"device {INTEGRATION}: kem_key: ML-KEM-768 public key is not valid",
    "shared_kem_key": "two devices share a kem_key",
    "unsorted_scopes": f"device {INTEGRATION}: role integration takes sorted, unique scopes from ['receive', 'send']",
    "repeated_scope": f"device {INTEGRATION}: role integration takes sorted, unique scopes from ['receive', 'send']",
    "integration_without_scopes": f"device {INTEGRATION}: an integration needs at least one scope",
    "device_with_scopes": f"device {DEVICE}: role device takes sorted, unique scopes from []",
    "archiver_with_scopes": f"device {ARCHIVER}: role archiver takes sorted, unique scopes from []",
    "threshold_counts_only_devices": "threshold is above the number of devices (role device) and credentials",
}


def test_every_format_3_structure_case_has_its_detail() -> None:
    assert sorted(STRUCTURE_DETAILS) == sorted(STRUCTURE_CASES)


@pytest.mark.parametrize(("case", "detail"), sorted(STRUCTURE_DETAILS.items()))
def test_format_3_structure_refusals_say_why(case: str, detail: str) -> None:
    assert refusal(dlm.check_structure, structure_case(case)) == (ErrorCode.INVALID_DEVICE_LIST, detail)


def test_an_unknown_role_built_in_process_is_refused() -> None:
    """The wire type admits only known roles; a list built in process is still checked, not trusted."""
    dl = with_integration().head
    devices = [msgspec.structs.replace(d, role="admin") if d.device_id == ARCHIVER else d for d in dl.devices]
    code, detail = refusal(dlm.check_structure, msgspec.structs.replace(dl, devices=devices))
    assert (code, detail) == (ErrorCode.INVALID_DEVICE_LIST, f"device {ARCHIVER}: unknown role 'admin'")


@pytest.mark.parametrize(
    ("case", "detail"),
    [
        ("reordered", "devices must be sorted by device_id"),
        ("duplicate", "a device appears twice"),
        ("swapped key", f"device_id {device_id(3)} does not match its sign_key"),
        ("swapped box key", f"device {device_id(2)} changed its entry"),
        ("shared box key", "two devices share a box_key"),
        ("named", "device names must be empty from format 2 on (they live in the account log)"),
        ("prev_hash", "prev_hash does not match the previous version"),
        ("version gap", "version 4 does not follow version 2"),
        ("same version", "version 2 does not follow version 2"),
        ("other account", "the version belongs to another account"),
        ("back in time", "created_at_ms is before the previous version's"),
        ("format 1", "the format cannot go back from 2 to 1"),
        ("short recovery key", "recovery_key and recovery_backup_key_hash are empty or 32 bytes"),
    ],
)
def test_format_2_structure_refusals_say_why(case: str, detail: str) -> None:
    prev, signed = structure_case_v2(case)
    assert refusal(dlm.evaluate_version, prev, signed) == (ErrorCode.INVALID_DEVICE_LIST, detail)


# -- genesis ------------------------------------------------------------------------------------------


def test_genesis_v2_keeps_its_policy_and_backup_key_hash() -> None:
    policy = Policy(threshold=1, require_user_verification=True)
    digest = bytes([6]) * 32
    signed = dlm.genesis_v2(key(1), box(1), now_ms=T0, policy=policy, recovery_backup_key_hash=digest)
    assert (signed.device_list.policy, signed.device_list.recovery_backup_key_hash) == (policy, digest)
    dlm.verify_genesis(signed)


# -- one list on its own ------------------------------------------------------------------------------


def _format_1_with(**fields: object) -> DeviceList:
    return msgspec.structs.replace(dlm.genesis(key(1), box(1), name="laptop", now_ms=T0).device_list, **fields)


@pytest.mark.parametrize(
    ("dl", "detail"),
    [
        (_format_1_with(version=2), "prev_hash is empty exactly for version 1"),
        (_format_1_with(prev_hash=bytes(32)), "prev_hash is empty exactly for version 1"),
        (_format_1_with(version=2, prev_hash=bytes(16)), "prev_hash is 32 bytes"),
        *(
            (_format_1_with(**{name: value}), "a format-1 list has no policy, credentials, recovery key or epoch")
            for name, value in [
                ("policy", Policy(require_user_verification=True)),
                ("credentials", [SoftAuthenticator(RP).credential()]),
                ("recovery_key", bytes(32)),
                ("recovery_backup_key_hash", bytes(32)),
                ("account_key_epoch", 1),
            ]
        ),
    ],
    ids=["version 2 without prev_hash", "version 1 with prev_hash", "short prev_hash"]
    + [f"format 1 with {name}" for name in ("policy", "credential", "recovery key", "backup hash", "epoch")],
)
def test_list_structure_refusals_say_why(dl: DeviceList, detail: str) -> None:
    assert refusal(dlm.check_structure, dl) == (ErrorCode.INVALID_DEVICE_LIST, detail)


def _format_2_with(**fields: object) -> DeviceList:
    return msgspec.structs.replace(dlm.genesis_v2(key(1), box(1), now_ms=T0).device_list, **fields)


_LOW, _HIGH = sorted(
    (SoftAuthenticator(RP).credential(), SoftAuthenticator(RP).credential()), key=lambda c: c.credential_id
)


@pytest.mark.parametrize(
    ("dl", "detail"),
    [
        (_format_2_with(credentials=[_HIGH, _LOW]), "credentials must be sorted by credential_id and unique"),
        (_format_2_with(credentials=[_LOW, _LOW]), "credentials must be sorted by credential_id and unique"),
        (
            _format_2_with(credentials=[msgspec.structs.replace(_LOW, public_key=b"\x00")]),
            "credential public key: credential public key is not a COSE key",
        ),
        (
            _format_2_with(recovery_backup_key_hash=bytes(33)),
            "recovery_key and recovery_backup_key_hash are empty or 32 bytes",
        ),
        (_format_2_with(policy=Policy(require_webauthn=True)), "require_webauthn needs at least one credential"),
    ],
    ids=["unsorted credentials", "repeated credential", "not a COSE key", "long backup hash", "webauthn without"],
)
def test_format_2_structure_refusals_on_their_own_say_why(dl: DeviceList, detail: str) -> None:
    assert refusal(dlm.check_structure, dl) == (ErrorCode.INVALID_DEVICE_LIST, detail)


def test_format_2_refuses_every_role_but_device() -> None:
    """Also an archiver, which has neither scopes nor (in the list below) a kem_key."""
    dl = with_integration().head
    archiver_only = [msgspec.structs.replace(d, kem_key=b"") for d in dl.devices if d.device_id in {DEVICE, ARCHIVER}]
    format_2 = msgspec.structs.replace(dl, format=dlm.FORMAT_2, devices=archiver_only)
    assert refusal(dlm.check_structure, format_2) == (
        ErrorCode.INVALID_DEVICE_LIST,
        "kem_key, role and scopes need format 3 (this list is format 2)",
    )


def test_a_chain_for_another_account_or_an_empty_one_is_refused() -> None:
    c = with_devices(1, 2)
    expected = (ErrorCode.INVALID_DEVICE_LIST, "the relay returned a chain for another account, or an empty one")
    assert refusal(verify_chain, c.chain([]), c.account) == expected
    assert refusal(verify_chain, c.chain(), "c" * 32) == expected


def test_genesis_v3_needs_a_kem_key_and_keeps_its_policy() -> None:
    with pytest.raises(ValueError, match=r"^a format-3 genesis device has a kem_key$"):
        dlm.genesis_v3(key(1), box(1), b"", now_ms=T0)
    policy = Policy(threshold=1, require_user_verification=True)
    signed = dlm.genesis_v3(key(1), box(1), kem(1), now_ms=T0, policy=policy)
    assert signed.device_list.policy == policy
    dlm.verify_genesis(signed)


# -- counters, marks --------------------------------------------------------------------------------


def test_a_replayed_counter_names_the_credential() -> None:
    credential_id = bytes(range(20))
    code, detail = refusal(dlm.check_counter, credential_id, 7, 7)
    assert (code, detail) == (
        ErrorCode.WEBAUTHN_REPLAYED,
        f"sign counter 7 is not above 7 for credential {credential_id.hex()[:16]}",
    )


def test_fork_and_rollback_say_what_the_relay_did() -> None:
    c = with_devices(1, 2, 3)
    mark = verify_chain(c.chain(), c.account).mark
    with pytest.raises(DeviceListRollbackError) as rollback:
        verify_chain(c.chain(c.versions[:2]), c.account, mark=mark)
    assert rollback.value.detail == f"the chain ends at version 2, below the verified version {mark[0]}"
    forked = c.versions[: mark[0] - 1]
    other = dlm.next_version(forked[-1].device_list, add_devices=[entry(8)], now_ms=c.t + 5)
    with pytest.raises(DeviceListForkError) as fork:
        verify_chain(c.chain([*forked, sign(other, [1, 8])]), c.account, mark=mark)
    assert fork.value.detail == f"version {mark[0]} differs from the one verified before: a fork"


# -- builders -----------------------------------------------------------------------------------------


def test_next_version_names_what_it_cannot_remove() -> None:
    head: DeviceList = with_devices(1, 2).head
    with pytest.raises(ValueError, match=rf"^no such device in the list: \['{device_id(9)}'\]$"):
        dlm.next_version(head, remove_device_ids=[device_id(2), device_id(9)], now_ms=T0)
    with pytest.raises(ValueError, match=r"^no such credential in the list$"):
        dlm.next_version(head, remove_credential_ids=[b"missing"], now_ms=T0)


def test_next_version_sorts_credentials_added_in_any_order() -> None:
    c, _ = webauthn_chain(Policy())
    first, second = sorted((SoftAuthenticator(RP), SoftAuthenticator(RP)), key=lambda a: a.credential_id)
    dl = c.build(add_credentials=[second.credential(T0), first.credential(T0)])
    ids = [credential.credential_id for credential in dl.credentials]
    assert ids == sorted(ids)
    assert {first.credential_id, second.credential_id} <= set(ids)
    c.push(sign(dl, [1], assertions=[first, second]))


def test_next_version_drops_the_name_of_an_added_device() -> None:
    """Format 2 on: names live in the account log, and a named entry would be refused (check_structure)."""
    head = with_devices(1).head
    named = dlm.device_entry(bytes(key(2).verify_key), box(2), name="phone", added_at_ms=T0)
    dl = dlm.next_version(head, add_devices=[named], now_ms=T0 + 1)
    assert [d.name for d in dl.devices] == ["", ""]


def test_next_version_sets_or_keeps_the_recovery_backup_key_hash() -> None:
    head = with_devices(1).head
    digest = bytes([5]) * 32
    changed = dlm.next_version(head, recovery_backup_key_hash=digest, now_ms=T0 + 1)
    assert changed.recovery_backup_key_hash == digest
    assert dlm.next_version(changed, now_ms=T0 + 2).recovery_backup_key_hash == digest


def test_a_version_in_the_same_millisecond_is_accepted() -> None:
    """created_at_ms may not go back; two changes within one clock tick are not going back."""
    c = with_devices(1, 2)
    dl = dlm.next_version(c.head, add_devices=[entry(3)], now_ms=c.head.created_at_ms)
    assert dl.created_at_ms == c.head.created_at_ms
    c.push(sign(dl, [1, 3]))


# -- one version: every refusal of evaluate_version with its reason ---------------------------------

Case = tuple[DeviceList, SignedDeviceList, set[str]]


def _version_case(how: str) -> Case:
    c = with_devices(1, 2)
    if how == "format 1 without a valid signature":
        v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
        dl = msgspec.structs.replace(
            dlm.next_version(v1.device_list, add_devices=[entry(2)], now_ms=T0 + 1), format=dlm.FORMAT_1
        )
        return v1.device_list, sign(dl, [2]), set()
    if how == "removal without the epoch step":
        return c.head, sign(c.build(remove_device_ids=[device_id(2)], account_key_epoch=0), [1]), set()
    if how == "epoch going down":
        c.push(sign(c.build(account_key_epoch=5), [1]))
        return c.head, sign(c.build(account_key_epoch=4), [1]), set()
    if how == "a device signing twice":
        dl = c.build()
        one = dlm.approve(dl, key(1))
        return c.head, dlm.signed_list(dl, [one, one]), set()
    if how == "a signature by a stranger":
        return c.head, sign(c.build(), [1, 9]), set()
    if how == "a removed device coming back":
        c.push(sign(c.build(remove_device_ids=[device_id(2)]), [1]))
        return c.head, sign(c.build(add_devices=[entry(2)]), [1, 2]), {device_id(2)}
    if how == "an entry changing":
        dl = c.build()
        changed = [
            msgspec.structs.replace(d, added_at_ms=T0 + 7) if d.device_id == device_id(2) else d for d in dl.devices
        ]
        return c.head, sign(msgspec.structs.replace(dl, devices=changed), [1]), set()
    if how == "a credential changing":
        c, _ = webauthn_chain(Policy())
        dl = c.build()
        moved = [msgspec.structs.replace(dl.credentials[0], rp_id="other.example")]
        return c.head, sign(msgspec.structs.replace(dl, credentials=moved), [1]), set()
    if how == "below the threshold":
        c.push(sign(c.build(policy=Policy(threshold=2)), [1]))
        return c.head, sign(c.build(), [1]), set()
    if how == "no WebAuthn co-signature":
        c, _ = webauthn_chain(Policy(require_webauthn=True))
        return c.head, sign(c.build(), [1, 2]), set()
    if how == "an added device not signing":
        return c.head, sign(c.build(add_devices=[entry(3)]), [1]), set()
    if how == "an added credential not asserting":
        dl = c.build(add_credentials=[SoftAuthenticator(RP).credential(T0)])
        return c.head, sign(dl, [1]), set()
    if how == "an unknown credential asserting":
        c, _ = webauthn_chain(Policy())
        return c.head, sign(c.build(), [1], assertions=[SoftAuthenticator(RP)]), set()
    if how == "a credential asserting twice":
        c, auth = webauthn_chain(Policy())
        dl = c.build()
        twice = [auth.get_assertion(dlm.list_hash(dl)), auth.get_assertion(dlm.list_hash(dl))]
        return c.head, dlm.signed_list(dl, [dlm.approve(dl, key(1))], webauthn_assertions=twice), set()
    if how == "an added device without a kem_key in format 3":
        c3 = Chain3()
        bare = dlm.device_entry(bytes(key(2).verify_key), box(2), added_at_ms=T0)
        return c3.head, sign(c3.build(add_devices=[bare]), [1, 2]), set()
    if how == "a device setting its kem_key without signing":
        c3 = upgraded_pair()
        return c3.head, sign(c3.build(set_kem_keys={device_id(2): kem(2)}), [1]), set()
    recovery = Chain(recovery=True)
    if how == "a recovery signature by another key":
        return recovery.head, sign(recovery.build(), [1], recovery=[NEW_RECOVERY]), set()
    if how == "the recovery key signing twice":
        return recovery.head, sign(recovery.build(), [1], recovery=[RECOVERY, RECOVERY]), set()
    if how == "a new recovery key not signing":
        return recovery.head, sign(recovery.build(recovery_key=bytes(NEW_RECOVERY.verify_key)), [1]), set()
    if how == "a backup key set by a device alone":
        return recovery.head, sign(recovery.build(recovery_backup_key_hash=bytes([0xA]) * 32), [1]), set()
    raise AssertionError(how)


VERSION_REFUSALS = [
    (
        "format 1 without a valid signature",
        ErrorCode.BAD_SIGNATURE,
        "no valid signature by a device of the previous version",
    ),
    (
        "removal without the epoch step",
        ErrorCode.INVALID_DEVICE_LIST,
        "a version that removes a device or credential sets account_key_epoch to the previous + 1",
    ),
    ("epoch going down", ErrorCode.INVALID_DEVICE_LIST, "account_key_epoch cannot go down"),
    ("a device signing twice", ErrorCode.INVALID_DEVICE_LIST, f"device {device_id(1)} signed twice"),
    ("a signature by a stranger", ErrorCode.BAD_SIGNATURE, f"signature by {device_id(9)}, not a device of P or L"),
    (
        "a removed device coming back",
        ErrorCode.INVALID_DEVICE_LIST,
        f"device {device_id(2)} was removed earlier and cannot come back",
    ),
    ("an entry changing", ErrorCode.INVALID_DEVICE_LIST, f"device {device_id(2)} changed its entry"),
    ("a credential changing", ErrorCode.INVALID_DEVICE_LIST, "a credential changed its entry"),
    ("below the threshold", ErrorCode.POLICY_NOT_MET, "approvals weigh 1, the previous version's threshold is 2"),
    (
        "no WebAuthn co-signature",
        ErrorCode.POLICY_NOT_MET,
        "the previous version requires a WebAuthn co-signature",
    ),
    ("an added device not signing", ErrorCode.POLICY_NOT_MET, f"added device {device_id(3)} has not signed L"),
    ("an added credential not asserting", ErrorCode.POLICY_NOT_MET, "an added credential has not asserted L"),
    ("an unknown credential asserting", ErrorCode.WEBAUTHN_INVALID, "assertion by an unknown credential"),
    ("a credential asserting twice", ErrorCode.INVALID_DEVICE_LIST, "a credential asserted twice"),
    (
        "an added device without a kem_key in format 3",
        ErrorCode.INVALID_DEVICE_LIST,
        f"added device {device_id(2)} has no kem_key (format 3)",
    ),
    (
        "a device setting its kem_key without signing",
        ErrorCode.POLICY_NOT_MET,
        f"device setting its kem_key {device_id(2)} has not signed L",
    ),
    (
        "a recovery signature by another key",
        ErrorCode.BAD_SIGNATURE,
        "recovery signature by neither P's nor L's recovery key",
    ),
    ("the recovery key signing twice", ErrorCode.INVALID_DEVICE_LIST, "the recovery key signed twice"),
    ("a new recovery key not signing", ErrorCode.POLICY_NOT_MET, "the new recovery key has not signed L"),
    (
        "a backup key set by a device alone",
        ErrorCode.POLICY_NOT_MET,
        "the recovery backup key changed without a signature by L's recovery key",
    ),
]


@pytest.mark.parametrize(("how", "code", "detail"), VERSION_REFUSALS, ids=[r[0] for r in VERSION_REFUSALS])
def test_version_refusals_say_why(how: str, code: ErrorCode, detail: str) -> None:
    prev, signed, removed_ids = _version_case(how)
    with pytest.raises(TetherlessError) as info:
        dlm.evaluate_version(prev, signed, removed_ids=removed_ids)
    assert (info.value.code, info.value.detail) == (code, detail)


def test_a_format_1_version_reports_its_whole_change() -> None:
    v1 = dlm.genesis(key(1), box(1), name="laptop", now_ms=T0)
    dl = msgspec.structs.replace(
        dlm.next_version(v1.device_list, add_devices=[entry(2)], now_ms=T0 + 1), format=dlm.FORMAT_1
    )
    change = dlm.evaluate_version(v1.device_list, sign(dl, [1, 2]))
    assert change == dlm.VersionChange(
        added=[entry(2)],
        removed=[],
        added_credentials=[],
        removed_credentials=[],
        assertion_counters={},
        list_hash=dlm.list_hash(dl),
        approving_devices=[device_id(1)],
    )


# -- the whole chain ----------------------------------------------------------------------------------


def test_a_chain_whose_genesis_is_another_accounts_is_refused() -> None:
    """The chain's own account field matches, its genesis list does not (a relay splicing accounts)."""
    mine, theirs = with_devices(1), dlm.genesis_v2(key(5), box(5), now_ms=T0)
    spliced = DeviceListChain(account_id=mine.account, versions=[theirs])
    assert refusal(verify_chain, spliced, mine.account) == (
        ErrorCode.INVALID_DEVICE_LIST,
        "the genesis list belongs to another account",
    )


def test_the_verified_chain_lists_removed_devices_and_forgets_removed_credentials() -> None:
    c, auth = webauthn_chain(Policy())
    assert verify_chain(c.chain(), c.account).counters == {auth.credential_id: auth.counter}
    c.push(sign(c.build(remove_device_ids=[device_id(2)], remove_credential_ids=[auth.credential_id]), [1]))
    result = verify_chain(c.chain(), c.account)
    assert result.removed_ids == frozenset({device_id(2)})
    assert result.counters == {}


# -- genesis: every refusal of verify_genesis with its reason -----------------------------------------


def _genesis_case(how: str) -> SignedDeviceList:
    good = dlm.genesis_v2(key(1), box(1), now_ms=T0, recovery_key=RECOVERY)
    dl = good.device_list
    if how == "version 2":
        return sign(msgspec.structs.replace(dl, version=2), [1], recovery=[RECOVERY])
    if how == "a prev_hash":
        return sign(msgspec.structs.replace(dl, prev_hash=bytes(32)), [1], recovery=[RECOVERY])
    if how == "two devices":
        two = sorted([entry(1), entry(2)], key=lambda d: d.device_id)
        return sign(msgspec.structs.replace(dl, devices=two), [1, 2], recovery=[RECOVERY])
    if how == "an id not of its key":
        swapped = msgspec.structs.replace(entry(1), sign_key=bytes(key(2).verify_key))
        return sign(msgspec.structs.replace(dl, devices=[swapped]), [1], recovery=[RECOVERY])
    if how == "another key's account":
        other = dlm.genesis_v2(key(2), box(2), now_ms=T0).device_list.account_id
        return sign(msgspec.structs.replace(dl, account_id=other), [1], recovery=[RECOVERY])
    if how == "no signature":
        return msgspec.structs.replace(good, signatures=[])
    if how == "a signature by another device":
        return sign(dl, [2], recovery=[RECOVERY])
    if how == "no recovery signature":
        return msgspec.structs.replace(good, recovery_signatures=[])
    if how == "a credential":
        with_credential = msgspec.structs.replace(dl, credentials=[SoftAuthenticator(RP).credential()])
        return sign(with_credential, [1], recovery=[RECOVERY])
    if how == "an assertion":
        auth = SoftAuthenticator(RP)
        return msgspec.structs.replace(good, webauthn_assertions=[auth.get_assertion(dlm.list_hash(dl))])
    if how == "a format-3 device without a kem_key":
        v3 = dlm.genesis_v3(key(1), box(1), kem(1), now_ms=T0).device_list
        bare = [msgspec.structs.replace(d, kem_key=b"") for d in v3.devices]
        return sign(msgspec.structs.replace(v3, devices=bare), [1])
    raise AssertionError(how)


GENESIS_REFUSALS = [
    ("version 2", "a genesis list has version 1 and no prev_hash"),
    ("a prev_hash", "a genesis list has version 1 and no prev_hash"),
    ("two devices", "a genesis list has exactly one device"),
    ("an id not of its key", "device_id does not match sign_key"),
    ("another key's account", "account_id is not derived from the genesis device's key"),
    ("no signature", "a genesis list is signed by its device, once"),
    ("a signature by another device", "a genesis list is signed by its device, once"),
    ("no recovery signature", "a genesis list carries one recovery signature exactly when it sets a recovery key"),
    ("a credential", "a genesis list has no WebAuthn credentials"),
    ("an assertion", "a genesis list has no WebAuthn credentials"),
    ("a format-3 device without a kem_key", "a format-3 genesis device has role device and a kem_key"),
]


@pytest.mark.parametrize(("how", "detail"), GENESIS_REFUSALS, ids=[r[0] for r in GENESIS_REFUSALS])
def test_genesis_refusals_say_why(how: str, detail: str) -> None:
    assert refusal(dlm.verify_genesis, _genesis_case(how)) == (ErrorCode.INVALID_DEVICE_LIST, detail)
