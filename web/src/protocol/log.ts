/**
 * The account log v2 as a reader and writer of the browser client (docs/account-log.md §4.2, §4.4, §4.6,
 * §5.5; docs/crypto.md §12.1; protocol/log.py): record associated data, signed records (sealed and opened),
 * v2 key records (built, verified against the verified device list, and this device's grant unwrapped).
 * Also snapshot parts and state (§6.1: sealed, opened, joined; the signed manifest) and which key record a
 * device writes next (§5.3–§5.6: {@link nextKeyRecord}). Legacy v1 key records and unsigned v1 records are not
 * read here (a format-1 account's history). Pure: nonces, keys, wrap randomness and the clock are passed in.
 */
import { xchacha20poly1305 } from "@noble/ciphers/chacha.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat, equal } from "./bytes.js";
import { type StructDef, bool, bytes, decode, encode, int, list, literal, map, str, struct, union } from "./codec.js";
import { receivesAccountKeyGrants } from "./deviceList.js";
import { TetherlessError } from "./errors.js";
import { type WrapInput, openWrap, seal as hybridSeal } from "./hybrid.js";
import type { DeviceEntry } from "./messages.js";
import { pad, unpad } from "./padding.js";
import { type Field, digest, layout, sign, verify } from "./signing.js";

export const KEY_BYTES = 32;
export const NONCE_BYTES = 24;
export const TAG_BYTES = 16;
export const RECORD_ID_BYTES = 16;
export const KEY_RECORD_V2 = 2;
/** A v2 key record with close-out marks (account-log.md §5.1 v3). */
export const KEY_RECORD_V3 = 3;

export type Kind = "event" | "state" | "key" | "snapshot_part" | "snapshot";

/** A record that must not be trusted: `malformed_body` (does not open or decode) or `bad_signature`. */
export class InvalidRecordError extends TetherlessError {
  constructor(code: "malformed_body" | "bad_signature", detail: string) {
    super(code, detail);
    this.name = "InvalidRecordError";
  }
}

// -- plaintexts (inside the ciphertext) -------------------------------------------------------------------

const MILLIS = int(0);
const noBytesList = () => [];

export interface MessageSent {
  type: "message-sent";
  message_uid: Uint8Array;
  sender: string;
  recipients: string[];
  pair_seq: number;
  sent_at_ms: number;
  content_type: string;
  body: Uint8Array;
  envelope_ids: Uint8Array[];
  relay_sent_at_ms: number;
}
export const MessageSentDef: StructDef<MessageSent> = {
  name: "MessageSent",
  tag: "message-sent",
  fields: [
    { name: "message_uid", type: bytes() },
    { name: "sender", type: str() },
    { name: "recipients", type: list(str()) },
    { name: "pair_seq", type: int() },
    { name: "sent_at_ms", type: MILLIS },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
    { name: "envelope_ids", type: list(bytes()), default: noBytesList },
    { name: "relay_sent_at_ms", type: MILLIS, default: () => 0 },
  ],
};

export interface MessageReceived {
  type: "message-received";
  message_uid: Uint8Array;
  sender: string;
  sender_sign_key: Uint8Array;
  recipient: string;
  pair_seq: number;
  sent_at_ms: number;
  relay_sent_at_ms: number;
  content_type: string;
  body: Uint8Array;
  late: boolean;
}
export const MessageReceivedDef: StructDef<MessageReceived> = {
  name: "MessageReceived",
  tag: "message-received",
  fields: [
    { name: "message_uid", type: bytes() },
    { name: "sender", type: str() },
    { name: "sender_sign_key", type: bytes() },
    { name: "recipient", type: str() },
    { name: "pair_seq", type: int() },
    { name: "sent_at_ms", type: MILLIS },
    { name: "relay_sent_at_ms", type: MILLIS },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
    { name: "late", type: bool, default: () => false },
  ],
};

export interface DeviceState {
  type: "device-state";
  registers: Map<string, Uint8Array>;
}
export const DeviceStateDef: StructDef<DeviceState> = {
  name: "DeviceState",
  tag: "device-state",
  fields: [{ name: "registers", type: map(bytes()), default: () => new Map() }],
};

export type LogBody = MessageSent | MessageReceived | DeviceState;

/** What an `event`/`state` record encrypts (§4.5). */
export interface LogPlaintext {
  writer_device: string;
  writer_seq: number;
  created_at_ms: number;
  body: LogBody;
}
export const LogPlaintextDef: StructDef<LogPlaintext> = {
  name: "LogPlaintext",
  fields: [
    { name: "writer_device", type: str() },
    { name: "writer_seq", type: int() },
    { name: "created_at_ms", type: MILLIS },
    {
      name: "body",
      type: union(
        MessageSentDef as StructDef<object>,
        MessageReceivedDef as StructDef<object>,
        DeviceStateDef as StructDef<object>,
      ),
    },
  ],
};

/** What a v2 record's AEAD encrypts: the writer, its signature and the inner plaintext's bytes (§4.6). */
export interface SignedRecordPayload {
  writer_device: string;
  signature: Uint8Array;
  payload: Uint8Array;
}
export const SignedRecordPayloadDef: StructDef<SignedRecordPayload> = {
  name: "SignedRecordPayload",
  fields: [
    { name: "writer_device", type: str() },
    { name: "signature", type: bytes() },
    { name: "payload", type: bytes() },
  ],
};

// -- key records v2 ----------------------------------------------------------------------------------------

export interface EpochKey {
  epoch: number;
  key: Uint8Array;
}
const EpochKeyDef: StructDef<EpochKey> = {
  name: "EpochKey",
  fields: [
    { name: "epoch", type: int(1) },
    { name: "key", type: bytes(32, 32) },
  ],
};
interface GrantPayload {
  keys: EpochKey[];
}
const GrantPayloadDef: StructDef<GrantPayload> = {
  name: "GrantPayload",
  fields: [{ name: "keys", type: list(struct(EpochKeyDef)) }],
};

/** One device's grant: a hybrid wrap of a grant payload, or empty for a device without a `kem_key`. */
export interface HybridGrant {
  device_id: string;
  wrapped: Uint8Array;
}
const HybridGrantDef: StructDef<HybridGrant> = {
  name: "HybridGrant",
  fields: [
    { name: "device_id", type: str() },
    { name: "wrapped", type: bytes() },
  ],
};
export interface EpochCommitment {
  epoch: number;
  commitment: Uint8Array;
}
const EpochCommitmentDef: StructDef<EpochCommitment> = {
  name: "EpochCommitment",
  fields: [
    { name: "epoch", type: int(1) },
    { name: "commitment", type: bytes(32, 32) },
  ],
};
export interface KeyEpochBodyV2 {
  account_id: string;
  epoch: number;
  device_list_version: number;
  creator_device: string;
  created_at_ms: number;
  rotation: boolean;
  grants: HybridGrant[];
  commitments: EpochCommitment[];
}
const KeyEpochBodyV2Def: StructDef<KeyEpochBodyV2> = {
  name: "KeyEpochBodyV2",
  fields: [
    { name: "account_id", type: str() },
    { name: "epoch", type: int(1) },
    { name: "device_list_version", type: int(1) },
    { name: "creator_device", type: str() },
    { name: "created_at_ms", type: int() },
    { name: "rotation", type: bool },
    { name: "grants", type: list(struct(HybridGrantDef)) },
    { name: "commitments", type: list(struct(EpochCommitmentDef)) },
  ],
};
/** A removed writer's close-out mark (§5.1 v3): the highest `writer_seq` of its records before the rotation. */
export interface WriterMark {
  device_id: string;
  last_seq: number;
}
const WriterMarkDef: StructDef<WriterMark> = {
  name: "WriterMark",
  fields: [
    { name: "device_id", type: str() },
    { name: "last_seq", type: int(0) },
  ],
};
/**
 * A v2 key record, or a v3 one (§5.1 v3): the same body plus `closed`, the rotation's close-out marks of the
 * writers it removes, signed under the v3 domain. `omit_defaults`: a v2 record (no marks) encodes exactly as
 * before, without `closed`.
 */
export interface KeyEpochRecordV2 {
  v: number;
  body: KeyEpochBodyV2;
  signature: Uint8Array;
  closed: WriterMark[];
}
export const KeyEpochRecordV2Def: StructDef<KeyEpochRecordV2> = {
  name: "KeyEpochRecordV2",
  omitDefaults: true,
  fields: [
    { name: "v", type: literal(KEY_RECORD_V2, KEY_RECORD_V3) },
    { name: "body", type: struct(KeyEpochBodyV2Def) },
    { name: "signature", type: bytes() },
    { name: "closed", type: list(struct(WriterMarkDef)), default: () => [] },
  ],
};

// -- ids and associated data ----------------------------------------------------------------------------

/** `SHA-256(layout("log-record-id", account_id, "message", sender, message_uid))[:16]` (§4.4). */
export function messageRecordId(accountId: string, senderDeviceAddress: string, messageUid: Uint8Array): Uint8Array {
  return digest("log-record-id", accountId, "message", senderDeviceAddress, messageUid).slice(0, RECORD_ID_BYTES);
}

/** `SHA-256(layout("log-key-commit", account_id, epoch, K))` (§5.1). */
export function keyCommitment(accountId: string, epoch: number, key: Uint8Array): Uint8Array {
  return digest("log-key-commit", accountId, epoch, key);
}

/** A record's associated data under `domain` (`log-record` v1, §4.2; `log-record/2` v2, §4.6). */
export function recordAd(
  accountId: string,
  recordId: Uint8Array,
  epoch: number,
  kind: Kind,
  opts: { snapshotId?: Uint8Array; covers?: number; parts?: number; domain?: "log-record" | "log-record/2" } = {},
): Uint8Array {
  return layout(
    opts.domain ?? "log-record",
    accountId,
    recordId,
    epoch,
    kind,
    opts.snapshotId ?? new Uint8Array(0),
    opts.covers ?? 0,
    opts.parts ?? 0,
  );
}

/** The associated data of a signed (v2) record: its own domain, so a v1 ciphertext never opens as v2. */
export function recordV2Ad(accountId: string, recordId: Uint8Array, epoch: number, kind: Kind): Uint8Array {
  return recordAd(accountId, recordId, epoch, kind, { domain: "log-record/2" });
}

/** What a writer signs: every header field the relay sees (through the v2 AD), itself and the payload digest. */
export function recordSignatureLayout(ad: Uint8Array, writerDevice: string, payload: Uint8Array): Uint8Array {
  return layout("log-record-sig/2", ad, writerDevice, sha256(payload));
}

// -- signed records (§4.6) ----------------------------------------------------------------------------------

export interface RecordHeader {
  readonly accountId: string;
  readonly recordId: Uint8Array;
  readonly epoch: number;
  readonly kind?: Kind;
}

/**
 * A v2 record: `plaintext` signed by its writer (`writerSeed`, the device `plaintext.writer_device`), then
 * sealed under `K[epoch]` with the 24 fresh random bytes `nonce`. Pure; throws `RangeError` for wrong lengths.
 */
export function sealSignedRecord(
  key: Uint8Array,
  plaintext: LogPlaintext,
  writerSeed: Uint8Array,
  header: RecordHeader,
  nonce: Uint8Array,
): Uint8Array {
  if (header.recordId.length !== RECORD_ID_BYTES) throw new RangeError("record id 16 bytes");
  const ad = recordV2Ad(header.accountId, header.recordId, header.epoch, header.kind ?? "event");
  return sealSigned(key, encode(LogPlaintextDef, plaintext), plaintext.writer_device, writerSeed, ad, nonce);
}

/** §4.6: `payload` signed by `writerDevice` over the v2 `ad`, then sealed under `key`. */
function sealSigned(
  key: Uint8Array,
  payload: Uint8Array,
  writerDevice: string,
  writerSeed: Uint8Array,
  ad: Uint8Array,
  nonce: Uint8Array,
): Uint8Array {
  if (key.length !== KEY_BYTES || nonce.length !== NONCE_BYTES) throw new RangeError("key 32 and nonce 24 bytes");
  const signature = sign(writerSeed, recordSignatureLayout(ad, writerDevice, payload));
  const signed = encode(SignedRecordPayloadDef, { writer_device: writerDevice, signature, payload });
  return concat(nonce, xchacha20poly1305(key, nonce, ad).encrypt(pad(signed)));
}

/** Inverse of {@link sealSigned}: `[writer, the payload it signed]`; `what` names the record in errors. */
function openSigned(
  key: Uint8Array,
  ciphertext: Uint8Array,
  writers: ReadonlyMap<string, Uint8Array>,
  ad: Uint8Array,
  what: string,
): [string, Uint8Array] {
  if (ciphertext.length < NONCE_BYTES + TAG_BYTES)
    throw new InvalidRecordError("malformed_body", `${what} is truncated`);
  let signed: SignedRecordPayload;
  try {
    const padded = xchacha20poly1305(key, ciphertext.subarray(0, NONCE_BYTES), ad).decrypt(
      ciphertext.subarray(NONCE_BYTES),
    );
    signed = decode(SignedRecordPayloadDef, unpad(padded));
  } catch (error) {
    const detail = error instanceof TetherlessError ? `${what}: ${error.detail}` : `${what} does not decrypt`;
    throw new InvalidRecordError("malformed_body", detail);
  }
  const signKey = writers.get(signed.writer_device);
  if (!signKey) throw new InvalidRecordError("bad_signature", `${what} writer does not hold this epoch`);
  try {
    verify(signKey, recordSignatureLayout(ad, signed.writer_device, signed.payload), signed.signature);
  } catch {
    throw new InvalidRecordError("bad_signature", `${what} signature does not verify`);
  }
  return [signed.writer_device, signed.payload];
}

/**
 * Inverse of {@link sealSignedRecord}. `writers`: device id → Ed25519 key of every device allowed to write
 * under `epoch` (the devices its key records granted, as the verified list names them). Throws
 * {@link InvalidRecordError}: `malformed_body` when it does not open or decode, `bad_signature` when the
 * writer is not allowed, the signature does not verify or the inner writer differs.
 */
export function openSignedRecord(
  key: Uint8Array,
  ciphertext: Uint8Array,
  writers: ReadonlyMap<string, Uint8Array>,
  header: RecordHeader,
): LogPlaintext {
  const ad = recordV2Ad(header.accountId, header.recordId, header.epoch, header.kind ?? "event");
  const [writer, payload] = openSigned(key, ciphertext, writers, ad, "log record");
  let plaintext: LogPlaintext;
  try {
    plaintext = decode(LogPlaintextDef, payload);
  } catch (error) {
    throw new InvalidRecordError(
      "malformed_body",
      `log record plaintext: ${error instanceof TetherlessError ? error.detail : "does not decode"}`,
    );
  }
  if (plaintext.writer_device !== writer) {
    throw new InvalidRecordError("bad_signature", "log record names another writer than its signer");
  }
  return plaintext;
}

// -- key records v2 (§5.5) ----------------------------------------------------------------------------------

/**
 * The bytes a key record's creator signs: every body field, grants and commitments counted, under
 * `log-key-epoch/2`; with `closed` (a v3 record, even an empty list) the marks appended, counted, under
 * `log-key-epoch/3`, so a v3 signature never verifies as v2 and back.
 */
export function keyEpochV2Layout(body: KeyEpochBodyV2, closed?: readonly WriterMark[]): Uint8Array {
  const fields: Field[] = [
    body.account_id,
    body.epoch,
    body.device_list_version,
    body.creator_device,
    body.created_at_ms,
    body.rotation ? 1 : 0,
    body.grants.length,
  ];
  for (const g of body.grants) fields.push(g.device_id, g.wrapped);
  fields.push(body.commitments.length);
  for (const c of body.commitments) fields.push(c.epoch, c.commitment);
  if (closed === undefined) return layout("log-key-epoch/2", ...fields);
  fields.push(closed.length);
  for (const m of closed) fields.push(m.device_id, m.last_seq);
  return layout("log-key-epoch/3", ...fields);
}

/** The layout `record`'s signature covers: v3 over its marks, v2 without. */
function signedLayout(record: KeyEpochRecordV2): Uint8Array {
  return keyEpochV2Layout(record.body, record.v === KEY_RECORD_V3 ? record.closed : undefined);
}

/** The hybrid wrap's context for one grant: the relay cannot move a wrap to another record, epoch or device. */
export function grantContext(
  accountId: string,
  epoch: number,
  deviceListVersion: number,
  creatorDevice: string,
  deviceId: string,
): Uint8Array {
  return layout("log-key-grant/2", accountId, epoch, deviceListVersion, creatorDevice, deviceId);
}

/**
 * The ciphertext of a v2 key record granting every key in `keys` (which holds `epoch`, and no later one) to
 * `devices`, signed by `creatorSeed`. `wraps`: one fresh {@link WrapInput} per device with a `kem_key`, in
 * order (`hybrid.encapsulateFor`); a device without one gets an empty grant. Pure and deterministic; throws `RangeError` on inconsistent inputs.
 */
export function makeKeyRecordV2(p: {
  creatorSeed: Uint8Array;
  accountId: string;
  creatorDevice: string;
  epoch: number;
  keys: ReadonlyMap<number, Uint8Array>;
  rotation: boolean;
  deviceListVersion: number;
  devices: readonly DeviceEntry[];
  createdAtMs: number;
  wraps: readonly WrapInput[];
  /** Device id → last `writer_seq` of each writer this rotation removes (§5.1 v3): a v3 record when not empty. */
  closed?: ReadonlyMap<string, number>;
}): Uint8Array {
  const epochs = [...p.keys.keys()].sort((a, b) => a - b);
  if (
    !p.keys.has(p.epoch) ||
    epochs.some((e) => e > p.epoch) ||
    [...p.keys.values()].some((k) => k.length !== KEY_BYTES)
  ) {
    throw new RangeError("keys must hold the record's epoch and no later one, 32 bytes each");
  }
  const payload = encode(GrantPayloadDef, { keys: epochs.map((epoch) => ({ epoch, key: p.keys.get(epoch)! })) });
  const withKem = p.devices.filter((d) => d.kem_key.length);
  if (withKem.length !== p.wraps.length) throw new RangeError("one wrap input per device with a kem_key");
  let next = 0;
  const grants = p.devices.map((d) => {
    if (!d.kem_key.length) return { device_id: d.device_id, wrapped: new Uint8Array(0) };
    const context = grantContext(p.accountId, p.epoch, p.deviceListVersion, p.creatorDevice, d.device_id);
    const wrapped = hybridSeal({ x25519Public: d.box_key, kemPublic: d.kem_key }, payload, context, p.wraps[next++]!);
    return { device_id: d.device_id, wrapped };
  });
  const body: KeyEpochBodyV2 = {
    account_id: p.accountId,
    epoch: p.epoch,
    device_list_version: p.deviceListVersion,
    creator_device: p.creatorDevice,
    created_at_ms: p.createdAtMs,
    rotation: p.rotation,
    grants,
    commitments: epochs.map((epoch) => ({ epoch, commitment: keyCommitment(p.accountId, epoch, p.keys.get(epoch)!) })),
  };
  if (p.closed?.size && !p.rotation) throw new RangeError("only a rotation closes writers");
  if (p.closed?.size) {
    const closed = [...p.closed.keys()]
      .sort(compareStrings)
      .map((id) => ({ device_id: id, last_seq: p.closed!.get(id)! }));
    const signature = sign(p.creatorSeed, keyEpochV2Layout(body, closed));
    return pad(encode(KeyEpochRecordV2Def, { v: KEY_RECORD_V3, body, signature, closed }));
  }
  const signature = sign(p.creatorSeed, keyEpochV2Layout(body));
  return pad(encode(KeyEpochRecordV2Def, { v: KEY_RECORD_V2, body, signature, closed: [] }));
}

/** Code-point order, as Python's `sorted` orders str (JavaScript's default sort compares UTF-16 units). */
function compareStrings(a: string, b: string): number {
  const x = [...a].map((c) => c.codePointAt(0)!);
  const y = [...b].map((c) => c.codePointAt(0)!);
  for (let i = 0; i < Math.min(x.length, y.length); i++) if (x[i] !== y[i]) return x[i]! - y[i]!;
  return x.length - y.length;
}

/**
 * Decode a v2 or v3 key record's ciphertext (padded MessagePack). Throws {@link InvalidRecordError}
 * (`malformed_body`) for anything else, including a legacy v1 key record (not read by this client) and a
 * recovery backup ({@link decodeRecoveryBackup} tells those apart).
 */
export function decodeKeyRecordV2(ciphertext: Uint8Array): KeyEpochRecordV2 {
  try {
    return decode(KeyEpochRecordV2Def, unpad(ciphertext));
  } catch (error) {
    throw new InvalidRecordError(
      "malformed_body",
      `key record: ${error instanceof TetherlessError ? error.detail : "does not decode"}`,
    );
  }
}

/**
 * Check a v2 key record against the verified devices of its `device_list_version` (§5.5 "Readers"): the
 * creator is a grant-receiving device of the list and signed it; grants name distinct grant-receiving
 * devices; a device with a `kem_key` has a wrap and one without none; a rotation grants exactly the list's
 * grant-receiving devices; the commitments name `epoch` (the highest) and earlier epochs once each. A v3
 * record (signed over its `closed` marks) is a rotation that closes only writers it does not grant, once
 * each; a v2 one closes none (§5.1 v3). Throws {@link InvalidRecordError} (`bad_signature`). Pure; idempotent.
 */
export function verifyKeyRecordV2(
  record: KeyEpochRecordV2,
  accountId: string,
  epoch: number,
  devices: readonly DeviceEntry[],
): void {
  const body = record.body;
  const refuse = (why: string) => new InvalidRecordError("bad_signature", why);
  if (body.account_id !== accountId || body.epoch !== epoch) throw refuse("key record for another account or epoch");
  const receiving = new Map(devices.filter(receivesAccountKeyGrants).map((d) => [d.device_id, d]));
  const creator = receiving.get(body.creator_device);
  if (!creator) throw refuse("key record creator is not a key-holding device of the list");
  try {
    verify(creator.sign_key, signedLayout(record), record.signature);
  } catch {
    throw refuse("key record signature does not verify");
  }
  const granted = body.grants.map((g) => g.device_id);
  const closed = record.closed.map((m) => m.device_id);
  if (closed.length && (record.v !== KEY_RECORD_V3 || !body.rotation))
    throw refuse("only a v3 rotation closes writers");
  if (new Set(closed).size !== closed.length || closed.some((id) => granted.includes(id))) {
    throw refuse("key record closes a writer twice or one it grants");
  }
  if (new Set(granted).size !== granted.length || granted.some((id) => !receiving.has(id))) {
    throw refuse("key record grants a device outside the list");
  }
  if (body.rotation && granted.length !== receiving.size) {
    throw refuse("key record does not grant exactly the list's devices");
  }
  if (body.grants.some((g) => g.wrapped.length > 0 !== receiving.get(g.device_id)!.kem_key.length > 0)) {
    throw refuse("key record grant does not match the device's keys");
  }
  const epochs = body.commitments.map((c) => c.epoch);
  if (!epochs.includes(epoch) || new Set(epochs).size !== epochs.length || Math.max(...epochs) !== epoch) {
    throw refuse("key record commitments do not match its epoch");
  }
}

/**
 * This device's epoch keys from a *verified* v2 key record, each checked against the record's commitment;
 * `null` when the record grants nothing to this device or grants it through a session (empty wrap). Throws
 * {@link InvalidRecordError}: `malformed_body` when the wrap does not open (a tampered or swapped share),
 * `bad_signature` when a key does not match its commitment or an epoch is missing.
 */
export function unwrapGrantV2(
  record: KeyEpochRecordV2,
  deviceId: string,
  boxPrivateKey: Uint8Array,
  kemSeed: Uint8Array,
): Map<number, Uint8Array> | null {
  const body = record.body;
  const grant = body.grants.find((g) => g.device_id === deviceId);
  if (!grant || !grant.wrapped.length || !kemSeed.length) return null;
  const context = grantContext(body.account_id, body.epoch, body.device_list_version, body.creator_device, deviceId);
  let payload: GrantPayload;
  try {
    payload = decode(GrantPayloadDef, openWrap(boxPrivateKey, kemSeed, grant.wrapped, context));
  } catch {
    throw new InvalidRecordError("malformed_body", "key grant does not open");
  }
  const commitments = new Map(body.commitments.map((c) => [c.epoch, c.commitment]));
  const keys = new Map<number, Uint8Array>();
  for (const item of payload.keys) {
    const expected = commitments.get(item.epoch);
    if (!expected || !equal(expected, keyCommitment(body.account_id, item.epoch, item.key))) {
      throw new InvalidRecordError("bad_signature", "key grant does not match the key commitment");
    }
    keys.set(item.epoch, item.key);
  }
  if (keys.size !== commitments.size)
    throw new InvalidRecordError("bad_signature", "key grant does not carry every committed epoch");
  return keys;
}

// -- signed snapshot manifests (§6.1) -----------------------------------------------------------------------

/** The plaintext of a `snapshot` manifest: SHA-256 of every part's `data`, in order (§4.5, §6.1). */
export interface SnapshotManifest {
  writer_device: string;
  created_at_ms: number;
  covers: number;
  part_hashes: Uint8Array[];
}
export const SnapshotManifestDef: StructDef<SnapshotManifest> = {
  name: "SnapshotManifest",
  fields: [
    { name: "writer_device", type: str() },
    { name: "created_at_ms", type: MILLIS },
    { name: "covers", type: int() },
    { name: "part_hashes", type: list(bytes()) },
  ],
};

/** Deterministic per (writer, covers): a retried write after a crash reuses every record id (L3). */
export function snapshotId(accountId: string, writerDevice: string, covers: number): Uint8Array {
  return digest("log-snapshot-id", accountId, writerDevice, covers).slice(0, RECORD_ID_BYTES);
}
export function snapshotPartId(snapshot: Uint8Array, index: number): Uint8Array {
  return digest("log-snapshot-part-id", snapshot, index).slice(0, RECORD_ID_BYTES);
}
export function snapshotManifestId(snapshot: Uint8Array): Uint8Array {
  return digest("log-snapshot-manifest-id", snapshot).slice(0, RECORD_ID_BYTES);
}

function manifestAd(accountId: string, snapshot: Uint8Array, epoch: number, covers: number, parts: number): Uint8Array {
  return recordAd(accountId, snapshotManifestId(snapshot), epoch, "snapshot", {
    snapshotId: snapshot,
    covers,
    parts,
    domain: "log-record/2",
  });
}

/**
 * A signed `snapshot` manifest ciphertext (every manifest under a v2 epoch, §6.1 "signed snapshots"):
 * signed by `manifest.writer_device` like an event record (§4.6), `covers` and the part count bound into the
 * AD. Pure; throws `RangeError` for wrong lengths.
 */
export function sealSnapshotManifest(
  key: Uint8Array,
  manifest: SnapshotManifest,
  writerSeed: Uint8Array,
  p: { accountId: string; snapshot: Uint8Array; epoch: number; nonce: Uint8Array },
): Uint8Array {
  const ad = manifestAd(p.accountId, p.snapshot, p.epoch, manifest.covers, manifest.part_hashes.length);
  return sealSigned(key, encode(SnapshotManifestDef, manifest), manifest.writer_device, writerSeed, ad, p.nonce);
}

/**
 * Inverse of {@link sealSnapshotManifest}: only a signed manifest opens (an unsigned legacy one does not open
 * under the v2 AD), signed by one of `writers`, naming its signer, agreeing with its header. Throws
 * {@link InvalidRecordError} (`malformed_body`, `bad_signature`). Pure.
 */
export function openSnapshotManifest(
  key: Uint8Array,
  ciphertext: Uint8Array,
  writers: ReadonlyMap<string, Uint8Array>,
  p: { accountId: string; snapshot: Uint8Array; epoch: number; covers: number; parts: number },
): SnapshotManifest {
  const ad = manifestAd(p.accountId, p.snapshot, p.epoch, p.covers, p.parts);
  const [signer, payload] = openSigned(key, ciphertext, writers, ad, "snapshot manifest");
  let manifest: SnapshotManifest;
  try {
    manifest = decode(SnapshotManifestDef, payload);
  } catch (error) {
    const detail = error instanceof TetherlessError ? error.detail : "does not decode";
    throw new InvalidRecordError("malformed_body", `snapshot manifest: ${detail}`);
  }
  if (manifest.covers !== p.covers || manifest.part_hashes.length !== p.parts) {
    throw new InvalidRecordError("malformed_body", "snapshot manifest disagrees with its header");
  }
  if (manifest.writer_device !== signer) {
    throw new InvalidRecordError("bad_signature", "snapshot manifest names another writer than its signer");
  }
  return manifest;
}

// -- snapshot parts and state (§6.1; protocol/log.py `SnapshotState` …) --------------------------------------

/** One message of the history a snapshot carries, with its original log position and record id. */
export interface SnapshotMessage {
  position: number;
  record_id: Uint8Array;
  message_uid: Uint8Array;
  sender: string;
  direction: string;
  recipients: string[];
  pair_seq: number;
  sent_at_ms: number;
  relay_sent_at_ms: number;
  content_type: string;
  body: Uint8Array;
  late: boolean;
}
const SnapshotMessageDef: StructDef<SnapshotMessage> = {
  name: "SnapshotMessage",
  fields: [
    { name: "position", type: int() },
    { name: "record_id", type: bytes() },
    { name: "message_uid", type: bytes() },
    { name: "sender", type: str() },
    { name: "direction", type: str({ oneOf: ["sent", "received"] }) },
    { name: "recipients", type: list(str()) },
    { name: "pair_seq", type: int() },
    { name: "sent_at_ms", type: MILLIS },
    { name: "relay_sent_at_ms", type: MILLIS },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
    { name: "late", type: bool, default: () => false },
  ],
};
/** Log positions `(after, upto]` removed by retention that no snapshot covered (§6.3). */
export interface SnapshotGap {
  after: number;
  upto: number;
}
const SnapshotGapDef: StructDef<SnapshotGap> = {
  name: "SnapshotGap",
  fields: [
    { name: "after", type: int() },
    { name: "upto", type: int() },
  ],
};
/** A copy of a `key` record at a position `<= covers`: a reader starting from the snapshot verifies it as the original. */
export interface SnapshotKeyRecord {
  position: number;
  record_id: Uint8Array;
  epoch: number;
  device_list_version: number;
  committed_at_ms: number;
  ciphertext: Uint8Array;
}
const SnapshotKeyRecordDef: StructDef<SnapshotKeyRecord> = {
  name: "SnapshotKeyRecord",
  fields: [
    { name: "position", type: int() },
    { name: "record_id", type: bytes() },
    { name: "epoch", type: int() },
    { name: "device_list_version", type: int() },
    { name: "committed_at_ms", type: MILLIS },
    { name: "ciphertext", type: bytes() },
  ],
};
/** The history after applying every record `<= covers` (§6.1), split over the parts. */
export interface SnapshotState {
  covers: number;
  messages: SnapshotMessage[];
  gaps: SnapshotGap[];
  key_records: SnapshotKeyRecord[];
}
export const SnapshotStateDef: StructDef<SnapshotState> = {
  name: "SnapshotState",
  fields: [
    { name: "covers", type: int() },
    { name: "messages", type: list(struct(SnapshotMessageDef)) },
    { name: "gaps", type: list(struct(SnapshotGapDef)), default: () => [] },
    { name: "key_records", type: list(struct(SnapshotKeyRecordDef)), default: () => [] },
  ],
};
/** The plaintext of one `snapshot_part`: chunk `index` of `total`; `covers` and `total` are inside the AEAD. */
export interface SnapshotPart {
  index: number;
  total: number;
  covers: number;
  data: Uint8Array;
}
export const SnapshotPartDef: StructDef<SnapshotPart> = {
  name: "SnapshotPart",
  fields: [
    { name: "index", type: int() },
    { name: "total", type: int() },
    { name: "covers", type: int() },
    { name: "data", type: bytes() },
  ],
};

/** A `snapshot_part` ciphertext: the §4.2 (unsigned) layout with `pad(msgpack(SnapshotPart))`. Pure. */
export function sealSnapshotPart(
  key: Uint8Array,
  part: SnapshotPart,
  p: { accountId: string; snapshot: Uint8Array; epoch: number; nonce: Uint8Array },
): Uint8Array {
  if (key.length !== KEY_BYTES || p.nonce.length !== NONCE_BYTES) throw new RangeError("key 32 and nonce 24 bytes");
  const ad = recordAd(p.accountId, snapshotPartId(p.snapshot, part.index), p.epoch, "snapshot_part", {
    snapshotId: p.snapshot,
  });
  return concat(p.nonce, xchacha20poly1305(key, p.nonce, ad).encrypt(pad(encode(SnapshotPartDef, part))));
}

/**
 * Inverse of {@link sealSnapshotPart}; also checks that `recordId` is the part's own id (the relay cannot
 * swap parts of two snapshots or move one). Throws {@link InvalidRecordError} (`malformed_body`). Pure.
 */
export function openSnapshotPart(
  key: Uint8Array,
  ciphertext: Uint8Array,
  p: { accountId: string; recordId: Uint8Array; snapshot: Uint8Array; epoch: number },
): SnapshotPart {
  if (ciphertext.length < NONCE_BYTES + TAG_BYTES)
    throw new InvalidRecordError("malformed_body", "snapshot part is truncated");
  const ad = recordAd(p.accountId, p.recordId, p.epoch, "snapshot_part", { snapshotId: p.snapshot });
  let part: SnapshotPart;
  try {
    const padded = xchacha20poly1305(key, ciphertext.subarray(0, NONCE_BYTES), ad).decrypt(
      ciphertext.subarray(NONCE_BYTES),
    );
    part = decode(SnapshotPartDef, unpad(padded));
  } catch {
    throw new InvalidRecordError("malformed_body", "snapshot part does not decrypt");
  }
  if (!equal(snapshotPartId(p.snapshot, part.index), p.recordId)) {
    throw new InvalidRecordError("malformed_body", "snapshot part is stored under another record id");
  }
  return part;
}

/**
 * Reassemble parts (any order) into the state; throws {@link InvalidRecordError} (`malformed_body`) unless
 * they are exactly parts `0 … total-1` of one snapshot at `covers` (protocol/log.py `join_snapshot`). Pure.
 */
export function joinSnapshot(parts: readonly SnapshotPart[], covers: number): SnapshotState {
  const ordered = [...parts].sort((a, b) => a.index - b.index);
  if (ordered.some((p, i) => p.index !== i || p.total !== ordered.length)) {
    throw new InvalidRecordError("malformed_body", "snapshot parts are missing or repeated");
  }
  if (ordered.some((p) => p.covers !== covers)) {
    throw new InvalidRecordError("malformed_body", "snapshot parts are for another position");
  }
  let state: SnapshotState;
  try {
    state = decode(SnapshotStateDef, concat(...ordered.map((p) => p.data)));
  } catch (error) {
    const detail = error instanceof TetherlessError ? error.detail : "does not decode";
    throw new InvalidRecordError("malformed_body", `snapshot state: ${detail}`);
  }
  if (state.covers !== covers) throw new InvalidRecordError("malformed_body", "snapshot state is for another position");
  return state;
}

// -- epochs: when a device writes a key record (§5.3, §5.5, §5.6; protocol/client/sync.py `ensure_epoch`) ----

/** What this device knows of one epoch, as {@link nextKeyRecord} needs it. */
export interface EpochFacts {
  /** Device ids the epoch's verified key records granted (its writers). */
  readonly granted: ReadonlySet<string>;
  /** The creator's signed `created_at_ms` of the record that created the epoch. */
  readonly createdAtMs: number;
  /** Records applied under the epoch. */
  readonly records: number;
}

/** The schedule of §5.6 point 3 (sync.py's defaults): whichever comes first. */
export const ROTATE_AFTER_RECORDS = 1000;
export const ROTATE_AFTER_MS = 7 * 86_400_000;

/**
 * Why nothing more may be written under `epoch` (sync.py `rotation_reason`), or null: a device it was granted
 * to is no longer in the verified list (a revocation), or the schedule is due. Pure.
 */
export function rotationReason(
  epoch: number,
  facts: EpochFacts,
  current: readonly DeviceEntry[],
  nowMs: number,
): string | null {
  const present = new Set(current.map((d) => d.device_id));
  const removed = [...facts.granted].filter((d) => !present.has(d));
  if (removed.length) return `epoch ${epoch} was granted to ${removed.length} device(s) no longer in the device list`;
  if (facts.records >= ROTATE_AFTER_RECORDS) return `epoch ${epoch} reached ${ROTATE_AFTER_RECORDS} records`;
  if (nowMs - facts.createdAtMs >= ROTATE_AFTER_MS) return `epoch ${epoch} is older than ${ROTATE_AFTER_MS / 1000} s`;
  return null;
}

/** The key record a device appends next (see {@link nextKeyRecord}); null: none is due. */
export interface KeyRecordPlan {
  /** The epoch the record names: a new one (`rotation`) or the newest (grant-only). */
  readonly epoch: number;
  readonly rotation: boolean;
  /** The epochs whose keys it carries (the new epoch's key is made by the caller). */
  readonly carries: readonly number[];
  /** The devices it grants. */
  readonly devices: readonly DeviceEntry[];
  /** Removed writers' close-out marks (§5.1 v3); empty: a v2 record. */
  readonly closed: ReadonlyMap<string, number>;
  readonly reason: string;
}

/**
 * Which key record a device holding the keys `held` appends now (sync.py `ensure_epoch`), given the epochs it
 * knows (`facts`, newest last), the verified grant-receiving devices of the current list and the removed
 * writers' highest `writer_seq` (`writerHigh`, for those no rotation closed yet):
 * - no epoch yet: epoch 1, granted to every current device;
 * - a rotation reason ({@link rotationReason}): the next epoch, granted to every current device, closing the
 *   removed writers; it also carries every older key held when some current device lacks the newest epoch;
 * - current devices without a grant of the newest epoch: a grant-only record carrying every key held;
 * - else null; null too when this device does not hold the newest epoch's key. Pure.
 */
export function nextKeyRecord(p: {
  facts: ReadonlyMap<number, EpochFacts>;
  held: ReadonlySet<number>;
  receiving: readonly DeviceEntry[];
  unclosedWriters: ReadonlyMap<string, number>;
  nowMs: number;
}): KeyRecordPlan | null {
  const newest = Math.max(0, ...p.facts.keys());
  if (newest === 0) {
    return { epoch: 1, rotation: true, carries: [], devices: p.receiving, closed: new Map(), reason: "no epoch yet" };
  }
  if (!p.held.has(newest)) return null;
  const facts = p.facts.get(newest)!;
  const missing = p.receiving.filter((d) => !facts.granted.has(d.device_id));
  const history = [...p.held].filter((e) => e <= newest).sort((a, b) => a - b);
  const reason = rotationReason(newest, facts, p.receiving, p.nowMs);
  if (reason !== null) {
    const present = new Set(p.receiving.map((d) => d.device_id));
    const closed = new Map([...p.unclosedWriters].filter(([d]) => !present.has(d)));
    const carries = missing.length ? history : [];
    return { epoch: newest + 1, rotation: true, carries, devices: p.receiving, closed, reason };
  }
  if (!missing.length) return null;
  return { epoch: newest, rotation: false, carries: history, devices: missing, closed: new Map(), reason: "grant" };
}

// -- recovery backup records (§5.7) ------------------------------------------------------------------------

/** A recovery backup (§5.7): a `key`-kind record that is not a key record; this client reads it to skip it. */
export interface RecoveryBackupBody {
  account_id: string;
  epoch: number;
  device_list_version: number;
  writer_device: string;
  created_at_ms: number;
  x25519_public: Uint8Array;
  kem_public: Uint8Array;
  wrapped: Uint8Array;
  commitments: EpochCommitment[];
}
const RecoveryBackupBodyDef: StructDef<RecoveryBackupBody> = {
  name: "RecoveryBackupBody",
  fields: [
    { name: "account_id", type: str() },
    { name: "epoch", type: int(1) },
    { name: "device_list_version", type: int(1) },
    { name: "writer_device", type: str() },
    { name: "created_at_ms", type: int() },
    { name: "x25519_public", type: bytes(32, 32) },
    { name: "kem_public", type: bytes(1184, 1184) },
    { name: "wrapped", type: bytes() },
    { name: "commitments", type: list(struct(EpochCommitmentDef)) },
  ],
};
export interface RecoveryBackupRecord {
  backup: RecoveryBackupBody;
  signature: Uint8Array;
}
const RecoveryBackupRecordDef: StructDef<RecoveryBackupRecord> = {
  name: "RecoveryBackupRecord",
  fields: [
    { name: "backup", type: struct(RecoveryBackupBodyDef) },
    { name: "signature", type: bytes() },
  ],
};

/** The recovery backup in a `key` record, or null when it is not one (a key record, or garbage). Never throws. */
export function decodeRecoveryBackup(ciphertext: Uint8Array): RecoveryBackupRecord | null {
  try {
    return decode(RecoveryBackupRecordDef, unpad(ciphertext));
  } catch {
    return null;
  }
}

// -- writer order (§4.6, §5.1 v3) --------------------------------------------------------------------------

/** What a reader knows about one writer: the highest `writer_seq` applied, and its close-out mark if closed. */
export interface WriterState {
  readonly high: number;
  /** The mark of the first verified rotation that removed this writer (§5.1 v3); undefined: not closed. */
  readonly closedAt?: number;
}

/**
 * Judge a signed record's `writer_seq` against its writer's state (account-log.md §4.6 "writer order", §5.1
 * v3): `"apply"` (next in order, or the writer's first record seen), `"gap"` (applied, but records
 * `#high+1…#seq-1` are missing: flag `log_writer_gap`), `"replay"` (at or below the mark with a record id
 * already applied: changes nothing). Throws `log_epoch_stale` for a record of a closed writer above its mark
 * (written after the rotation that removed it) and for one at or below the mark that was not applied (the
 * relay reordered or replayed it). Pure.
 */
export function judgeWriterSeq(
  writer: string,
  seq: number,
  state: WriterState | undefined,
  alreadyApplied: boolean,
): "apply" | "gap" | "replay" {
  if (state?.closedAt !== undefined && seq > state.closedAt) {
    throw new TetherlessError(
      "log_epoch_stale",
      `record #${seq} of ${writer}, whose removal closed it at #${state.closedAt}: written after the rotation`,
    );
  }
  const high = state?.high ?? 0;
  if (seq <= high) {
    if (alreadyApplied) return "replay";
    throw new TetherlessError(
      "log_epoch_stale",
      `record #${seq} of ${writer} after its #${high}: the relay reordered or replayed its records`,
    );
  }
  return high && seq > high + 1 ? "gap" : "apply";
}

// -- message frames and envelope keys (§9) ------------------------------------------------------------------

/** The content type of a framed message: the session `Content.body` is a {@link MessageFrame}. */
export const FRAME_CONTENT_TYPE = "application/vnd.tetherless.message+msgpack";
/** Epoch keys between devices of one account travel as session messages of this type (crypto.md §12). */
export const ACCOUNT_KEY_CONTENT_TYPE = "tetherless/account-key";

/** The signed body of a message: the per-pair sequence number, the application's content type and body. */
export interface MessageFrame {
  pair_seq: number;
  content_type: string;
  body: Uint8Array;
}
export const MessageFrameDef: StructDef<MessageFrame> = {
  name: "MessageFrame",
  fields: [
    { name: "pair_seq", type: int(1) },
    { name: "content_type", type: str() },
    { name: "body", type: bytes() },
  ],
};

export function frameMessage(pairSeq: number, contentType: string, body: Uint8Array): Uint8Array {
  return encode(MessageFrameDef, { pair_seq: pairSeq, content_type: contentType, body });
}

/** Throws {@link InvalidRecordError} (`malformed_body`) for bytes that are not a frame. */
export function unframeMessage(body: Uint8Array): MessageFrame {
  try {
    return decode(MessageFrameDef, body);
  } catch (error) {
    throw new InvalidRecordError(
      "malformed_body",
      `message frame: ${error instanceof TetherlessError ? error.detail : "does not decode"}`,
    );
  }
}

/** `SHA-256(layout("envelope-key", message_uid, recipient))[:16]`: an envelope's idempotency key (§9). */
export function envelopeKey(messageUid: Uint8Array, recipientDeviceAddress: string): Uint8Array {
  return digest("envelope-key", messageUid, recipientDeviceAddress).slice(0, 16);
}
