/**
 * The wire messages of enrolment (docs/protocol.md "Enrolment", crypto.md §5.2) and of the account log
 * (account-log.md §3.6), mirroring protocol/messages.py: field order, defaults and the length constraints
 * the relay's schema enforces. Pure definitions; http.ts-style calls go through `RelayApi.call`.
 */
import { type StructDef, bool, bytes, int, list, optional, str, struct } from "./codec.js";
import { type SignedDeviceList, SignedDeviceListDef, type SignedPrekey, SignedPrekeyDef } from "./messages.js";

const MILLIS = int(0);
const RECORD_ID = bytes(16, 16);
const KIND = str({ oneOf: ["event", "state", "key", "snapshot_part", "snapshot"] });

// -- enrolment ----------------------------------------------------------------------------------------------

export interface EnrolmentBundle {
  signed_prekey: SignedPrekey;
  pq_prekey: SignedPrekey;
}
const EnrolmentBundleDef: StructDef<EnrolmentBundle> = {
  name: "EnrolmentBundle",
  fields: [
    { name: "signed_prekey", type: struct(SignedPrekeyDef) },
    { name: "pq_prekey", type: struct(SignedPrekeyDef) },
  ],
};

export interface EnrolmentOffer {
  relay: string;
  lookup_id: Uint8Array;
  sign_key: Uint8Array;
  box_key: Uint8Array;
  bundle: EnrolmentBundle;
  created_at_ms: number;
  offer_mac: Uint8Array;
  kem_key: Uint8Array;
}
export const EnrolmentOfferDef: StructDef<EnrolmentOffer> = {
  name: "EnrolmentOffer",
  fields: [
    { name: "relay", type: str({ minLength: 1, maxLength: 300 }) },
    { name: "lookup_id", type: bytes(10, 10) },
    { name: "sign_key", type: bytes(32, 32) },
    { name: "box_key", type: bytes(32, 32) },
    { name: "bundle", type: struct(EnrolmentBundleDef) },
    { name: "created_at_ms", type: MILLIS },
    { name: "offer_mac", type: bytes(32, 32) },
    { name: "kem_key", type: bytes(0, 1184), default: () => new Uint8Array(0) },
  ],
};

export interface ExpiresAt {
  expires_at_ms: number;
}
/** `EnrolmentOfferAccepted` and `EnrolmentProposalAccepted` (the same one field). */
export const ExpiresAtDef: StructDef<ExpiresAt> = {
  name: "EnrolmentAccepted",
  fields: [{ name: "expires_at_ms", type: MILLIS }],
};

export interface EnrolmentProposal {
  signed: SignedDeviceList;
  approval_tag: Uint8Array;
}
export const EnrolmentProposalDef: StructDef<EnrolmentProposal> = {
  name: "EnrolmentProposal",
  fields: [
    { name: "signed", type: struct(SignedDeviceListDef) },
    { name: "approval_tag", type: bytes(32, 32) },
  ],
};

export interface PostDeviceListRequest {
  signed: SignedDeviceList;
}
export const PostDeviceListRequestDef: StructDef<PostDeviceListRequest> = {
  name: "PostDeviceListRequest",
  fields: [{ name: "signed", type: struct(SignedDeviceListDef) }],
};

export interface DeviceListAccepted {
  account_id: string;
  version: number;
  list_hash: Uint8Array;
}
export const DeviceListAcceptedDef: StructDef<DeviceListAccepted> = {
  name: "DeviceListAccepted",
  fields: [
    { name: "account_id", type: str() },
    { name: "version", type: int(1) },
    { name: "list_hash", type: bytes(32, 32) },
  ],
};

// -- the account log ----------------------------------------------------------------------------------------

export interface LogRecordIn {
  record_id: Uint8Array;
  kind: string;
  epoch: number;
  ciphertext: Uint8Array;
  snapshot_id: Uint8Array | null;
  covers: number | null;
  parts: number | null;
  device_list_version: number | null;
}
const LogRecordInDef: StructDef<LogRecordIn> = {
  name: "LogRecordIn",
  fields: [
    { name: "record_id", type: RECORD_ID },
    { name: "kind", type: KIND },
    { name: "epoch", type: int(1) },
    { name: "ciphertext", type: bytes(1) },
    { name: "snapshot_id", type: optional(RECORD_ID), default: () => null },
    { name: "covers", type: optional(int(0)), default: () => null },
    { name: "parts", type: optional(int(1)), default: () => null },
    { name: "device_list_version", type: optional(int(1)), default: () => null },
  ],
};

export interface AppendRequest {
  records: LogRecordIn[];
  expected_head: number | null;
}
export const AppendRequestDef: StructDef<AppendRequest> = {
  name: "AppendRequest",
  fields: [
    { name: "records", type: list(struct(LogRecordInDef), 1) },
    { name: "expected_head", type: optional(int(0)), default: () => null },
  ],
};

export interface AppendResult {
  record_id: Uint8Array;
  position: number;
  duplicate: boolean;
}
export interface AppendResponse {
  head: number;
  results: AppendResult[];
}
export const AppendResponseDef: StructDef<AppendResponse> = {
  name: "AppendResponse",
  fields: [
    { name: "head", type: int(0) },
    {
      name: "results",
      type: list(
        struct({
          name: "AppendResult",
          fields: [
            { name: "record_id", type: RECORD_ID },
            { name: "position", type: int(0) },
            { name: "duplicate", type: bool, default: () => false },
          ],
        } as StructDef<AppendResult>),
      ),
    },
  ],
};

export interface LogRecord {
  position: number;
  record_id: Uint8Array;
  kind: string;
  epoch: number;
  committed_at_ms: number;
  ciphertext: Uint8Array;
  size: number;
  snapshot_id: Uint8Array | null;
  covers: number | null;
  parts: number | null;
  device_list_version: number | null;
}
const LogRecordDef: StructDef<LogRecord> = {
  name: "LogRecord",
  fields: [
    { name: "position", type: int(0) },
    { name: "record_id", type: RECORD_ID },
    { name: "kind", type: KIND },
    { name: "epoch", type: int(1) },
    { name: "committed_at_ms", type: MILLIS },
    { name: "ciphertext", type: bytes() },
    { name: "size", type: int(0) },
    { name: "snapshot_id", type: optional(RECORD_ID), default: () => null },
    { name: "covers", type: optional(int(0)), default: () => null },
    { name: "parts", type: optional(int(0)), default: () => null },
    { name: "device_list_version", type: optional(int(0)), default: () => null },
  ],
};

export interface LogPage {
  records: LogRecord[];
  next_after: number;
  head: number;
  horizon: number;
  more: boolean;
}
/** `LogPage` (its `snapshot` reference is not read: this client does not start from snapshots yet). */
export const LogPageDef: StructDef<LogPage> = {
  name: "LogPage",
  fields: [
    { name: "records", type: list(struct(LogRecordDef)) },
    { name: "next_after", type: int(0) },
    { name: "head", type: int(0) },
    { name: "horizon", type: int(0) },
    { name: "more", type: bool },
  ],
};
