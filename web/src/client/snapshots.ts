/**
 * Reading snapshots in the browser (docs/account-log.md §3.3, §6.1, §6.3; protocol/client/snapshots.py): which
 * snapshot to start from, fetching and opening its parts, and the checks of its signed manifest. The
 * orchestration (keys, the one transaction that loads the history) is logsync.ts `loadSnapshot`.
 *
 * Not done here: writing snapshots (`tetherless log snapshot` on a CLI device writes them; any device's
 * snapshot serves every device), the retention gap records of §6.3 (a browser below the horizon without a
 * snapshot reads what is left and says nothing of the gap), the slow path that scans the key records up to
 * `covers` when this device's grant predates the snapshot (the browser then replays the log instead).
 */
import { sha256 } from "@noble/hashes/sha2.js";
import { equal, toHex } from "../protocol/bytes.js";
import { type StructDef, bytes, int, optional, struct } from "../protocol/codec.js";
import { TetherlessError } from "../protocol/errors.js";
import {
  InvalidRecordError,
  type SnapshotPart,
  type SnapshotState,
  joinSnapshot,
  openSnapshotManifest,
  openSnapshotPart,
} from "../protocol/log.js";
import type { DeviceEntry } from "../protocol/messages.js";
import { type LogPage, LogPageDef, type LogRecord } from "../protocol/wire.js";
import { RelayError } from "./errors.js";
import type { RelayApi } from "./http.js";

/** §6.3: a device more than this many records behind a snapshot loads it rather than replaying. */
export const SNAPSHOT_THRESHOLD = 20_000;
const PAGE = 500;

/** The newest complete snapshot (§3.6 `SnapshotRef`). */
export interface SnapshotRef {
  snapshot_id: Uint8Array;
  /** The manifest's position. */
  position: number;
  covers: number;
  parts: number;
  epoch: number;
  committed_at_ms: number;
}
const SnapshotRefDef: StructDef<SnapshotRef> = {
  name: "SnapshotRef",
  fields: [
    { name: "snapshot_id", type: bytes(16, 16) },
    { name: "position", type: int(1) },
    { name: "covers", type: int(0) },
    { name: "parts", type: int(1) },
    { name: "epoch", type: int(1) },
    { name: "committed_at_ms", type: int(0) },
  ],
};
/** `LogPage` with its `snapshot` reference (wire.ts's `LogPageDef` leaves it out). */
type LogPageWithSnapshot = LogPage & { snapshot: SnapshotRef | null };
const LogPageWithSnapshotDef: StructDef<LogPageWithSnapshot> = {
  name: "LogPage",
  fields: [...LogPageDef.fields, { name: "snapshot", type: optional(struct(SnapshotRefDef)), default: () => null }],
};

/**
 * The snapshot a device at log position `cursor` starts from (§6.3), or null: the newest one, when it covers
 * more than the cursor, was not refused before, and the device is new (cursor 0), below the horizon, or more
 * than {@link SNAPSHOT_THRESHOLD} records behind it. One `GET /v1/log?limit=0`. Throws {@link RelayError} and
 * `TransportError`. Reads only.
 */
export async function snapshotToLoad(
  api: RelayApi,
  cursor: number,
  refused: ReadonlySet<string>,
): Promise<SnapshotRef | null> {
  const page = await api.call("GET", "/v1/log?after=0&limit=0", { response: LogPageWithSnapshotDef, auth: true });
  const snapshot = page.snapshot;
  if (!snapshot || snapshot.covers <= cursor || refused.has(toHex(snapshot.snapshot_id))) return null;
  return cursor === 0 || cursor < page.horizon || snapshot.covers - cursor > SNAPSHOT_THRESHOLD ? snapshot : null;
}

/** Every record after `after` (snapshot parts stubbed), in position order. Throws as the request. */
export async function pageAfter(api: RelayApi, after: number): Promise<LogRecord[]> {
  const records: LogRecord[] = [];
  for (;;) {
    const page = await api.call("GET", `/v1/log?after=${after}&limit=${PAGE}`, { response: LogPageDef, auth: true });
    records.push(...page.records.filter((r) => r.position > after));
    after = Math.max(after, page.next_after);
    if (!page.more || !page.records.length) return records;
  }
}

/**
 * Fetch `ref`'s parts (`GET /v1/log/snapshot/{id}`, full ciphertext), open each with `key` (its record id, the
 * snapshot id, `covers` and `total` are inside the AEAD) and join them: the state and the SHA-256 of every part's
 * `data` in order (for the manifest). Null when the relay no longer serves this snapshot (`no_snapshot`: a newer
 * one superseded it). Throws {@link InvalidRecordError} (`malformed_body`: a part that does not open, parts
 * missing, repeated or for another snapshot), {@link RelayError}, `TransportError`. Reads only.
 */
export async function fetchSnapshotState(
  api: RelayApi,
  ref: SnapshotRef,
  key: Uint8Array,
  accountId: string,
): Promise<{ state: SnapshotState; partHashes: Uint8Array[] } | null> {
  const records: LogRecord[] = [];
  let after = 0;
  try {
    for (;;) {
      const page = await api.call("GET", `/v1/log/snapshot/${toHex(ref.snapshot_id)}?after=${after}&limit=${PAGE}`, {
        response: LogPageDef,
        auth: true,
      });
      records.push(...page.records);
      after = page.next_after;
      if (!page.more || !page.records.length) break;
    }
  } catch (error) {
    if (error instanceof RelayError && error.code === "no_snapshot") return null;
    throw error;
  }
  const parts: SnapshotPart[] = records.map((r) => {
    if (
      r.kind !== "snapshot_part" ||
      r.epoch !== ref.epoch ||
      !r.snapshot_id ||
      !equal(r.snapshot_id, ref.snapshot_id)
    ) {
      throw new InvalidRecordError("malformed_body", "the relay served a record that is not a part of this snapshot");
    }
    return openSnapshotPart(key, r.ciphertext, {
      accountId,
      recordId: r.record_id,
      snapshot: ref.snapshot_id,
      epoch: r.epoch,
    });
  });
  if (parts.length !== ref.parts)
    throw new InvalidRecordError("malformed_body", "the relay served another number of parts");
  const state = joinSnapshot(parts, ref.covers);
  const partHashes = [...parts].sort((a, b) => a.index - b.index).map((p) => sha256(p.data));
  return { state, partHashes };
}

/**
 * The signed manifest of a v2 epoch's snapshot (§6.1 "Signed snapshots"; snapshots.py `_check_manifest`): found
 * at `ref.position` among `records` (the records after `covers`), opened with the v2 AD (an unsigned one does
 * not open), signed by a writer of the epoch (`info.writers`) that is still in the verified list `current`,
 * written before any later epoch began, naming exactly `partHashes`. Throws {@link TetherlessError}
 * (`malformed_body`, `bad_signature`, `log_epoch_stale`). Pure.
 */
export function checkManifest(p: {
  ref: SnapshotRef;
  records: readonly LogRecord[];
  partHashes: readonly Uint8Array[];
  key: Uint8Array;
  accountId: string;
  info: { writers: ReadonlyMap<string, Uint8Array> } | null;
  laterEpochBefore: boolean;
  current: readonly DeviceEntry[];
}): void {
  const { ref } = p;
  if (!p.info) throw new InvalidRecordError("malformed_body", "snapshot under an epoch this client does not read");
  if (p.laterEpochBefore) {
    throw new TetherlessError("log_epoch_stale", "snapshot written under an epoch after a later one began");
  }
  const record = p.records.find((r) => r.position === ref.position && r.kind === "snapshot");
  if (!record) throw new InvalidRecordError("malformed_body", "the relay did not serve the snapshot's manifest");
  const manifest = openSnapshotManifest(p.key, record.ciphertext, p.info.writers, {
    accountId: p.accountId,
    snapshot: ref.snapshot_id,
    epoch: ref.epoch,
    covers: ref.covers,
    parts: ref.parts,
  });
  if (!p.current.some((d) => d.device_id === manifest.writer_device)) {
    throw new InvalidRecordError("bad_signature", "snapshot written by a device no longer in the list");
  }
  const hashes = manifest.part_hashes;
  if (hashes.length !== p.partHashes.length || hashes.some((h, i) => !equal(h, p.partHashes[i]!))) {
    throw new InvalidRecordError("malformed_body", "snapshot parts do not match its signed manifest");
  }
}
