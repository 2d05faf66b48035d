"""Hypothesis state machine for format-2 device lists (docs/crypto.md §15, machine 2).

Random changes approved by random subsets of the previous version's approvers:
a version is accepted exactly when an independent model of the policy says so,
the relay's check (:func:`evaluate_version`) and the client's
(:func:`verify_chain`) always agree, and every mutation of a valid version
(dropped or foreign approval, swapped key, reordered entries, fork, gap,
tampered signature, approval by a revoked device) is rejected.
"""

from __future__ import annotations

import hashlib

import msgspec
import nacl.signing
from hypothesis import HealthCheck, event, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from protocol import device_list as dlm
from protocol.device_list import DeviceListRollbackError, evaluate_version, verify_chain
from protocol.errors import TetherlessError
from protocol.messages import DeviceEntry, DeviceList, DeviceListChain, DeviceListSignature, Policy, SignedDeviceList
from tests.support.soft_authenticator import SoftAuthenticator

RP = "relay.example"
T0 = 1_700_000_000_000
RECOVERY = nacl.signing.SigningKey(b"\x21" * 32)
STRANGER = nacl.signing.SigningKey(b"\x22" * 32)


def key(n: int) -> nacl.signing.SigningKey:
    return nacl.signing.SigningKey(hashlib.sha256(b"machine device %d" % n).digest())


def entry(n: int) -> DeviceEntry:
    return dlm.device_entry(bytes(key(n).verify_key), hashlib.sha256(b"machine box %d" % n).digest(), added_at_ms=T0)


AUTHS = [SoftAuthenticator(RP, private_value=1000 + i) for i in range(3)]
AUTH_BY_ID = {a.credential_id: a for a in AUTHS}
ID_TO_N = {entry(n).device_id: n for n in range(1, 64)}


class DeviceListMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.versions = [dlm.genesis_v2(key(1), entry(1).box_key, now_ms=T0, recovery_key=RECOVERY)]
        self.next_n = 2
        self.removed: set[str] = set()
        self.t = T0
        self.accepted = 0

    @property
    def head(self) -> DeviceList:
        return self.versions[-1].device_list

    def chain(self, versions: list[SignedDeviceList]) -> DeviceListChain:
        return DeviceListChain(account_id=self.head.account_id, versions=versions)

    # -- building ----------------------------------------------------------------------------------

    def _draw_next(self, data: st.DataObject) -> DeviceList:
        prev = self.head
        kind = data.draw(
            st.sampled_from(["add device", "remove device", "add credential", "remove credential", "policy", "rotate"])
        )
        add, remove, add_cred, remove_cred = [], [], [], []
        if kind == "add device" and len(prev.devices) < 8:
            add = [entry(self.next_n)]
            self.next_n += 1
        elif kind == "remove device" and len(prev.devices) > 1:
            remove = [data.draw(st.sampled_from([d.device_id for d in prev.devices]))]
        elif kind == "add credential":
            free = [a for a in AUTHS if a.credential_id not in {c.credential_id for c in prev.credentials}]
            if free:
                add_cred = [data.draw(st.sampled_from(free)).credential(T0)]
        elif kind == "remove credential" and prev.credentials:
            remove_cred = [data.draw(st.sampled_from([c.credential_id for c in prev.credentials]))]
        members_after = (
            len(prev.devices) + len(add) - len(remove) + len(prev.credentials) + len(add_cred) - len(remove_cred)
        )
        has_credentials_after = len(prev.credentials) + len(add_cred) - len(remove_cred) > 0
        policy = prev.policy
        if kind == "policy":
            policy = Policy(
                threshold=data.draw(st.integers(1, min(members_after, 4))),
                require_webauthn=has_credentials_after and data.draw(st.booleans()),
                require_user_verification=data.draw(st.booleans()),
            )
        if policy.threshold > members_after or (policy.require_webauthn and not has_credentials_after):
            policy = Policy(threshold=min(policy.threshold, members_after), require_webauthn=False)
        self.t += 1000
        epoch = None
        if kind == "rotate":
            epoch = prev.account_key_epoch + data.draw(st.integers(0, 2))
        return dlm.next_version(
            prev,
            add_devices=add,
            remove_device_ids=remove,
            add_credentials=add_cred,
            remove_credential_ids=remove_cred,
            policy=policy,
            account_key_epoch=epoch,
            now_ms=self.t,
        )

    def _sign(
        self,
        dl: DeviceList,
        device_ns: list[int],
        credential_ids: list[bytes],
        recovery: bool,
        uv: bool,
    ) -> SignedDeviceList:
        prev = self.head
        before = {d.device_id for d in prev.devices}
        added = [ID_TO_N[d.device_id] for d in dl.devices if d.device_id not in before]
        old_creds = {c.credential_id for c in prev.credentials}
        added_creds = [c.credential_id for c in dl.credentials if c.credential_id not in old_creds]
        challenge = dlm.list_hash(dl)
        return dlm.signed_list(
            dl,
            [dlm.approve(dl, key(n)) for n in sorted(set(device_ns) | set(added))],
            recovery_signatures=[dlm.sign_recovery(dl, RECOVERY)] if recovery else [],
            webauthn_assertions=[
                AUTH_BY_ID[c].get_assertion(challenge, user_verified=uv) for c in [*credential_ids, *added_creds]
            ],
        )

    def _expected(
        self, dl: DeviceList, device_ns: list[int], credential_ids: list[bytes], recovery: bool, uv: bool
    ) -> bool:
        """The model: crypto.md §3.2 steps 2-3, written independently of the implementation."""
        policy = self.head.policy
        asserting = bool(credential_ids) or len(dl.credentials) > len(
            {c.credential_id for c in dl.credentials} & {c.credential_id for c in self.head.credentials}
        )
        if asserting and policy.require_user_verification and not uv:
            return False  # under a UV policy an assertion without UV is invalid (approval or proof of possession)
        weight = len(set(device_ns)) + len(set(credential_ids)) + (policy.threshold if recovery else 0)
        return weight >= policy.threshold and (not policy.require_webauthn or bool(credential_ids))

    def _draw_approvals(self, data: st.DataObject) -> tuple[list[int], list[bytes], bool, bool]:
        prev = self.head
        device_ns = data.draw(st.lists(st.sampled_from([ID_TO_N[d.device_id] for d in prev.devices]), unique=True))
        credential_ids = (
            data.draw(st.lists(st.sampled_from([c.credential_id for c in prev.credentials]), unique=True))
            if prev.credentials
            else []
        )
        return device_ns, credential_ids, data.draw(st.booleans()), data.draw(st.booleans())

    # -- rules -------------------------------------------------------------------------------------

    @rule(data=st.data())
    def change(self, data: st.DataObject) -> None:
        dl = self._draw_next(data)
        approvals = self._draw_approvals(data)
        signed = self._sign(dl, *approvals)
        expected = self._expected(dl, *approvals)
        try:
            change = evaluate_version(self.head, signed, removed_ids=self.removed)
            relay_ok = True
        except TetherlessError:
            relay_ok = False
        try:
            verify_chain(self.chain([*self.versions, signed]), self.head.account_id)
            client_ok = True
        except TetherlessError:
            client_ok = False
        assert relay_ok == client_ok == expected, (relay_ok, client_ok, expected, approvals)
        if expected:
            self.removed.update(d.device_id for d in change.removed)
            self.versions.append(signed)
            self.accepted += 1
            event(f"accepted {min(self.accepted, 5)}+ versions")

    @rule(
        data=st.data(),
        mutation=st.sampled_from(
            [
                "drop approvals",
                "foreign approval",
                "swap key",
                "reorder",
                "fork",
                "gap",
                "tamper",
                "revoked approver",
                "drop self-signature",
            ]
        ),
    )
    def mutation_is_rejected(self, data: st.DataObject, mutation: str) -> None:
        prev = self.head
        dl = self._draw_next(data)
        all_devices = [ID_TO_N[d.device_id] for d in prev.devices]
        all_creds = [c.credential_id for c in prev.credentials]
        signed = self._sign(dl, all_devices, all_creds, False, True)
        evaluate_version(prev, signed, removed_ids=self.removed)  # the unmutated version is valid
        if mutation == "drop approvals":
            signed = self._sign(dl, [], [], False, True)
        elif mutation == "foreign approval":
            signed = msgspec.structs.replace(signed, signatures=[*signed.signatures, dlm.approve(dl, STRANGER)])
        elif mutation == "swap key":
            victim = data.draw(st.sampled_from(list(dl.devices)))
            swapped = msgspec.structs.replace(victim, sign_key=bytes(STRANGER.verify_key))
            dl = msgspec.structs.replace(dl, devices=[swapped if d is victim else d for d in dl.devices])
            signed = self._resign(signed, dl)
        elif mutation == "reorder" and len(dl.devices) > 1:
            signed = self._resign(signed, msgspec.structs.replace(dl, devices=dl.devices[::-1]))
        elif mutation == "fork":
            signed = self._resign(signed, msgspec.structs.replace(dl, prev_hash=hashlib.sha256(dl.prev_hash).digest()))
        elif mutation == "gap":
            signed = self._resign(signed, msgspec.structs.replace(dl, version=dl.version + 1))
        elif mutation == "tamper" and signed.signatures:
            first = signed.signatures[0]
            bad = DeviceListSignature(
                device_id=first.device_id, signature=bytes([first.signature[0] ^ 1]) + first.signature[1:]
            )
            signed = msgspec.structs.replace(signed, signatures=[bad, *signed.signatures[1:]])
        elif mutation == "revoked approver" and self.removed:
            ghost = ID_TO_N[data.draw(st.sampled_from(sorted(self.removed)))]
            signed = msgspec.structs.replace(signed, signatures=[*signed.signatures, dlm.approve(dl, key(ghost))])
        elif mutation == "drop self-signature" and len(dl.devices) > len(prev.devices):
            added = {d.device_id for d in dl.devices} - {d.device_id for d in prev.devices}
            signed = msgspec.structs.replace(
                signed, signatures=[s for s in signed.signatures if s.device_id not in added]
            )
        else:
            return  # mutation not applicable to this version
        try:
            evaluate_version(prev, signed, removed_ids=self.removed)
        except TetherlessError:
            pass
        else:
            raise AssertionError(f"mutation {mutation!r} was accepted by the relay check")
        try:
            verify_chain(self.chain([*self.versions, signed]), prev.account_id)
        except TetherlessError:
            pass
        else:
            raise AssertionError(f"mutation {mutation!r} was accepted by the client check")

    def _resign(self, signed: SignedDeviceList, dl: DeviceList) -> SignedDeviceList:
        """Re-sign a mutated list with the same signers, so only the mutation is wrong."""
        keys = {s.device_id: key(ID_TO_N[s.device_id]) for s in signed.signatures if s.device_id in ID_TO_N}
        challenge = dlm.list_hash(dl)
        return SignedDeviceList(
            device_list=dl,
            signatures=[dlm.approve(dl, k) for k in keys.values()],
            recovery_signatures=[dlm.sign_recovery(dl, RECOVERY)] if signed.recovery_signatures else [],
            webauthn_assertions=[
                AUTH_BY_ID[a.credential_id].get_assertion(challenge, user_verified=True)
                for a in signed.webauthn_assertions
            ],
        )

    # -- invariants --------------------------------------------------------------------------------

    @invariant()
    def chain_verifies_and_marks_hold(self) -> None:
        result = verify_chain(self.chain(self.versions), self.head.account_id)
        assert result.head == self.head
        assert result.mark == (self.head.version, dlm.list_hash(self.head))
        if len(self.versions) > 1:
            try:
                verify_chain(self.chain(self.versions[:-1]), self.head.account_id, mark=result.mark)
            except DeviceListRollbackError:
                pass
            else:
                raise AssertionError("a rolled-back chain passed the mark")


# never more than the loaded profile allows: the "mutation" profile (tests/conftest.py) runs a few steps
_PROFILE = settings()
DeviceListMachine.TestCase.settings = settings(
    max_examples=min(50, _PROFILE.max_examples),
    stateful_step_count=min(20, _PROFILE.stateful_step_count),
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestDeviceLists = DeviceListMachine.TestCase
