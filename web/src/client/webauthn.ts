/**
 * Security keys (FIDO2 / WebAuthn) in the browser (docs/crypto.md §3.2, §6; the CLI's `device fido2 add`,
 * `device approve|revoke --fido2`: protocol/client/devices.py and fido2.py):
 *
 * - {@link addSecurityKey}: register a key (`POST /v1/webauthn/register/begin|complete`,
 *   `navigator.credentials.create`) and add it to the account's device list with this device's approval and
 *   the key's proof of possession; the credential the relay answers must be the one the key made.
 * - {@link keyApprovals}: the approvals a list change carries besides this device's signature — a key's
 *   assertion over the version's `list_hash` (`navigator.credentials.get`), required when the policy says so.
 * - {@link revokeDevice}: remove another device, approved by this device (and a key when asked or required).
 *
 * Every version is built here, checked here with the same rules the relay and the other clients run
 * (`evaluateVersion`), and only then posted. The authenticator is an interface ({@link Authenticator}): the
 * browser's is {@link browserAuthenticator}; tests pass a software one. DOM-free apart from that one.
 */
import { compare, equal, toHex } from "../protocol/bytes.js";
import {
  type VerifiedChain,
  approve,
  checkCounter,
  evaluateVersion,
  listHash,
  mayApprove,
  verifyChain,
} from "../protocol/deviceList.js";
import { TetherlessError } from "../protocol/errors.js";
import {
  type DeviceEntry,
  type DeviceList,
  type Policy,
  type SignedDeviceList,
  type WebAuthnAssertion,
  type WebAuthnCredential,
  WebAuthnCredentialDef,
} from "../protocol/messages.js";
import {
  type WebAuthnRegistration,
  type WebAuthnRegistrationOptions,
  WebAuthnRegistrationDef,
  WebAuthnRegistrationOptionsDef,
  originMatchesRpId,
  readRegistration,
  verifyAssertion,
} from "../protocol/webauthn.js";
import { DeviceListAcceptedDef, PostDeviceListRequestDef } from "../protocol/wire.js";
import { type ClientDeps, platformDeps } from "./client.js";
import type { RelayApi } from "./http.js";
import type { ClientStore, DeviceIdentity } from "./store.js";

/** How long the browser waits for a touch before an approval gives up (protocol/client/fido2.py's). */
export const ASSERTION_TIMEOUT_MS = 60_000;

/** A security key could not do what was asked; `message` is one sentence for the user. */
export class SecurityKeyError extends Error {
  constructor(message: string) {
    super(message);
    this.name = "SecurityKeyError";
  }
}

export type UserVerification = "required" | "preferred" | "discouraged";

/** What this client asks of an authenticator (the browser's, or a software one in tests). */
export interface Authenticator {
  /** Make a credential for the relay's registration options. Throws {@link SecurityKeyError}. */
  create(options: WebAuthnRegistrationOptions): Promise<WebAuthnRegistration>;
  /**
   * An assertion over `challenge` by one of `credentials` (the account's keys; the user touches whichever
   * holds one). Throws {@link SecurityKeyError}. Each call uses the key once: its sign counter advances.
   */
  get(
    challenge: Uint8Array,
    credentials: readonly WebAuthnCredential[],
    userVerification: UserVerification,
  ): Promise<WebAuthnAssertion>;
}

// -- the browser's authenticator ------------------------------------------------------------------------------

const buffer = (bytes: Uint8Array): Uint8Array<ArrayBuffer> => bytes.slice() as Uint8Array<ArrayBuffer>;

function rpIdRefused(rpIds: string, origin: string): SecurityKeyError {
  return new SecurityKeyError(
    `Security keys cannot be used on this page: the relay uses them for ${rpIds}, which ${origin} may not use. ` +
      "Open the app at an https:// address of that name (or http://localhost for tests), or ask the relay's " +
      "operator to set webauthn_rp_id to this page's host name.",
  );
}

/** A DOMException of `navigator.credentials` as a sentence (the browser's own texts are not meant for users). */
function keyError(error: unknown, making: boolean, origin: string): SecurityKeyError {
  const name = error instanceof Error ? error.name : "";
  switch (name) {
    case "NotAllowedError":
      return new SecurityKeyError(
        making
          ? "No security key was added: the request was cancelled or timed out (touch the key when it blinks)."
          : "No security key approved: the request was cancelled or timed out, or the key touched is not one of " +
              "your account's keys.",
      );
    case "InvalidStateError":
      return new SecurityKeyError("This security key is already registered for your account.");
    case "SecurityError":
      return new SecurityKeyError(
        `The browser does not allow security keys for this relay on ${origin}: open the app at the relay's own ` +
          "https:// address (or http://localhost for tests).",
      );
    case "NotSupportedError":
      return new SecurityKeyError("This security key supports none of the algorithms the relay accepts.");
    case "AbortError":
      return new SecurityKeyError("The security key request was stopped.");
    default:
      return new SecurityKeyError(
        `The security key failed: ${error instanceof Error ? error.message || name : String(error)}`,
      );
  }
}

/**
 * The browser's authenticators through `navigator.credentials`, speaking for the page at `origin`. Like the
 * CLI (protocol/client/fido2.py), it refuses before touching a key an rp id this origin may not use, and
 * offers only credentials whose rp id it may use.
 */
export function browserAuthenticator(
  origin: string = globalThis.location.origin,
  container: CredentialsContainer | undefined = globalThis.navigator?.credentials,
): Authenticator {
  const available = (): CredentialsContainer => {
    if (!container || typeof globalThis.PublicKeyCredential === "undefined") {
      throw new SecurityKeyError("This browser offers no security keys (WebAuthn is not available here).");
    }
    return container;
  };
  return {
    async create(options) {
      const credentials = available();
      if (!originMatchesRpId(options.rp_id, origin)) throw rpIdRefused(JSON.stringify(options.rp_id), origin);
      let made: Credential | null;
      try {
        made = await credentials.create({
          publicKey: {
            rp: { id: options.rp_id, name: options.rp_name || options.rp_id },
            user: { id: buffer(options.user_id), name: options.user_name, displayName: options.user_name },
            challenge: buffer(options.challenge),
            pubKeyCredParams: options.algorithms.map((alg) => ({ type: "public-key", alg })),
            timeout: options.timeout_ms > 0 ? options.timeout_ms : ASSERTION_TIMEOUT_MS,
            excludeCredentials: options.exclude_credentials.map((id) => ({ type: "public-key", id: buffer(id) })),
            authenticatorSelection: { userVerification: userVerification(options.user_verification) },
            attestation: options.attestation === "none" ? "none" : "direct",
          },
        });
      } catch (error) {
        throw keyError(error, true, origin);
      }
      const response = (made as PublicKeyCredential | null)?.response as AuthenticatorAttestationResponse | undefined;
      if (!made || !response?.attestationObject) throw new SecurityKeyError("The security key made no credential.");
      return {
        credential_id: new Uint8Array((made as PublicKeyCredential).rawId),
        client_data_json: new Uint8Array(response.clientDataJSON),
        attestation_object: new Uint8Array(response.attestationObject),
      };
    },
    async get(challenge, credentials, uv) {
      const container = available();
      const usable = credentials.filter((c) => originMatchesRpId(c.rp_id, origin));
      const rpId = usable[0]?.rp_id;
      if (rpId === undefined) {
        throw rpIdRefused([...new Set(credentials.map((c) => JSON.stringify(c.rp_id)))].join(", ") || "none", origin);
      }
      let got: Credential | null;
      try {
        got = await container.get({
          publicKey: {
            challenge: buffer(challenge),
            rpId,
            timeout: ASSERTION_TIMEOUT_MS,
            allowCredentials: usable
              .filter((c) => c.rp_id === rpId)
              .map((c) => ({ type: "public-key", id: buffer(c.credential_id) })),
            userVerification: uv,
          },
        });
      } catch (error) {
        throw keyError(error, false, origin);
      }
      const response = (got as PublicKeyCredential | null)?.response as AuthenticatorAssertionResponse | undefined;
      if (!got || !response?.signature) throw new SecurityKeyError("The security key gave no approval.");
      return {
        credential_id: new Uint8Array((got as PublicKeyCredential).rawId),
        authenticator_data: new Uint8Array(response.authenticatorData),
        client_data_json: new Uint8Array(response.clientDataJSON),
        signature: new Uint8Array(response.signature),
      };
    },
  };
}

function userVerification(value: string): UserVerification {
  return value === "required" || value === "discouraged" ? value : "preferred";
}

/** What the account's policy asks of an assertion. */
function uvFor(policy: Policy): UserVerification {
  return policy.require_user_verification ? "required" : "preferred";
}

// -- building, checking and posting a version -----------------------------------------------------------------

/** The changes {@link nextVersion} makes; everything else is kept. */
export interface VersionChanges {
  readonly removeDeviceIds?: readonly string[];
  readonly addCredentials?: readonly WebAuthnCredential[];
  readonly removeCredentialIds?: readonly Uint8Array[];
  readonly policy?: Policy;
}

/**
 * The version after `prev` with `changes` (device_list.py `next_version`): entries sorted (devices by id,
 * names dropped; credentials by id), the account-key epoch advanced when a device or credential is removed,
 * `created_at_ms` not before the previous one, the format kept (at least 2). Throws `invalid_field` for an
 * id the list does not hold. Pure; unsigned and unchecked (evaluateVersion judges it).
 */
export function nextVersion(prev: DeviceList, changes: VersionChanges, nowMs: number): DeviceList {
  const remove = new Set(changes.removeDeviceIds ?? []);
  const removeCredentials = new Set((changes.removeCredentialIds ?? []).map(toHex));
  for (const id of remove) {
    if (!prev.devices.some((d) => d.device_id === id)) throw new TetherlessError("invalid_field", `no device ${id}`);
  }
  for (const id of removeCredentials) {
    if (!prev.credentials.some((c) => toHex(c.credential_id) === id)) {
      throw new TetherlessError("invalid_field", `no security key ${id.slice(0, 16)} in the list`);
    }
  }
  const devices: DeviceEntry[] = prev.devices
    .filter((d) => !remove.has(d.device_id))
    .map((d) => ({ ...d, name: "" }))
    .sort((a, b) => (a.device_id < b.device_id ? -1 : a.device_id > b.device_id ? 1 : 0));
  const credentials = [
    ...prev.credentials.filter((c) => !removeCredentials.has(toHex(c.credential_id))),
    ...(changes.addCredentials ?? []),
  ].sort((a, b) => compare(a.credential_id, b.credential_id));
  const epoch = prev.format === 1 ? 0 : prev.account_key_epoch;
  return {
    account_id: prev.account_id,
    version: prev.version + 1,
    created_at_ms: Math.max(nowMs, prev.created_at_ms),
    devices,
    prev_hash: listHash(prev),
    format: Math.max(prev.format, 2),
    policy: changes.policy ?? prev.policy,
    credentials,
    recovery_key: prev.recovery_key,
    recovery_backup_key_hash: prev.recovery_backup_key_hash,
    account_key_epoch: remove.size || removeCredentials.size ? epoch + 1 : epoch,
  };
}

/**
 * A removal may leave fewer approvers than the threshold (crypto.md §3.6: the list must keep enough): lower it
 * to what is left (devices.py `_fit_threshold`).
 */
function fitThreshold(dl: DeviceList): DeviceList {
  const approvers = dl.devices.filter(mayApprove).length + dl.credentials.length;
  if (dl.policy.threshold <= approvers) return dl;
  return { ...dl, policy: { ...dl.policy, threshold: Math.max(approvers, 1) } };
}

/**
 * The account's chain, verified from the genesis against the stored mark, which it then raises. The mark is
 * read before the fetch and only ever raised: a change this device posts meanwhile (its mark set by
 * {@link postVersion}) is neither taken for a rollback of this older answer nor lowered by it.
 */
export async function verifiedChain(api: RelayApi, store: ClientStore, me: DeviceIdentity): Promise<VerifiedChain> {
  const mark = store.mark(me.accountId) ?? undefined;
  const verified = verifyChain(await api.deviceChain(me.accountId), me.accountId, mark);
  store.transaction(() => {
    const now = store.mark(me.accountId);
    if (!now || now[0] < verified.mark[0]) store.setMark(me.accountId, verified.mark);
  });
  return verified;
}

/**
 * A security key's assertion over `dl` (the version after `verified`'s head), checked before any relay sees it
 * (devices.py `key_assertion`): by a credential of the head, verifying over `list_hash(dl)` for its rp id (UV
 * when the policy requires it), its sign counter above the highest the chain carries. Throws `policy_not_met`
 * (the account has no key), `webauthn_invalid` (another credential, rp id or signature), `webauthn_replayed`
 * (a counter that did not advance: a replay or a cloned key), and {@link SecurityKeyError}.
 */
export async function keyAssertion(
  verified: VerifiedChain,
  dl: DeviceList,
  authenticator: Authenticator,
): Promise<WebAuthnAssertion> {
  const head = verified.head;
  if (!head.credentials.length) {
    throw new TetherlessError("policy_not_met", "your account has no security key: add one first");
  }
  const challenge = listHash(dl);
  const assertion = await authenticator.get(challenge, head.credentials, uvFor(head.policy));
  const credential = head.credentials.find((c) => equal(c.credential_id, assertion.credential_id));
  if (!credential) {
    throw new TetherlessError("webauthn_invalid", "this security key is not one of your account's keys");
  }
  try {
    const result = verifyAssertion(credential, assertion, challenge, head.policy.require_user_verification);
    const id = toHex(credential.credential_id);
    checkCounter(id, verified.counters.get(id), result.signCount);
  } catch (error) {
    if (!(error instanceof TetherlessError)) throw error;
    throw new TetherlessError(error.code, `refused the security key's approval, nothing was sent: ${error.detail}`);
  }
  return assertion;
}

/**
 * The key approvals a change to `dl` carries besides this device's signature: one assertion when
 * `authenticator` is given, none otherwise. Throws `policy_not_met` before anything is asked or sent when
 * the policy of the head requires a key and none is given, or when this device (and the key) cannot reach
 * its threshold alone; and what {@link keyAssertion} throws.
 */
export async function keyApprovals(
  verified: VerifiedChain,
  dl: DeviceList,
  authenticator: Authenticator | null,
): Promise<WebAuthnAssertion[]> {
  const policy = verified.head.policy;
  if (policy.require_webauthn && !authenticator) {
    throw new TetherlessError(
      "policy_not_met",
      "your account requires a security key for every device change: approve with your security key",
    );
  }
  const weight = 1 + (authenticator ? 1 : 0);
  if (weight < policy.threshold) {
    throw new TetherlessError(
      "policy_not_met",
      `your account needs ${policy.threshold} approvals for a device change; this browser gives ${weight}`,
    );
  }
  return authenticator ? [await keyAssertion(verified, dl, authenticator)] : [];
}

/**
 * Check `signed` against the verified head with the rules the relay and every other client run, then post
 * it (`POST /v1/accounts/{id}/devices`, no token: the approvals authorize it) and raise the mark. Throws the
 * rules' codes (nothing is sent then), {@link RelayError} (`device_list_conflict`: another change won; do it
 * again), `TransportError` (the relay may or may not have taken it: the next chain says), and
 * `invalid_device_list` when the relay accepted another version than ours.
 */
export async function postVersion(
  api: RelayApi,
  store: ClientStore,
  verified: VerifiedChain,
  signed: SignedDeviceList,
): Promise<void> {
  const dl = signed.device_list;
  try {
    evaluateVersion(verified.head, signed, verified.removedIds);
  } catch (error) {
    if (!(error instanceof TetherlessError)) throw error;
    throw new TetherlessError(error.code, `not sent: ${error.detail}`);
  }
  const accepted = await api.call("POST", `/v1/accounts/${dl.account_id}/devices`, {
    request: { def: PostDeviceListRequestDef, value: { signed } },
    response: DeviceListAcceptedDef,
  });
  if (accepted.version !== dl.version || !equal(accepted.list_hash, listHash(dl))) {
    throw new TetherlessError("invalid_device_list", "the relay accepted another version than the one posted");
  }
  store.transaction(() => store.setMark(dl.account_id, [dl.version, accepted.list_hash]));
  await store.durable();
}

/** Whether the relay's credential is exactly the one the key made (every field of the list entry). */
function sameCredential(a: WebAuthnCredential, b: WebAuthnCredential): boolean {
  return (
    equal(a.credential_id, b.credential_id) &&
    equal(a.public_key, b.public_key) &&
    a.rp_id === b.rp_id &&
    a.added_at_ms === b.added_at_ms
  );
}

/**
 * Register a security key for the account and add it to the device list (devices.py `add_credential`):
 * `register/begin` (token), the key makes a credential, `register/complete` (token) — whose answer must be
 * the credential read from the key's own response (id, COSE key, rp id: a relay that swaps in a key of its
 * own would otherwise become an approver of the account) — then the version adding it, approved by this
 * device (and by a key already listed when the policy requires one), with the new key's proof of possession
 * (an assertion over the version's `list_hash`, crypto.md §3.2 step 4). `requireKey`: the same version sets
 * the policy "a security key must co-sign every change" (crypto.md §3.2).
 *
 * `api` must be logged in. Throws {@link SecurityKeyError}, `webauthn_invalid`, `policy_not_met`, the
 * relay's challenge errors and those of {@link postVersion}. Not idempotent: each call makes a new
 * credential (a failed call leaves at most a pending registration on the relay, which expires).
 */
export async function addSecurityKey(
  api: RelayApi,
  store: ClientStore,
  me: DeviceIdentity,
  authenticator: Authenticator,
  opts: { requireKey?: boolean; deps?: ClientDeps } = {},
): Promise<WebAuthnCredential> {
  const deps = opts.deps ?? platformDeps;
  const options = await api.call("POST", "/v1/webauthn/register/begin", {
    response: WebAuthnRegistrationOptionsDef,
    auth: true,
  });
  const registration = await authenticator.create(options);
  const credential = await api.call("POST", "/v1/webauthn/register/complete", {
    request: { def: WebAuthnRegistrationDef, value: registration },
    response: WebAuthnCredentialDef,
    auth: true,
  });
  const created = readRegistration(registration, options.challenge, options.rp_id, credential.added_at_ms).credential;
  if (!sameCredential(created, credential)) {
    throw new TetherlessError(
      "webauthn_invalid",
      "the relay answered with another credential than the security key created: the key was not added",
    );
  }
  const verified = await verifiedChain(api, store, me);
  const head = verified.head;
  const policy =
    opts.requireKey && !head.policy.require_webauthn ? { ...head.policy, require_webauthn: true } : undefined;
  const dl = nextVersion(head, { addCredentials: [credential], ...(policy ? { policy } : {}) }, deps.now());
  const approvals = head.policy.require_webauthn ? await keyApprovals(verified, dl, authenticator) : [];
  const proof = await authenticator.get(listHash(dl), [credential], uvFor(head.policy));
  const signed: SignedDeviceList = {
    device_list: dl,
    signatures: [approve(dl, me.signSeed)],
    recovery_signatures: [],
    webauthn_assertions: [...approvals, proof],
  };
  await postVersion(api, store, verified, signed);
  return credential;
}

/**
 * Remove `deviceId` (not this device) from the account's list (crypto.md §4), approved by this device and,
 * with `authenticator`, by a security key (required when the policy says so). The account-key epoch
 * advances; the new epoch's key record is written by the account's devices that rotate (account-log.md
 * §5.3). Throws `invalid_field` (no such device, or this device), `invalid_device_list` (the last device),
 * what {@link keyApprovals} and {@link postVersion} throw. Not idempotent (a retry after success finds no
 * such device).
 */
export async function revokeDevice(
  api: RelayApi,
  store: ClientStore,
  me: DeviceIdentity,
  deviceId: string,
  authenticator: Authenticator | null,
  deps: ClientDeps = platformDeps,
): Promise<DeviceList> {
  if (deviceId === me.deviceId) {
    throw new TetherlessError(
      "invalid_field",
      "this browser does not revoke itself: use Sign out, then revoke it elsewhere",
    );
  }
  const verified = await verifiedChain(api, store, me);
  const head = verified.head;
  if (!head.devices.some((d) => d.device_id === deviceId)) {
    throw new TetherlessError("invalid_field", `no device ${deviceId} in your account's device list`);
  }
  if (head.devices.length === 1 && !head.credentials.length) {
    throw new TetherlessError("invalid_device_list", "the account's only device cannot be revoked");
  }
  const dl = fitThreshold(nextVersion(head, { removeDeviceIds: [deviceId] }, deps.now()));
  const signed: SignedDeviceList = {
    device_list: dl,
    signatures: [approve(dl, me.signSeed)],
    recovery_signatures: [],
    webauthn_assertions: await keyApprovals(verified, dl, authenticator),
  };
  await postVersion(api, store, verified, signed);
  return dl;
}
