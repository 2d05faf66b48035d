// Devices of accounts on the in-memory relay of fakeRelay.ts, for the tests of linking, the account log and its
// epochs (linking.test.ts, logepoch.test.ts): a device with its own store, and a revocation as the app posts it.
import { approve, listHash } from "../src/protocol/deviceList.js";
import { DeviceListAcceptedDef, PostDeviceListRequestDef } from "../src/protocol/wire.js";
import { MemoryStore, RelayApi, TetherlessClient } from "../src/client/index.js";
import {
  type PendingLink,
  approveOffer,
  fetchOffer,
  finishLink,
  pollProposal,
  startLink,
  verifyProposal,
} from "../src/client/linking.js";
import type { FakeRelay } from "./fakeRelay.js";

export interface Device {
  client: TetherlessClient;
  store: MemoryStore;
  api: RelayApi;
}

/** A device with an empty store on `relay` (no account yet). */
export function open(relay: FakeRelay): Device {
  const store = new MemoryStore();
  const api = new RelayApi("http://relay.test", relay.fetch);
  return { client: new TetherlessClient(api, store), store, api };
}

/** `a` removes `deviceId` from its account's list: the next version, signed by `a` alone (what "Revoke" posts). */
export async function revoke(relay: FakeRelay, a: Device, deviceId: string): Promise<void> {
  const me = a.client.identity;
  const head = relay.chains.get(me.accountId)!.at(-1)!.device_list;
  const dl = {
    ...head,
    version: head.version + 1,
    prev_hash: listHash(head),
    devices: head.devices.filter((d) => d.device_id !== deviceId),
    account_key_epoch: head.account_key_epoch + 1,
  };
  const signed = {
    device_list: dl,
    signatures: [approve(dl, me.signSeed)],
    recovery_signatures: [],
    webauthn_assertions: [],
  };
  await a.api.call("POST", `/v1/accounts/${me.accountId}/devices`, {
    request: { def: PostDeviceListRequestDef, value: { signed } },
    response: DeviceListAcceptedDef,
  });
}

/**
 * `b` (a device with no account) joins `a`'s account with a link code `a` approves, and logs in: the whole
 * enrolment of crypto.md §5.2, without the grant of the history (the caller's). Returns the offer it made.
 */
export async function joinApproved(a: Device, b: Device): Promise<PendingLink> {
  const pending = await startLink(b.api, b.store);
  await approveOffer(a.api, a.store, a.client.identity, await fetchOffer(a.api, a.client.identity, pending.code));
  await finishLink(
    b.api,
    b.store,
    pending,
    await verifyProposal(b.api, pending, (await pollProposal(b.api, pending))!),
  );
  await b.client.login();
  return pending;
}
