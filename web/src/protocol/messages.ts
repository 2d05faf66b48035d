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

export const ROLES = ["device", "integration", "archiver"] as const;
export type DeviceRole = (typeof ROLES)[number];
export const SCOPES = ["receive", "send"] as const;
export type DeviceScope = (typeof SCOPES)[number];

/**
 * One device of a list. `kem_key`, `role` and `scopes` are format 3 (docs/crypto.md §3.6); at their
 * defaults they are not encoded, so format-1/2 entries encode exactly as before.
 */
export interface DeviceEntry {
  device_id: string;
  sign_key: Uint8Array;
  box_key: Uint8Array;
  added_at_ms: number;
  name: string;
  kem_key: Uint8Array;
  role: DeviceRole;
  scopes: DeviceScope[];
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
    { name: "kem_key", type: bytes(0, 1184), default: noBytes },
    { name: "role", type: str({ oneOf: ROLES }), default: () => "device" },
    { name: "scopes", type: list(str({ oneOf: SCOPES }), 0, 8), default: noList },
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

// -- the relay API's requests and answers (docs/protocol.md §5; protocol/messages.py) ---------------------
// Only the fields this client reads are declared for answers: unknown fields are ignored on decode.

export interface CreateAccountRequest {
  signed: SignedDeviceList;
}
export const CreateAccountRequestDef: StructDef<CreateAccountRequest> = {
  name: "CreateAccountRequest",
  fields: [{ name: "signed", type: struct(SignedDeviceListDef) }],
};

export interface AccountCreated {
  account_id: string;
  device_id: string;
  address: string;
}
export const AccountCreatedDef: StructDef<AccountCreated> = {
  name: "AccountCreated",
  fields: [
    { name: "account_id", type: ID },
    { name: "device_id", type: ID },
    { name: "address", type: ADDRESS },
  ],
};

export interface ChallengeRequest {
  device_id: string;
}
export const ChallengeRequestDef: StructDef<ChallengeRequest> = {
  name: "ChallengeRequest",
  fields: [{ name: "device_id", type: ID }],
};

/** `Session` in protocol/messages.py: a bearer token (named apart from a ratchet session here). */
export interface AuthSession {
  token: string;
  account_id: string;
  device_id: string;
  expires_at_ms: number;
}
export const AuthSessionDef: StructDef<AuthSession> = {
  name: "Session",
  fields: [
    { name: "token", type: str({ minLength: 1 }) },
    { name: "account_id", type: ID },
    { name: "device_id", type: ID },
    { name: "expires_at_ms", type: MILLIS },
  ],
};

export interface Accepted {
  id: Uint8Array;
  sent_at_ms: number;
  duplicate: boolean;
}
export const AcceptedDef: StructDef<Accepted> = {
  name: "Accepted",
  fields: [
    { name: "id", type: bytes(16, 16) },
    { name: "sent_at_ms", type: MILLIS },
    { name: "duplicate", type: bool, default: () => false },
  ],
};
export interface SendResponse {
  accepted: Accepted[];
}
export const SendResponseDef: StructDef<SendResponse> = {
  name: "SendResponse",
  fields: [{ name: "accepted", type: list(struct(AcceptedDef)) }],
};

export interface InboxPage {
  envelopes: InboxEnvelope[];
  next_cursor: number;
  more: boolean;
}
export const InboxPageDef: StructDef<InboxPage> = {
  name: "InboxPage",
  fields: [
    { name: "envelopes", type: list(struct(InboxEnvelopeDef)) },
    { name: "next_cursor", type: int(0) },
    { name: "more", type: bool },
  ],
};

export interface AckRequest {
  up_to: number | null;
  ids: Uint8Array[];
}
export const AckRequestDef: StructDef<AckRequest> = {
  name: "AckRequest",
  fields: [
    { name: "up_to", type: optional(int(0)), default: () => null },
    { name: "ids", type: list(bytes(16, 16), 0, 10_000), default: noList },
  ],
};
export interface AckResponse {
  acknowledged: number;
}
export const AckResponseDef: StructDef<AckResponse> = {
  name: "AckResponse",
  fields: [{ name: "acknowledged", type: int(0) }],
};

export interface PrekeyUpload {
  signed_prekey: SignedPrekey | null;
  last_resort: SignedPrekey | null;
  one_time: SignedPrekey[];
}
export const PrekeyUploadDef: StructDef<PrekeyUpload> = {
  name: "PrekeyUpload",
  fields: [
    { name: "signed_prekey", type: optional(struct(SignedPrekeyDef)), default: () => null },
    { name: "last_resort", type: optional(struct(SignedPrekeyDef)), default: () => null },
    { name: "one_time", type: list(struct(SignedPrekeyDef), 0, 200), default: noList },
  ],
};
export interface PrekeyCounts {
  x25519_one_time: number;
  mlkem_one_time: number;
  signed_prekey_id: number | null;
  last_resort_id: number | null;
}
export const PrekeyCountsDef: StructDef<PrekeyCounts> = {
  name: "PrekeyCounts",
  fields: [
    { name: "x25519_one_time", type: int(0) },
    { name: "mlkem_one_time", type: int(0) },
    { name: "signed_prekey_id", type: optional(U32), default: () => null },
    { name: "last_resort_id", type: optional(U32), default: () => null },
  ],
};

export interface ClaimPrekeysRequest {
  devices: string[];
}
export const ClaimPrekeysRequestDef: StructDef<ClaimPrekeysRequest> = {
  name: "ClaimPrekeysRequest",
  fields: [{ name: "devices", type: list(ADDRESS, 1, 256) }],
};
export interface ClaimPrekeysResponse {
  bundles: PrekeyBundle[];
  missing: string[];
}
export const ClaimPrekeysResponseDef: StructDef<ClaimPrekeysResponse> = {
  name: "ClaimPrekeysResponse",
  fields: [
    { name: "bundles", type: list(struct(PrekeyBundleDef)) },
    { name: "missing", type: list(ADDRESS) },
  ],
};

/** `GET /.well-known/tetherless`: the relay's name (the challenge and address binding) and its API versions. */
export interface WellKnown {
  relay: string;
  relay_key: Uint8Array;
  api_versions: string[];
}
export const WellKnownDef: StructDef<WellKnown> = {
  name: "WellKnown",
  fields: [
    { name: "relay", type: str({ minLength: 1 }) },
    { name: "relay_key", type: PUBLIC_KEY },
    { name: "api_versions", type: list(str()) },
  ],
};
