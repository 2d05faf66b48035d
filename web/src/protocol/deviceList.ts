/**
 * Device lists, formats 1, 2 and 3 (protocol/device_list.py; docs/protocol.md §4, docs/crypto.md §3,
 * §3.6): layouts, hashes, the genesis check, one version against its predecessor, and the whole chain
 * with the client's high-water mark. Format 3 adds per device an ML-KEM-768 `kem_key`, a `role` and
 * `scopes`; only role `device` (with credentials and the recovery key) approves. Pure.
 */
import { sha256 } from "@noble/hashes/sha2.js";
import { compare, equal, toHex } from "./bytes.js";
import { DeviceListForkError, DeviceListRollbackError, TetherlessError } from "./errors.js";
import { mlkemCheckPublic } from "./handshake.js";
import { accountIdFor, deviceIdFor } from "./ids.js";
import {
  DEFAULT_POLICY,
  type DeviceEntry,
  type DeviceList,
  type DeviceRole,
  type DeviceScope,
  type DeviceListChain,
  type DeviceListSignature,
  type Policy,
  type SignedDeviceList,
  type WebAuthnCredential,
} from "./messages.js";
import { type Field, layout, publicKeyOf, sign, verify } from "./signing.js";
import { parsePublicKey, verifyAssertion } from "./webauthn.js";

export const FORMAT_1 = 1;
export const FORMAT_2 = 2;
export const FORMAT_3 = 3;

/** The scopes each role may carry (crypto.md §3.6): a closed table, checked by {@link checkStructure}. */
export const ROLE_SCOPES: Readonly<Record<DeviceRole, readonly DeviceScope[]>> = {
  device: [],
  integration: ["receive", "send"],
  archiver: [],
};

/** Whether `entry` receives account-key grants (reads the history): roles `device` and `archiver`. */
export function receivesAccountKeyGrants(entry: DeviceEntry): boolean {
  return entry.role === "device" || entry.role === "archiver";
}

/** Whether `entry`'s signature counts as an approval of the next version: role `device` only. */
export function mayApprove(entry: DeviceEntry): boolean {
  return entry.role === "device";
}

const bad = (why: string) => new TetherlessError("invalid_device_list", why);

// -- layouts and hashes --------------------------------------------------------------------------------

function layoutV1(dl: DeviceList): Uint8Array {
  const fields: Field[] = [dl.account_id, dl.version, dl.prev_hash, dl.created_at_ms, dl.devices.length];
  for (const d of dl.devices) fields.push(d.device_id, d.sign_key, d.box_key, d.name, d.added_at_ms);
  return layout("device-list", ...fields);
}

/** Formats 2 and 3: format 3 appends `kem_key`, `role`, `|scopes|`, scopes… to each device (§3.6). */
function layoutV2(dl: DeviceList): Uint8Array {
  const p = dl.policy;
  const fields: Field[] = [
    dl.account_id,
    dl.version,
    dl.prev_hash,
    dl.created_at_ms,
    p.threshold,
    p.require_webauthn ? 1 : 0,
    p.require_user_verification ? 1 : 0,
    dl.account_key_epoch,
    dl.recovery_key,
    dl.recovery_backup_key_hash,
    dl.devices.length,
  ];
  const v3 = dl.format === FORMAT_3;
  for (const d of dl.devices) {
    fields.push(d.device_id, d.sign_key, d.box_key, d.added_at_ms);
    if (v3) fields.push(d.kem_key, d.role, d.scopes.length, ...d.scopes);
  }
  fields.push(dl.credentials.length);
  for (const c of dl.credentials) fields.push(c.credential_id, c.public_key, c.rp_id, c.added_at_ms);
  return layout(v3 ? "device-list/3" : "device-list/2", ...fields);
}

/** One layout per format this implementation knows. */
const LAYOUTS: Readonly<Record<number, (dl: DeviceList) => Uint8Array>> = {
  [FORMAT_1]: layoutV1,
  [FORMAT_2]: layoutV2,
  [FORMAT_3]: layoutV2,
};

/** The bytes every approval of `dl` covers. Throws `invalid_device_list` for a format not implemented here. */
export function listLayout(dl: DeviceList): Uint8Array {
  const build = LAYOUTS[dl.format];
  if (!build) throw bad(`device-list format ${dl.format} is not supported by this client`);
  return build(dl);
}

/** SHA-256 of the list's layout: the next version's `prev_hash` and the WebAuthn challenge. */
export function listHash(dl: DeviceList): Uint8Array {
  return sha256(listLayout(dl));
}

// -- structure -------------------------------------------------------------------------------------------

function policyEquals(a: Policy, b: Policy): boolean {
  return (
    a.threshold === b.threshold &&
    a.require_webauthn === b.require_webauthn &&
    a.require_user_verification === b.require_user_verification
  );
}

function credentialEquals(a: WebAuthnCredential, b: WebAuthnCredential): boolean {
  return (
    equal(a.credential_id, b.credential_id) &&
    equal(a.public_key, b.public_key) &&
    a.rp_id === b.rp_id &&
    a.added_at_ms === b.added_at_ms
  );
}

const sortedStrings = (xs: readonly string[]) => [...xs].sort((a, b) => (a < b ? -1 : a > b ? 1 : 0));

/** Check one list on its own (no predecessor). Throws `invalid_device_list` (device_list.py `check_structure`). */
export function checkStructure(dl: DeviceList): void {
  if (!LAYOUTS[dl.format]) throw bad(`device-list format ${dl.format} is not supported by this client`);
  if ((dl.version === 1) !== (dl.prev_hash.length === 0)) throw bad("prev_hash is empty exactly for version 1");
  if (dl.prev_hash.length !== 0 && dl.prev_hash.length !== 32) throw bad("prev_hash is 32 bytes");
  const ids = dl.devices.map((d) => d.device_id);
  for (const d of dl.devices) {
    if (d.device_id !== deviceIdFor(d.sign_key)) throw bad(`device_id ${d.device_id} does not match its sign_key`);
  }
  if (new Set(ids).size !== ids.length) throw bad("a device appears twice");
  if (new Set(dl.devices.map((d) => toHex(d.box_key))).size !== ids.length) throw bad("two devices share a box_key");
  if (dl.format === FORMAT_3) {
    checkRolesAndKemKeys(dl.devices);
  } else if (dl.devices.some((d) => d.kem_key.length || d.role !== "device" || d.scopes.length)) {
    throw bad(`kem_key, role and scopes need format 3 (this list is format ${dl.format})`);
  }
  if (dl.format === FORMAT_1) {
    if (
      !policyEquals(dl.policy, DEFAULT_POLICY) ||
      dl.credentials.length ||
      dl.recovery_key.length ||
      dl.recovery_backup_key_hash.length ||
      dl.account_key_epoch
    ) {
      throw bad("a format-1 list has no policy, credentials, recovery key or epoch");
    }
    return;
  }
  if (dl.devices.some((d) => d.name))
    throw bad("device names must be empty from format 2 on (they live in the account log)");
  if (ids.join("\n") !== sortedStrings(ids).join("\n")) throw bad("devices must be sorted by device_id");
  const credentialIds = dl.credentials.map((c) => c.credential_id);
  const sortedIds = [...credentialIds].sort(compare);
  if (
    credentialIds.some((id, i) => !equal(id, sortedIds[i]!)) ||
    new Set(credentialIds.map(toHex)).size !== credentialIds.length
  ) {
    throw bad("credentials must be sorted by credential_id and unique");
  }
  for (const c of dl.credentials) {
    try {
      parsePublicKey(c.public_key);
    } catch (error) {
      throw bad(`credential public key: ${error instanceof TetherlessError ? error.detail : "malformed"}`);
    }
  }
  if (![0, 32].includes(dl.recovery_key.length) || ![0, 32].includes(dl.recovery_backup_key_hash.length)) {
    throw bad("recovery_key and recovery_backup_key_hash are empty or 32 bytes");
  }
  if (dl.policy.threshold > dl.devices.filter(mayApprove).length + dl.credentials.length) {
    throw bad("threshold is above the number of devices (role device) and credentials");
  }
  if (dl.policy.require_webauthn && dl.credentials.length === 0)
    throw bad("require_webauthn needs at least one credential");
}

function checkRolesAndKemKeys(devices: readonly DeviceEntry[]): void {
  const kemKeys = devices.filter((d) => d.kem_key.length).map((d) => toHex(d.kem_key));
  if (new Set(kemKeys).size !== kemKeys.length) throw bad("two devices share a kem_key");
  for (const d of devices) {
    if (d.kem_key.length) {
      try {
        mlkemCheckPublic(d.kem_key);
      } catch (error) {
        throw bad(`device ${d.device_id}: kem_key: ${error instanceof TetherlessError ? error.detail : "invalid"}`);
      }
    }
    const allowed = ROLE_SCOPES[d.role];
    if (!allowed) throw bad(`device ${d.device_id}: unknown role ${String(d.role)}`);
    const sortedUnique = [...new Set(d.scopes)].sort();
    if (d.scopes.join("\n") !== sortedUnique.join("\n") || d.scopes.some((s) => !allowed.includes(s))) {
      throw bad(`device ${d.device_id}: role ${d.role} takes sorted, unique scopes from [${allowed.join(", ")}]`);
    }
    if (d.role === "integration" && d.scopes.length === 0) {
      throw bad(`device ${d.device_id}: an integration needs at least one scope`);
    }
  }
}

/** The policy in force for approving the version after `dl` (format 1: threshold 1). */
function policyOf(dl: DeviceList): Policy {
  return dl.format === FORMAT_1 ? DEFAULT_POLICY : dl.policy;
}

// -- genesis ---------------------------------------------------------------------------------------------

/** A genesis list of one device (default policy, no recovery key), self-signed (device_list.py `_genesis`). */
function makeGenesis(
  seed: Uint8Array,
  boxKey: Uint8Array,
  nowMs: number,
  format: number,
  name: string,
  kemKey: Uint8Array,
): SignedDeviceList {
  const signKey = publicKeyOf(seed);
  const entry: DeviceEntry = {
    device_id: deviceIdFor(signKey),
    sign_key: signKey,
    box_key: boxKey,
    added_at_ms: nowMs,
    name,
    kem_key: kemKey,
    role: "device",
    scopes: [],
  };
  const dl: DeviceList = {
    account_id: accountIdFor(signKey),
    version: 1,
    created_at_ms: nowMs,
    devices: [entry],
    prev_hash: new Uint8Array(0),
    format,
    policy: DEFAULT_POLICY,
    credentials: [],
    recovery_key: new Uint8Array(0),
    recovery_backup_key_hash: new Uint8Array(0),
    account_key_epoch: 0,
  };
  return { device_list: dl, signatures: [approve(dl, seed)], recovery_signatures: [], webauthn_assertions: [] };
}

/** A new account's first device list (format 1), signed by its only device (device_list.py `genesis`). */
export function genesis(seed: Uint8Array, boxKey: Uint8Array, name: string, nowMs: number): SignedDeviceList {
  return makeGenesis(seed, boxKey, nowMs, FORMAT_1, name, new Uint8Array(0));
}

/**
 * A new account's first device list in format 3 (crypto.md §3.6; device_list.py `genesis_v3`): one device
 * of role `device` publishing its ML-KEM-768 encapsulation key, the default policy, no recovery key, signed
 * by the device. Throws `RangeError` for an empty `kemKey`. Pure.
 */
export function genesisV3(seed: Uint8Array, boxKey: Uint8Array, kemKey: Uint8Array, nowMs: number): SignedDeviceList {
  if (!kemKey.length) throw new RangeError("a format-3 genesis device has a kem_key");
  return makeGenesis(seed, boxKey, nowMs, FORMAT_3, "", kemKey);
}

/** A device's signature over `dl`: an approval (device of P) or a self-signature (added device). */
export function approve(dl: DeviceList, seed: Uint8Array): DeviceListSignature {
  return { device_id: deviceIdFor(publicKeyOf(seed)), signature: sign(seed, listLayout(dl)) };
}

/**
 * Check a genesis list (format 1 or 2) and return its device. Throws `invalid_device_list` when it is
 * not a well-formed genesis and `bad_signature` when a signature does not verify. Pure.
 */
export function verifyGenesis(signed: SignedDeviceList): DeviceEntry {
  const dl = signed.device_list;
  if (dl.version !== 1 || dl.prev_hash.length) throw bad("a genesis list has version 1 and no prev_hash");
  const device = dl.devices[0];
  if (dl.devices.length !== 1 || !device) throw bad("a genesis list has exactly one device");
  if (device.device_id !== deviceIdFor(device.sign_key)) throw bad("device_id does not match sign_key");
  if (dl.account_id !== accountIdFor(device.sign_key))
    throw bad("account_id is not derived from the genesis device's key");
  const signature = signed.signatures[0];
  if (signed.signatures.length !== 1 || !signature || signature.device_id !== device.device_id) {
    throw bad("a genesis list is signed by its device, once");
  }
  checkStructure(dl);
  if (dl.format === FORMAT_3 && (!mayApprove(device) || !device.kem_key.length)) {
    throw bad("a format-3 genesis device has role device and a kem_key");
  }
  if (dl.credentials.length || signed.webauthn_assertions.length)
    throw bad("a genesis list has no WebAuthn credentials");
  if (signed.recovery_signatures.length !== (dl.recovery_key.length ? 1 : 0)) {
    throw bad("a genesis list carries one recovery signature exactly when it sets a recovery key");
  }
  const raw = listLayout(dl);
  verify(device.sign_key, raw, signature.signature);
  if (dl.recovery_key.length) verify(dl.recovery_key, raw, signed.recovery_signatures[0]!);
  return device;
}

// -- one version -----------------------------------------------------------------------------------------

/** What an accepted version changes (device_list.py `VersionChange`). */
export interface VersionChange {
  readonly added: DeviceEntry[];
  readonly removed: DeviceEntry[];
  readonly addedCredentials: WebAuthnCredential[];
  readonly removedCredentials: WebAuthnCredential[];
  /** Credential id (hex) → new sign count, for every verified assertion. */
  readonly assertionCounters: Map<string, number>;
  readonly listHash: Uint8Array;
  readonly approvingDevices: string[];
  readonly approvingCredentials: string[];
  readonly recoveryApproved: boolean;
}

function signatureOk(key: Uint8Array, message: Uint8Array, signature: Uint8Array): boolean {
  try {
    verify(key, message, signature);
    return true;
  } catch {
    return false;
  }
}

function checkContinuation(prev: DeviceList, dl: DeviceList, removedIds: ReadonlySet<string>): void {
  if (dl.account_id !== prev.account_id) throw bad("the version belongs to another account");
  if (dl.version !== prev.version + 1) throw bad(`version ${dl.version} does not follow version ${prev.version}`);
  if (!equal(dl.prev_hash, listHash(prev))) throw bad("prev_hash does not match the previous version");
  if (dl.format < prev.format) throw bad(`the format cannot go back from ${prev.format} to ${dl.format}`);
  checkStructure(dl);
  if (dl.format === FORMAT_1) return; // format 1 keeps protocol v1's rules (docs/protocol.md §4)
  if (dl.created_at_ms < prev.created_at_ms) throw bad("created_at_ms is before the previous version's");
  const before = new Map(prev.devices.map((d) => [d.device_id, d]));
  for (const d of dl.devices) {
    if (removedIds.has(d.device_id) && !before.has(d.device_id)) {
      throw bad(`device ${d.device_id} was removed earlier and cannot come back`);
    }
    const kept = before.get(d.device_id);
    if (!kept) {
      if (dl.format === FORMAT_3 && !d.kem_key.length)
        throw bad(`added device ${d.device_id} has no kem_key (format 3)`);
      continue;
    }
    // A kem_key may only go from empty (carried over from format 1/2) to set, by a version the device signs.
    const kemOk = equal(d.kem_key, kept.kem_key) || !kept.kem_key.length;
    if (!kemOk || !fixedEquals(kept, d)) throw bad(`device ${d.device_id} changed its entry`);
  }
  const oldCredentials = new Map(prev.credentials.map((c) => [toHex(c.credential_id), c]));
  for (const c of dl.credentials) {
    const kept = oldCredentials.get(toHex(c.credential_id));
    if (kept && !credentialEquals(kept, c)) throw bad("a credential changed its entry");
  }
}

/** The parts of an entry no later version may change (a new role means a new device). */
function fixedEquals(a: DeviceEntry, b: DeviceEntry): boolean {
  return (
    equal(a.box_key, b.box_key) &&
    a.added_at_ms === b.added_at_ms &&
    a.role === b.role &&
    a.scopes.join("\n") === b.scopes.join("\n")
  );
}

/**
 * Check version L (`signed`) against its predecessor P (docs/crypto.md §3.2) and say what it changes.
 * Throws `invalid_device_list`, `bad_signature`, `webauthn_invalid` or `policy_not_met` exactly as
 * device_list.py `evaluate_version` documents. Counters are returned, not judged. Pure.
 */
export function evaluateVersion(
  prev: DeviceList,
  signed: SignedDeviceList,
  removedIds: ReadonlySet<string> = new Set(),
): VersionChange {
  const dl = signed.device_list;
  checkContinuation(prev, dl, removedIds);
  const raw = listLayout(dl);
  const digest = sha256(raw);
  const before = new Map(prev.devices.map((d) => [d.device_id, d]));
  const after = new Set(dl.devices.map((d) => d.device_id));
  const added = dl.devices.filter((d) => !before.has(d.device_id));
  const removed = prev.devices.filter((d) => !after.has(d.device_id));
  const oldCredentials = new Map(prev.credentials.map((c) => [toHex(c.credential_id), c]));
  const newCredentials = new Map(dl.credentials.map((c) => [toHex(c.credential_id), c]));
  const addedCredentials = dl.credentials.filter((c) => !oldCredentials.has(toHex(c.credential_id)));
  const removedCredentials = prev.credentials.filter((c) => !newCredentials.has(toHex(c.credential_id)));

  if (dl.format === FORMAT_1) {
    const approvers = signed.signatures
      .filter((s) => {
        const entry = before.get(s.device_id);
        return entry !== undefined && signatureOk(entry.sign_key, raw, s.signature);
      })
      .map((s) => s.device_id);
    if (approvers.length === 0) {
      throw new TetherlessError("bad_signature", "no valid signature by a device of the previous version");
    }
    return {
      added,
      removed,
      addedCredentials: [],
      removedCredentials: [],
      assertionCounters: new Map(),
      listHash: digest,
      approvingDevices: sortedStrings([...new Set(approvers)]),
      approvingCredentials: [],
      recoveryApproved: false,
    };
  }

  const prevEpoch = prev.format === FORMAT_1 ? 0 : prev.account_key_epoch;
  if (removed.length || removedCredentials.length) {
    if (dl.account_key_epoch !== prevEpoch + 1) {
      throw bad("a version that removes a device or credential sets account_key_epoch to the previous + 1");
    }
  } else if (dl.account_key_epoch < prevEpoch) {
    throw bad("account_key_epoch cannot go down");
  }

  const policy = policyOf(prev);
  // Devices that must sign L as proof of possession: added ones, and (format 3) kept ones setting a kem_key.
  const mustSign = dl.devices.filter((d) => {
    const kept = before.get(d.device_id);
    return !kept || !equal(d.kem_key, kept.kem_key);
  });
  // Device signatures: approvals by devices of P, self-signatures of added devices.
  const maySign = new Map([...before, ...added.map((d) => [d.device_id, d] as const)]);
  const signers = new Set<string>();
  for (const s of signed.signatures) {
    if (signers.has(s.device_id)) throw bad(`device ${s.device_id} signed twice`);
    signers.add(s.device_id);
    const entry = maySign.get(s.device_id);
    if (!entry) throw new TetherlessError("bad_signature", `signature by ${s.device_id}, not a device of P or L`);
    verify(entry.sign_key, raw, s.signature);
    // An integration or archiver of P never signs: its entry is complete from the version that added it,
    // so it has no proof of possession to give, and its approval must not count (crypto.md §3.6).
    if (before.has(s.device_id) && !mayApprove(entry)) {
      throw new TetherlessError(
        "policy_not_met",
        `device ${s.device_id} has role ${entry.role}: it cannot approve a version`,
      );
    }
  }
  const approvingDevices = sortedStrings([...signers].filter((id) => before.has(id)));

  // Recovery signatures: by P's recovery key (an approval) and/or L's new one (proof of possession).
  const recoveryKeys = [prev.recovery_key, dl.recovery_key].filter((k) => k.length > 0);
  const recoverySigned = new Set<string>();
  for (const signature of signed.recovery_signatures) {
    const matching = recoveryKeys.find((k) => signatureOk(k, raw, signature));
    if (!matching) throw new TetherlessError("bad_signature", "recovery signature by neither P's nor L's recovery key");
    if (recoverySigned.has(toHex(matching))) throw bad("the recovery key signed twice");
    recoverySigned.add(toHex(matching));
  }
  const recoveryApproved = prev.recovery_key.length > 0 && recoverySigned.has(toHex(prev.recovery_key));

  // Assertions: approvals by credentials of P, proofs of possession of added credentials.
  const counters = new Map<string, number>();
  const approvingCredentials: string[] = [];
  for (const assertion of signed.webauthn_assertions) {
    const id = toHex(assertion.credential_id);
    const credential = oldCredentials.get(id) ?? newCredentials.get(id);
    if (!credential) throw new TetherlessError("webauthn_invalid", "assertion by an unknown credential");
    if (counters.has(id)) throw bad("a credential asserted twice");
    const result = verifyAssertion(credential, assertion, digest, policy.require_user_verification);
    counters.set(id, result.signCount);
    if (oldCredentials.has(id)) approvingCredentials.push(id);
  }

  const weight = approvingDevices.length + approvingCredentials.length + (recoveryApproved ? policy.threshold : 0);
  if (weight < policy.threshold) {
    throw new TetherlessError(
      "policy_not_met",
      `approvals weigh ${weight}, the previous version's threshold is ${policy.threshold}`,
    );
  }
  if (policy.require_webauthn && approvingCredentials.length === 0) {
    throw new TetherlessError("policy_not_met", "the previous version requires a WebAuthn co-signature");
  }
  for (const d of mustSign) {
    if (!signers.has(d.device_id)) {
      const what = before.has(d.device_id) ? "device setting its kem_key" : "added device";
      throw new TetherlessError("policy_not_met", `${what} ${d.device_id} has not signed L`);
    }
  }
  for (const c of addedCredentials) {
    if (!counters.has(toHex(c.credential_id)))
      throw new TetherlessError("policy_not_met", "an added credential has not asserted L");
  }
  const recoveryKeyChanged = !equal(dl.recovery_key, prev.recovery_key);
  if (dl.recovery_key.length && recoveryKeyChanged && !recoverySigned.has(toHex(dl.recovery_key))) {
    throw new TetherlessError("policy_not_met", "the new recovery key has not signed L");
  }
  // The backup key is derived from the recovery secret (account-log.md §5.7): only its holder names a new one.
  const backupChanged = !equal(dl.recovery_backup_key_hash, prev.recovery_backup_key_hash);
  if (
    backupChanged &&
    dl.recovery_backup_key_hash.length &&
    !(dl.recovery_key.length && recoverySigned.has(toHex(dl.recovery_key)))
  ) {
    throw new TetherlessError(
      "policy_not_met",
      "the recovery backup key changed without a signature by L's recovery key",
    );
  }
  return {
    added,
    removed,
    addedCredentials,
    removedCredentials,
    assertionCounters: counters,
    listHash: digest,
    approvingDevices,
    approvingCredentials: approvingCredentials.sort(),
    recoveryApproved,
  };
}

// -- the whole chain -------------------------------------------------------------------------------------

/** A verified chain: the head's devices, the head, and the new high-water mark `(version, list_hash)`. */
export interface VerifiedChain {
  readonly devices: DeviceEntry[];
  readonly head: DeviceList;
  readonly mark: readonly [number, Uint8Array];
  readonly removedIds: ReadonlySet<string>;
  /** Credential id (hex) → last sign count seen along the chain. */
  readonly counters: ReadonlyMap<string, number>;
}

/** Sign counters strictly increase per credential unless both are 0 (docs/crypto.md §6); `webauthn_replayed`. */
export function checkCounter(credentialIdHex: string, stored: number | undefined, next: number): void {
  if (stored === undefined || (stored === 0 && next === 0) || next > stored) return;
  throw new TetherlessError(
    "webauthn_replayed",
    `sign counter ${next} is not above ${stored} for credential ${credentialIdHex.slice(0, 16)}`,
  );
}

/**
 * Check an account's device-list chain from its genesis and return its head (device_list.py
 * `verify_chain`). Throws `invalid_device_list`, `bad_signature`, `policy_not_met`, `webauthn_invalid`,
 * `webauthn_replayed`; with `mark` (the client's earlier `(version, list_hash)`),
 * {@link DeviceListForkError} when the chain does not contain exactly that pair and
 * {@link DeviceListRollbackError} when it ends below it. Pure.
 */
export function verifyChain(
  chain: DeviceListChain,
  accountId: string,
  mark?: readonly [number, Uint8Array],
): VerifiedChain {
  const first = chain.versions[0];
  if (chain.account_id !== accountId || !first)
    throw bad("the relay returned a chain for another account, or an empty one");
  verifyGenesis(first);
  if (first.device_list.account_id !== accountId) throw bad("the genesis list belongs to another account");
  let previous = first.device_list;
  const hashes = new Map<number, Uint8Array>([[1, listHash(previous)]]);
  const removedIds = new Set<string>();
  const counters = new Map<string, number>();
  for (const signed of chain.versions.slice(1)) {
    const change = evaluateVersion(previous, signed, removedIds);
    for (const [id, count] of change.assertionCounters) {
      checkCounter(id, counters.get(id), count);
      counters.set(id, count);
    }
    for (const c of change.removedCredentials) counters.delete(toHex(c.credential_id));
    for (const d of change.removed) removedIds.add(d.device_id);
    previous = signed.device_list;
    hashes.set(previous.version, change.listHash);
  }
  const head = previous;
  if (mark) {
    const [version, expected] = mark;
    if (head.version < version) {
      throw new DeviceListRollbackError(
        `the chain ends at version ${head.version}, below the verified version ${version}`,
      );
    }
    const seen = hashes.get(version);
    if (!seen || !equal(seen, expected)) {
      throw new DeviceListForkError(`version ${version} differs from the one verified before: a fork`);
    }
  }
  return { devices: [...head.devices], head, mark: [head.version, hashes.get(head.version)!], removedIds, counters };
}
