"""A relay rotating claimer names cannot drain a device's one-time prekeys (issue 13 point 4).

The per-pair limit counts under the claiming account a peer relay asserts,
so a relay can invent a fresh name per claim. Two budgets do not trust
names: one-time claims per origin relay (all its claimers) and per target
device (all claimers, local and remote). Past them, bundles carry the
signed prekey and the last-resort key only (docs/security.md "Prekey
draining"); the device keeps its one-time keys for the senders to come.
"""

from __future__ import annotations

import base64
import os
import time
from pathlib import Path

import nacl.signing

from protocol import codec, federation
from protocol.ids import account_id_for
from protocol.messages import ClaimPrekeysResponse, FederatedClaimRequest, PrekeyCounts
from tests.e2e.http11 import Http11, Peer
from tests.e2e.test_federation import mesh
from tests.e2e.test_prekeys_enrolment import claim, counts, full_upload, user
from tests.relay_process import RelayProcess

PER_ORIGIN = 4
PER_DEVICE = 6
LIMITS = {
    "TETHERLESS_PREKEY_ONE_TIME_PER_ORIGIN_PER_HOUR": str(PER_ORIGIN),
    "TETHERLESS_PREKEY_ONE_TIME_PER_DEVICE_PER_HOUR": str(PER_DEVICE),
}


def claim_as(origin: RelayProcess, target: RelayProcess, device: str) -> ClaimPrekeysResponse:
    """One federated claim signed with ``origin``'s relay key, under a claimer name never used before."""
    key = nacl.signing.SigningKey((origin.data_dir / "relay.key").read_bytes())
    fresh_claimer = account_id_for(os.urandom(32))
    body = codec.encode(FederatedClaimRequest(claimer_account=fresh_claimer, devices=[device]))
    path = "/federation/v1/prekeys/claim"
    headers = federation.sign_request(
        key,
        method="POST",
        authority=f"127.0.0.1:{target.port}",
        path=path,
        body=body,
        origin=origin.name,
        destination=target.name,
        created=int(time.time()),
        nonce=base64.urlsafe_b64encode(os.urandom(18)).decode(),
    )
    answer = Http11(target.url).request(
        "POST", path, body, dict(headers) | {"content-type": codec.MSGPACK, "accept": codec.MSGPACK}
    )
    assert answer.status == 200, answer.body
    return codec.decode(answer.body, ClaimPrekeysResponse)


def one_time_served(answer: ClaimPrekeysResponse) -> tuple[bool, bool]:
    """(x25519 one-time key served, ML-KEM one-time key served) for the one bundle of ``answer``."""
    [bundle] = answer.bundles
    return bundle.one_time_prekey is not None, bundle.pq_prekey.kind == "mlkem768-one-time"


def withheld(relay: RelayProcess, limit: str) -> float:
    prefix = f'relay_prekey_one_time_withheld_total{{limit="{limit}"}}'
    lines = Http11(relay.url).get("/metrics").body.decode().splitlines()
    return next((float(line.split()[-1]) for line in lines if line.startswith(prefix)), 0.0)


def test_rotating_claimer_names_cannot_drain_a_device(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test", "c.test"], env=LIMITS) as m:
        a, b, c = m["a.test"], m["b.test"], m["c.test"]
        on_b = Http11(b.url)
        ben: Peer = user(on_b, "ben")
        full_upload(on_b, ben, one_time=20, pq_one_time=20)

        # a.test: a fresh claimer name per claim; only PER_ORIGIN claims are served one-time keys
        served = [one_time_served(claim_as(a, b, ben.address)) for _ in range(PER_ORIGIN + 3)]
        assert served == [(True, True)] * PER_ORIGIN + [(False, False)] * 3
        assert withheld(b, "origin") == 3

        # c.test: its own origin budget, but the device's budget (all claimers) has PER_DEVICE - PER_ORIGIN left
        served = [one_time_served(claim_as(c, b, ben.address)) for _ in range(PER_ORIGIN)]
        left = PER_DEVICE - PER_ORIGIN
        assert served == [(True, True)] * left + [(False, False)] * (PER_ORIGIN - left)
        assert withheld(b, "device") == PER_ORIGIN - left

        # local claimers count against the same device budget
        bob = user(on_b, "bob")
        assert claim(on_b, bob, ben.address).bundles[0].one_time_prekey is None

        # the device keeps its one-time keys; every answer still was a usable bundle (last-resort key)
        assert counts(on_b, ben) == PrekeyCounts(
            x25519_one_time=20 - PER_DEVICE, mlkem_one_time=20 - PER_DEVICE, signed_prekey_id=1, last_resort_id=1
        )


def test_budgets_do_not_affect_other_devices(tmp_path: Path) -> None:
    with mesh(tmp_path, ["a.test", "b.test"], env=LIMITS) as m:
        a, b = m["a.test"], m["b.test"]
        on_b = Http11(b.url)
        ben, bea = user(on_b, "ben"), user(on_b, "bea")
        for peer in (ben, bea):
            full_upload(on_b, peer, one_time=10, pq_one_time=10)
        for _ in range(PER_DEVICE):
            claim(on_b, user(on_b, "claimer"), ben.address)
        assert one_time_served(claim_as(a, b, ben.address)) == (False, False)  # ben's device budget is spent
        assert one_time_served(claim_as(a, b, bea.address)) == (True, True)  # bea's is not
