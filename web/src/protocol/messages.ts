/**
 * The protocol messages the browser needs, as codec definitions mirroring protocol/messages.py (field
 * names, order, defaults, `omit_defaults`, `array_like` and tags must stay exactly as there: the
 * vectors in protocol/vectors/ pin the bytes). Field names are the wire names (snake_case).
 */
import { type StructDef, bool, bytes, int, list, literal, optional, str, struct } from "./codec.js";

const ID = str({ pattern: /^[a-z2-7]{32}$/ });
const ADDRESS = str({ minLength: 3, maxLength: 400 });
const PUBLIC_KEY = bytes(32, 32);
const SIGNATURE = bytes(0, 1024); // not length-checked on decode: a bad one must reach verification
const IDEMPOTENCY_KEY = bytes(8, 64);
const MILLIS = int(0);
const U32 = int(0, 2 ** 32 - 1);
const noBytes = () => new Uint8Array(0);
const noList = () => [];

// -- device lists, formats 1 and 2 (docs/protocol.md §4, docs/crypto.md §3) ----------------------------

export interface Policy {
  threshold: number;
  require_webauthn: boolean;
  require_user_verification: boolean;
}
/** The default policy: one shared frozen object, compared by identity under `omit_defaults` (codec.ts). */
export const DEFAULT_POLICY: Policy = Object.freeze({
  threshold: 1,
  require_webauthn: false,
  require_user_verification: false,
});
export const PolicyDef: StructDef<Policy> = {
  name: "Policy",
  fields: [
    { name: "threshold", type: int(1, 16), default: () => 1 },
    { name: "require_webauthn", type: bool, default: () => false },
    { name: "require_user_verification", type: bool, default: () => false },
  ],
};

export interface WebAuthnCredential {
  credential_id: Uint8Array;
  public_key: Uint8Array;
  rp_id: string;
  added_at_ms: number;
}
export const WebAuthnCredentialDef: StructDef<WebAuthnCredential> = {
  name: "WebAuthnCredential",
  fields: [
    { name: "credential_id", type: bytes(1, 1023) },
    { name: "public_key", type: bytes(1, 1024) },
    { name: "rp_id", type: str({ minLength: 1, maxLength: 253 }) },
    { name: "added_at_ms", type: MILLIS },
  ],
};

export interface WebAuthnAssertion {
  credential_id: Uint8Array;
  authenticator_data: Uint8Array;
  client_data_json: Uint8Array;
  signature: Uint8Array;
}
export const WebAuthnAssertionDef: StructDef<WebAuthnAssertion> = {
  name: "WebAuthnAssertion",
  fields: [
    { name: "credential_id", type: bytes(1, 1023) },
    { name: "authenticator_data", type: bytes(0, 2048) },
    { name: "client_data_json", type: bytes(0, 4096) },
    { name: "signature", type: SIGNATURE },
  ],
};

/**
 * One device of a list. Format 3 adds `kem_key`, `role` and `scopes` (not implemented here yet: issue 12
 * is still changing it); a format-1/2 entry never carries them, so they are not part of this definition
 * and a format-3 entry's extra fields are ignored on decode (and refused by `checkStructure`'s format
 * check before anything trusts them).
 */
export interface DeviceEntry {
  device_id: string;
  sign_key: Uint8Array;
  box_key: Uint8Array;
  added_at_ms: number;
  name: string;
}
export const DeviceEntryDef: StructDef<DeviceEntry> = {
  name: "DeviceEntry",
  omitDefaults: true,
  fields: [
    { name: "device_id", type: ID },
    { name: "sign_key", type: PUBLIC_KEY },
    { name: "box_key", type: PUBLIC_KEY },
    { name: "added_at_ms", type: MILLIS },
    // default_factory=str in msgspec: never omitted, even when empty (formats 1 and 2 always encode it).
    { name: "name", type: str({ maxLength: 64 }), default: () => "", omitAtDefault: false },
  ],
};

export interface DeviceList {
  account_id: string;
  version: number;
  created_at_ms: number;
  devices: DeviceEntry[];
  prev_hash: Uint8Array;
  format: number;
  policy: Policy;
  credentials: WebAuthnCredential[];
  recovery_key: Uint8Array;
  recovery_backup_key_hash: Uint8Array;
  account_key_epoch: number;
}
export const DeviceListDef: StructDef<DeviceList> = {
  name: "DeviceList",
  omitDefaults: true,
  fields: [
    { name: "account_id", type: ID },
    { name: "version", type: int(1) },
    { name: "created_at_ms", type: MILLIS },
    { name: "devices", type: list(struct(DeviceEntryDef), 1, 256) },
    { name: "prev_hash", type: bytes(0, 32) },
    { name: "format", type: int(1, 3), default: () => 1 },
    { name: "policy", type: struct(PolicyDef), default: () => DEFAULT_POLICY },
    { name: "credentials", type: list(struct(WebAuthnCredentialDef), 0, 16), default: noList },
    { name: "recovery_key", type: bytes(0, 32), default: noBytes },
    { name: "recovery_backup_key_hash", type: bytes(0, 32), default: noBytes },
    { name: "account_key_epoch", type: int(0), default: () => 0 },
  ],
};

export interface DeviceListSignature {
  device_id: string;
  signature: Uint8Array;
}
export const DeviceListSignatureDef: StructDef<DeviceListSignature> = {
  name: "DeviceListSignature",
  fields: [
    { name: "device_id", type: ID },
    { name: "signature", type: SIGNATURE },
  ],
};

export interface SignedDeviceList {
  device_list: DeviceList;
  signatures: DeviceListSignature[];
  recovery_signatures: Uint8Array[];
  webauthn_assertions: WebAuthnAssertion[];
}
export const SignedDeviceListDef: StructDef<SignedDeviceList> = {
  name: "SignedDeviceList",
  omitDefaults: true,
  fields: [
    { name: "device_list", type: struct(DeviceListDef) },
    { name: "signatures", type: list(struct(DeviceListSignatureDef), 0, 256) },
    { name: "recovery_signatures", type: list(SIGNATURE, 0, 2), default: noList },
    { name: "webauthn_assertions", type: list(struct(WebAuthnAssertionDef), 0, 32), default: noList },
  ],
};

export interface DeviceListChain {
  account_id: string;
  versions: SignedDeviceList[];
}
export const DeviceListChainDef: StructDef<DeviceListChain> = {
  name: "DeviceListChain",
  fields: [
    { name: "account_id", type: ID },
    { name: "versions", type: list(struct(SignedDeviceListDef)) },
  ],
};

// -- authentication ---------------------------------------------------------------------------------------

export interface Challenge {
  relay: string;
  device_id: string;
  nonce: Uint8Array;
  expires_at_ms: number;
}
export const ChallengeDef: StructDef<Challenge> = {
  name: "Challenge",
  fields: [
    { name: "relay", type: str() },
    { name: "device_id", type: ID },
    { name: "nonce", type: bytes(32, 32) },
    { name: "expires_at_ms", type: MILLIS },
  ],
};

export interface SessionRequest {
  device_id: string;
  nonce: Uint8Array;
  signature: Uint8Array;
}
export const SessionRequestDef: StructDef<SessionRequest> = {
  name: "SessionRequest",
  fields: [
    { name: "device_id", type: ID },
    { name: "nonce", type: bytes(32, 32) },
    { name: "signature", type: SIGNATURE },
  ],
};

// -- messages -----------------------------------------------------------------------------------------------

export interface OutboundEnvelope {
  recipient: string;
  idempotency_key: Uint8Array;
  ciphertext: Uint8Array;
  ttl_seconds: number | null;
}
export const OutboundEnvelopeDef: StructDef<OutboundEnvelope> = {
  name: "OutboundEnvelope",
  fields: [
    { name: "recipient", type: ADDRESS },
    { name: "idempotency_key", type: IDEMPOTENCY_KEY },
    { name: "ciphertext", type: bytes(1) },
    { name: "ttl_seconds", type: optional(int(1)), default: () => null },
  ],
};

export interface SendRequest {
  envelopes: OutboundEnvelope[];
}
export const SendRequestDef: StructDef<SendRequest> = {
  name: "SendRequest",
  fields: [{ name: "envelopes", type: list(struct(OutboundEnvelopeDef), 1) }],
};

export interface InboxEnvelope {
  cursor: number;
  id: Uint8Array;
  sent_at_ms: number;
  expires_at_ms: number;
  ciphertext: Uint8Array;
}
export const InboxEnvelopeDef: StructDef<InboxEnvelope> = {
  name: "InboxEnvelope",
  tag: "envelope",
  fields: [
    { name: "cursor", type: int(0) },
    { name: "id", type: bytes(16, 16) },
    { name: "sent_at_ms", type: MILLIS },
    { name: "expires_at_ms", type: MILLIS },
    { name: "ciphertext", type: bytes() },
  ],
};

export interface Heartbeat {
  cursor: number;
  at_ms: number;
}
export const HeartbeatDef: StructDef<Heartbeat> = {
  name: "Heartbeat",
  tag: "heartbeat",
  fields: [
    { name: "cursor", type: int(0) },
    { name: "at_ms", type: MILLIS },
  ],
};

export interface DeviceListChanged {
  account_id: string;
  version: number;
}
export const DeviceListChangedDef: StructDef<DeviceListChanged> = {
  name: "DeviceListChanged",
  tag: "device_list",
  fields: [
    { name: "account_id", type: ID },
    { name: "version", type: int(1) },
  ],
};

/** The items of `GET /v1/inbox/stream`. */
export type StreamItem = InboxEnvelope | Heartbeat | DeviceListChanged;
export const STREAM_ITEM_DEFS: readonly StructDef<StreamItem>[] = [
  InboxEnvelopeDef as StructDef<StreamItem>,
  HeartbeatDef as StructDef<StreamItem>,
  DeviceListChangedDef as StructDef<StreamItem>,
];

// -- payloads (inside ciphertexts only) ------------------------------------------------------------------

/** The plaintext of a version-1 envelope (protocol/payload.py). */
export interface SealedContent {
  sender: string;
  sender_sign_key: Uint8Array;
  recipient: string;
  sent_at_ms: number;
  message_id: Uint8Array;
  content_type: string;
  body: Uint8Array;
  signature: Uint8Array;
}
export const SealedContentDef: StructDef<SealedContent> = {
  name: "SealedContent",
  fields: [
    { name: "sender", type: ADDRESS },
    { name: "sender_sign_key", type: PUBLIC_KEY },
    { name: "recipient", type: ADDRESS },
    { name: "sent_at_ms", type: MILLIS },
    { name: "message_id", type: IDEMPOTENCY_KEY },
    { name: "content_type", type: str({ minLength: 1, maxLength: 255 }) },
    { name: "body", type: bytes() },
    { name: "signature", type: SIGNATURE },
  ],
};

export interface RatchetMessage {
  ratchet_key: Uint8Array;
  previous_chain_length: number;
  n: number;
  ciphertext: Uint8Array;
}
export const RatchetMessageDef: StructDef<RatchetMessage> = {
  name: "RatchetMessage",
  arrayLike: true,
  fields: [
    { name: "ratchet_key", type: PUBLIC_KEY },
    { name: "previous_chain_length", type: U32 },
    { name: "n", type: U32 },
    { name: "ciphertext", type: bytes() },
  ],
};

export interface PrekeyMessage {
  signed_prekey_id: number;
  pq_prekey_id: number;
  pq_last_resort: boolean;
  ephemeral_key: Uint8Array;
  kem_ciphertext: Uint8Array;
  message: RatchetMessage;
  one_time_prekey_id: number | null;
}
export const PrekeyMessageDef: StructDef<PrekeyMessage> = {
  name: "PrekeyMessage",
  arrayLike: true,
  fields: [
    { name: "signed_prekey_id", type: U32 },
    { name: "pq_prekey_id", type: U32 },
    { name: "pq_last_resort", type: bool },
    { name: "ephemeral_key", type: PUBLIC_KEY },
    { name: "kem_ciphertext", type: bytes(1088, 1088) },
    { name: "message", type: struct(RatchetMessageDef) },
    { name: "one_time_prekey_id", type: optional(U32), default: () => null },
  ],
};

export interface SealedV2 {
  sender: string;
  sender_list_version: number;
  kind: 1 | 2;
  session_id: Uint8Array;
  body: Uint8Array;
}
export const SealedV2Def: StructDef<SealedV2> = {
  name: "SealedV2",
  arrayLike: true,
  fields: [
    { name: "sender", type: ADDRESS },
    { name: "sender_list_version", type: int(1, 2 ** 53 - 1) },
    { name: "kind", type: literal(1, 2) },
    { name: "session_id", type: bytes(16, 16) },
    { name: "body", type: bytes() },
  ],
};

/** What a ratchet message encrypts (§8.2). */
export interface Content {
  recipient: string;
  sent_at_ms: number;
  message_id: Uint8Array;
  content_type: string;
  body: Uint8Array;
}
export const ContentDef: StructDef<Content> = {
  name: "Content",
  arrayLike: true,
  fields: [
    { name: "recipient", type: ADDRESS },
    { name: "sent_at_ms", type: MILLIS },
    { name: "message_id", type: IDEMPOTENCY_KEY },
    { name: "content_type", type: str({ minLength: 1, maxLength: 255 }) },
    { name: "body", type: bytes() },
  ],
};

// -- prekeys (docs/crypto.md §7.1) ------------------------------------------------------------------------

export const PREKEY_KINDS = ["x25519-signed", "mlkem768-last-resort", "x25519-one-time", "mlkem768-one-time"] as const;
export type PrekeyKind = (typeof PREKEY_KINDS)[number];

export interface SignedPrekey {
  kind: PrekeyKind;
  key_id: number;
  public_key: Uint8Array;
  created_at_ms: number;
  signature: Uint8Array;
}
export const SignedPrekeyDef: StructDef<SignedPrekey> = {
  name: "SignedPrekey",
  fields: [
    { name: "kind", type: str({ oneOf: PREKEY_KINDS }) },
    { name: "key_id", type: U32 },
    { name: "public_key", type: bytes(0, 1184) },
    { name: "created_at_ms", type: MILLIS },
    { name: "signature", type: SIGNATURE },
  ],
};

export interface PrekeyBundle {
  address: string;
  identity_key: Uint8Array;
  signed_prekey: SignedPrekey;
  pq_prekey: SignedPrekey;
  one_time_prekey: SignedPrekey | null;
}
export const PrekeyBundleDef: StructDef<PrekeyBundle> = {
  name: "PrekeyBundle",
  fields: [
    { name: "address", type: ADDRESS },
    { name: "identity_key", type: PUBLIC_KEY },
    { name: "signed_prekey", type: struct(SignedPrekeyDef) },
    { name: "pq_prekey", type: struct(SignedPrekeyDef) },
    { name: "one_time_prekey", type: optional(struct(SignedPrekeyDef)), default: () => null },
  ],
};
