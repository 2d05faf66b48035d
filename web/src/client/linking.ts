/**
 * Enrolment with a link code (docs/crypto.md §5.2; protocol/client/devices.py), both sides:
 *
 * - **this browser joins an account** ({@link startLink} → {@link waitForProposal} → {@link finishLink}):
 *   it makes its keys and prekeys, posts an offer, shows the code and its fingerprint; the approving device
 *   (the CLI's `tetherless device approve CODE`) proposes the version adding it; this browser checks the
 *   `approval_tag` (made by a holder of the code, not by the relay), the account's chain from its genesis,
 *   and that the version adds exactly its own entry and changes nothing else; then it self-signs and posts.
 * - **this browser approves a new device** ({@link fetchOffer} → {@link approveOffer}): it checks the offer's
 *   MAC against the typed code (the relay never learns the code) and proposes the version adding it.
 *
 * DOM-free. The relay is the adversary: everything it hands over is checked with the code's MACs or the
 * verified chain before use.
 */
import { equal } from "../protocol/bytes.js";
import { type VerifiedChain, approve, evaluateVersion, listHash, verifyChain } from "../protocol/deviceList.js";
import {
  LinkCodeMismatchError,
  approvalTag,
  linkCodeText,
  lookupId,
  lookupIdText,
  offerMac,
  parseLinkCode,
  verifyApprovalTag,
  LINK_SECRET_BYTES,
} from "../protocol/enrolment.js";
import { TetherlessError } from "../protocol/errors.js";
import { mlkemCheckPublic, mlkemPublic } from "../protocol/handshake.js";
import { deviceIdFor, formatAddress } from "../protocol/ids.js";
import type { DeviceEntry, DeviceList, SignedDeviceList, WebAuthnAssertion } from "../protocol/messages.js";
import { signPrekey, verifyPrekey } from "../protocol/prekeys.js";
import { publicKeyOf } from "../protocol/signing.js";
import {
  type DeviceListAccepted,
  DeviceListAcceptedDef,
  type EnrolmentOffer,
  EnrolmentOfferDef,
  type EnrolmentProposal,
  EnrolmentProposalDef,
  ExpiresAtDef,
  PostDeviceListRequestDef,
} from "../protocol/wire.js";
import { x25519Public } from "../protocol/x25519.js";
import { type ClientDeps, platformDeps } from "./client.js";
import { RelayError, TransportError } from "./errors.js";
import type { RelayApi } from "./http.js";
import type { ClientStore, DeviceIdentity } from "./store.js";

/** A device's fingerprint as both screens show it: its device id in groups of four (devices.py). */
export function fingerprint(signKey: Uint8Array): string {
  return (deviceIdFor(signKey).match(/.{1,4}/g) ?? []).join(" ");
}

/** A posted offer: show {@link code} and {@link fingerprint}; the rest stays private. */
export interface PendingLink {
  readonly code: string;
  readonly fingerprint: string;
  readonly deviceId: string;
  readonly relay: string;
  readonly expiresAtMs: number;
  readonly secret: Uint8Array;
  readonly signSeed: Uint8Array;
  readonly boxPrivate: Uint8Array;
  readonly kemSeed: Uint8Array;
  readonly lookupId: Uint8Array;
}

/** This browser's entry as it offers it (format 3, role `device`, no name: devices.py `_offered_entry`). */
function offeredEntry(pending: PendingLink, addedAtMs: number): DeviceEntry {
  const signKey = publicKeyOf(pending.signSeed);
  return {
    device_id: pending.deviceId,
    sign_key: signKey,
    box_key: x25519Public(pending.boxPrivate),
    added_at_ms: addedAtMs,
    name: "",
    kem_key: mlkemPublic(pending.kemSeed),
    role: "device",
    scopes: [],
  };
}

/**
 * Make this device's keys and its enrolment prekeys (stored in `store` under their ids, so the approver's
 * first session message can be answered), and post the offer (crypto.md §5.2 step 1). Throws
 * {@link RelayError} (`rate_limited`, `prekey_invalid`, `enrolment_used`), `TransportError`. Not idempotent
 * (a new code each call). `store` must hold no device yet.
 */
export async function startLink(
  api: RelayApi,
  store: ClientStore,
  deps: ClientDeps = platformDeps,
): Promise<PendingLink> {
  if (store.identity()) throw new Error("this browser already is a device: sign out first");
  const relay = (await api.wellKnown()).relay.toLowerCase();
  const signSeed = deps.random(32);
  const boxPrivate = deps.random(32);
  const kemSeed = deps.random(64);
  const secret = deps.random(LINK_SECRET_BYTES);
  const signKey = publicKeyOf(signSeed);
  const deviceId = deviceIdFor(signKey);
  const now = deps.now();
  const spkPrivate = deps.random(32);
  const pqSeed = deps.random(64);
  const bundle = store.transaction(() => {
    const spkId = store.nextPrekeyId("x25519-signed");
    const pqId = store.nextPrekeyId("mlkem768-last-resort");
    store.putPrekeyPrivate("x25519-signed", spkId, spkPrivate);
    store.putPrekeyPrivate("mlkem768-last-resort", pqId, pqSeed);
    return {
      signed_prekey: signPrekey(signSeed, deviceId, "x25519-signed", spkId, x25519Public(spkPrivate), now),
      pq_prekey: signPrekey(signSeed, deviceId, "mlkem768-last-resort", pqId, mlkemPublic(pqSeed), now),
    };
  });
  await store.durable();
  const boxKey = x25519Public(boxPrivate);
  const kemKey = mlkemPublic(kemSeed);
  const offer: EnrolmentOffer = {
    relay,
    lookup_id: lookupId(secret, relay),
    sign_key: signKey,
    box_key: boxKey,
    bundle,
    created_at_ms: now,
    offer_mac: offerMac(secret, relay, signKey, boxKey, now, kemKey),
    kem_key: kemKey,
  };
  const accepted = await api.call("POST", "/v1/enrolments", {
    request: { def: EnrolmentOfferDef, value: offer },
    response: ExpiresAtDef,
  });
  return {
    code: linkCodeText(secret),
    fingerprint: fingerprint(signKey),
    deviceId,
    relay,
    expiresAtMs: accepted.expires_at_ms,
    secret,
    signSeed,
    boxPrivate,
    kemSeed,
    lookupId: offer.lookup_id,
  };
}

/**
 * One poll of `GET /v1/enrolments/{lookup_id}/proposal`: the proposal, or null while there is none (204).
 * An answer that does not decode is treated as none (the relay gains nothing: only a proposal whose
 * approval tag verifies is ever used). Throws {@link RelayError} (`enrolment_expired`, `enrolment_unknown`,
 * `rate_limited`) and `TransportError`. Idempotent (reads only).
 */
export async function pollProposal(api: RelayApi, pending: PendingLink): Promise<EnrolmentProposal | null> {
  try {
    return await api.call("GET", `/v1/enrolments/${lookupIdText(pending.lookupId)}/proposal`, {
      response: EnrolmentProposalDef,
    });
  } catch (error) {
    if (error instanceof TetherlessError && error.code === "malformed_body") return null; // 204: no body yet
    throw error;
  }
}

/**
 * Poll until a proposal arrives (every `pollMs`), or throw `enrolment_expired` once the offer's time is up.
 * `signal` stops it (throws `AbortError`). Transport errors are retried.
 */
export async function waitForProposal(
  api: RelayApi,
  pending: PendingLink,
  opts: { pollMs?: number; signal?: AbortSignal; deps?: ClientDeps } = {},
): Promise<EnrolmentProposal> {
  const deps = opts.deps ?? platformDeps;
  for (;;) {
    opts.signal?.throwIfAborted();
    try {
      const proposal = await pollProposal(api, pending);
      if (proposal) return proposal;
    } catch (error) {
      if (error instanceof RelayError) throw error;
      if (!(error instanceof TransportError)) throw error;
    }
    if (deps.now() > pending.expiresAtMs) {
      throw new TetherlessError("enrolment_expired", "no device approved the link code in time; start again");
    }
    await new Promise((resolve) => setTimeout(resolve, opts.pollMs ?? 1000));
  }
}

/**
 * The version after `prev` adding `entry` and changing nothing else (device_list.py `next_version` with
 * `add_devices` only): entries sorted by id with names dropped, format at least 2, `created_at_ms` not
 * before the previous one. Pure; unsigned.
 */
export function nextVersionAdding(prev: DeviceList, entry: DeviceEntry, nowMs: number): DeviceList {
  const devices = [...prev.devices, entry]
    .map((d) => ({ ...d, name: "" }))
    .sort((a, b) => (a.device_id < b.device_id ? -1 : a.device_id > b.device_id ? 1 : 0));
  return {
    account_id: prev.account_id,
    version: prev.version + 1,
    created_at_ms: Math.max(nowMs, prev.created_at_ms),
    devices,
    prev_hash: listHash(prev),
    format: Math.max(prev.format, 2),
    policy: prev.policy,
    credentials: prev.credentials,
    recovery_key: prev.recovery_key,
    recovery_backup_key_hash: prev.recovery_backup_key_hash,
    account_key_epoch: prev.format === 1 ? 0 : prev.account_key_epoch,
  };
}

/**
 * Check a proposal as crypto.md §5.2 step 4 demands and return it with this device's self-signature: the
 * `approval_tag` (made by a holder of the code: `bad_signature` otherwise), the account's chain from its
 * genesis (its errors), that the version follows the head (`device_list_conflict`: approve again) and adds
 * exactly this device's offered entry, changing nothing else (`invalid_device_list`), and the approvals under
 * the account's policy (`policy_not_met`, `bad_signature`). Pure over the fetched chain; reads only.
 */
export async function verifyProposal(
  api: RelayApi,
  pending: PendingLink,
  proposal: EnrolmentProposal,
): Promise<SignedDeviceList> {
  const dl = proposal.signed.device_list;
  try {
    verifyApprovalTag(pending.secret, pending.relay, dl.account_id, dl.version, listHash(dl), proposal.approval_tag);
  } catch (error) {
    if (error instanceof LinkCodeMismatchError)
      throw new TetherlessError("bad_signature", `proposal rejected: ${error.message}`);
    throw error;
  }
  const verified = verifyChain(await api.deviceChain(dl.account_id), dl.account_id);
  const head = verified.head;
  if (dl.version !== head.version + 1 || !equal(dl.prev_hash, listHash(head))) {
    throw new TetherlessError(
      "device_list_conflict",
      "the account's device list changed since the approval; approve again",
    );
  }
  const mine = dl.devices.find((d) => d.device_id === pending.deviceId);
  if (!mine) throw new TetherlessError("invalid_device_list", "proposal rejected: it does not add this device");
  const expected = nextVersionAdding(head, offeredEntry(pending, mine.added_at_ms), dl.created_at_ms);
  if (!equal(listHash(expected), listHash(dl))) {
    throw new TetherlessError("invalid_device_list", "proposal rejected: it changes more than adding this device");
  }
  const selfSigned: SignedDeviceList = {
    ...proposal.signed,
    signatures: [...proposal.signed.signatures, approve(dl, pending.signSeed)],
  };
  try {
    evaluateVersion(head, selfSigned, verified.removedIds);
  } catch (error) {
    if (error instanceof TetherlessError) throw new TetherlessError(error.code, `proposal rejected: ${error.detail}`);
    throw error;
  }
  return selfSigned;
}

/**
 * Post the self-signed version and store this device in `store` (its keys, and the verified chain's mark
 * at that version). Throws {@link RelayError} (`device_list_conflict`: another change won; approve again)
 * and then forgets the device again; `TransportError` (the keys are kept: the relay may have accepted).
 * The keys are on disk before the post: a device the relay accepted is never lost.
 */
export async function finishLink(
  api: RelayApi,
  store: ClientStore,
  pending: PendingLink,
  signed: SignedDeviceList,
): Promise<DeviceIdentity> {
  const dl = signed.device_list;
  const identity: DeviceIdentity = {
    signSeed: pending.signSeed,
    boxPrivate: pending.boxPrivate,
    kemSeed: pending.kemSeed,
    accountId: dl.account_id,
    deviceId: pending.deviceId,
    address: formatAddress({ account: dl.account_id, device: pending.deviceId, relay: pending.relay }),
    relayName: pending.relay,
    genesis: signed,
  };
  store.transaction(() => store.setIdentity(identity));
  await store.durable();
  let accepted: DeviceListAccepted;
  try {
    accepted = await api.call("POST", `/v1/accounts/${dl.account_id}/devices`, {
      request: { def: PostDeviceListRequestDef, value: { signed } },
      response: DeviceListAcceptedDef,
    });
  } catch (error) {
    // Refused: this device is in no list, so forget it (devices.py `_join`). Without an answer it may be in
    // one: the keys stay (a device the relay accepted is never lost; a reload logs in or reports it).
    if (error instanceof RelayError || error instanceof TetherlessError) {
      store.transaction(() => store.setIdentity(null));
      await store.durable();
    }
    throw error;
  }
  if (accepted.version !== dl.version || !equal(accepted.list_hash, listHash(dl))) {
    throw new TetherlessError("invalid_device_list", "the relay accepted another version than the one posted");
  }
  store.transaction(() => store.setMark(dl.account_id, [dl.version, accepted.list_hash]));
  return identity;
}

// -- approving a new device -------------------------------------------------------------------------------

/** An offer checked against the typed code: what the user confirms (its fingerprint). */
export interface CheckedOffer {
  readonly secret: Uint8Array;
  readonly offer: EnrolmentOffer;
  readonly fingerprint: string;
  readonly deviceId: string;
}

/**
 * The offer behind a typed link code, checked against it (crypto.md §5.2 step 2): the lookup id and the
 * offer's MAC (`bad_signature`, "code does not match"), the relay named, the prekeys' signatures and the
 * `kem_key` (`prekey_invalid`). Throws `RangeError` for a malformed code and {@link RelayError}
 * (`enrolment_unknown`, `enrolment_expired`, `enrolment_used`). Reads only.
 */
export async function fetchOffer(api: RelayApi, me: DeviceIdentity, code: string): Promise<CheckedOffer> {
  const secret = parseLinkCode(code);
  const relay = me.relayName;
  const lookup = lookupId(secret, relay);
  const offer = await api.call("GET", `/v1/enrolments/${lookupIdText(lookup)}`, {
    response: EnrolmentOfferDef,
    auth: true,
  });
  const mac = offerMac(secret, relay, offer.sign_key, offer.box_key, offer.created_at_ms, offer.kem_key);
  if (!equal(offer.lookup_id, lookup) || !equal(offer.offer_mac, mac) || offer.relay.toLowerCase() !== relay) {
    throw new TetherlessError("bad_signature", "code does not match: the offer was not made by the device showing it");
  }
  const deviceId = deviceIdFor(offer.sign_key);
  verifyPrekey(offer.sign_key, deviceId, offer.bundle.signed_prekey, "x25519-signed");
  verifyPrekey(offer.sign_key, deviceId, offer.bundle.pq_prekey, "mlkem768-last-resort");
  if (!offer.kem_key.length) {
    throw new TetherlessError("invalid_field", "the new device offers no ML-KEM key (an older client): update it");
  }
  mlkemCheckPublic(offer.kem_key);
  return { secret, offer, fingerprint: fingerprint(offer.sign_key), deviceId };
}

/**
 * Propose the version of `me`'s verified list that adds the checked offer's device, signed by this device,
 * with the `approval_tag` (crypto.md §5.2 step 3). `approvals` adds the security-key approvals the version
 * carries (webauthn.ts `keyApprovals`, which also refuses when the policy requires a key and none is
 * given). Returns the proposed version. Throws {@link RelayError} (`enrolment_used`, `forbidden`), the
 * chain's errors, what `approvals` throws. A retry of the very same proposal is idempotent on the relay; a
 * new call builds a new version (then `enrolment_used`).
 */
export async function approveOffer(
  api: RelayApi,
  store: ClientStore,
  me: DeviceIdentity,
  checked: CheckedOffer,
  deps: ClientDeps = platformDeps,
  approvals: (verified: VerifiedChain, dl: DeviceList) => Promise<WebAuthnAssertion[]> = async () => [],
): Promise<DeviceList> {
  const verified = verifyChain(
    await api.deviceChain(me.accountId),
    me.accountId,
    store.mark(me.accountId) ?? undefined,
  );
  store.transaction(() => store.setMark(me.accountId, verified.mark));
  const now = deps.now();
  const { offer } = checked;
  const entry: DeviceEntry = {
    device_id: checked.deviceId,
    sign_key: offer.sign_key,
    box_key: offer.box_key,
    added_at_ms: Math.max(now, verified.head.created_at_ms),
    name: "",
    kem_key: offer.kem_key,
    role: "device",
    scopes: [],
  };
  const dl = nextVersionAdding(verified.head, entry, now);
  const signed: SignedDeviceList = {
    device_list: dl,
    signatures: [approve(dl, me.signSeed)],
    recovery_signatures: [],
    webauthn_assertions: await approvals(verified, dl),
  };
  const tag = approvalTag(checked.secret, me.relayName, dl.account_id, dl.version, listHash(dl));
  await api.call("POST", `/v1/enrolments/${lookupIdText(offer.lookup_id)}/proposal`, {
    request: { def: EnrolmentProposalDef, value: { signed, approval_tag: tag } },
    response: ExpiresAtDef,
    auth: true,
  });
  return dl;
}
