/**
 * Files in the browser client (decision 0014 D3, D5; docs/blobs.md; protocol/client/blobs.py is the Python
 * counterpart): {@link uploadFile} encrypts a `File` and uploads it with tus, {@link downloadFile} fetches a blob
 * with its capability and decrypts it as it streams. DOM-free (Node's `fetch`, `Blob` and `File` run it).
 *
 * Upload: pass 1 reads the file in 1 MiB slices and hashes the ciphertext (constant memory); `POST` creates the
 * upload with the digest and the capability's hash in `Upload-Metadata`; `PATCH`es of 8 MiB with
 * `Upload-Checksum` follow, each piece encrypted again from the file (deterministic). A PATCH that fails (no
 * answer, another offset, a damaged piece, the upload locked, the relay busy) is retried from the offset the
 * relay states (`HEAD`). Nothing survives a page reload: the next attempt is a new upload (docs/web.md "Files").
 *
 * Download: `GET /v1/blobs/{id}` with `Tetherless-Capability` from the blob's relay (this device's own, or one
 * reached directly at `https://<relay>` when its name is not an address: {@link blobRelayUrl}); the header's
 * commitment, each chunk and finally the ciphertext's SHA-256 are checked (protocol `BlobOpener`) before the
 * plaintext is handed out, as a `Blob`. The relay is the adversary: other bytes, a cut or a longer blob, a
 * lying offset all end in a {@link FileTransferError}, never in plaintext.
 */
import { concat, toBase64, toBase64Url } from "../protocol/bytes.js";
import {
  BLOB_ID_RE,
  BlobError,
  type BlobRef,
  BlobOpener,
  CAPABILITY_BYTES,
  Encryptor,
  FILE_KEY_BYTES,
  NONCE_BYTES,
  MAX_FILE_BYTES,
  checkBlobRef,
  safeName,
} from "../protocol/blobs.js";
import { sha256 } from "@noble/hashes/sha2.js";
import type { Random } from "./client.js";
import { RETRYABLE_CODES, RelayError, TransportError } from "./errors.js";
import { type Fetch, RelayApi } from "./http.js";

/** Ciphertext bytes per PATCH (as the CLI): memory holds one piece; a failed PATCH loses at most one. */
export const PIECE_BYTES = 8 * 1024 * 1024;
/** The largest file the browser downloads: the verified plaintext is held (as a `Blob`) until it is saved. */
export const BROWSER_DOWNLOAD_LIMIT_BYTES = 512 * 1024 * 1024;
/** How many times in a row a failed PATCH is retried from the relay's offset before the upload gives up. */
export const MAX_UPLOAD_RETRIES = 8;
/** A relay that makes the client send more than this many times the blob's length is losing what it stored. */
const MAX_SENT_FACTOR = 3;
/** The file is read in slices of this size (each `File.slice` is a promise: fewer, larger reads). */
const READ_BYTES = 1024 * 1024;
const TUS = { "tus-resumable": "1.0.0" };
const UPLOADS_PATH = "/v1/blobs/uploads";
/** Refusals of a PATCH after which the upload continues from the offset the relay states. */
const ASK_AGAIN: ReadonlySet<string> = new Set([
  "blob_offset_mismatch",
  "blob_checksum_mismatch",
  "blob_upload_locked",
  ...RETRYABLE_CODES,
]);
const TOKEN_CODES: ReadonlySet<string> = new Set(["missing_token", "invalid_token", "token_expired"]);

/** `(phase, done, total)`: bytes of the phase done so far. */
export type Progress = (phase: "encrypting" | "uploading" | "downloading", done: number, total: number) => void;

/**
 * A file that could not be sent or fetched; `code` is stable and `message` a sentence for people.
 * Codes: `blob_corrupt` / `blob_key_mismatch` (the relay served bytes that do not verify; nothing was kept),
 * `blob_not_found`, `blob_relay_refused` (the message names a relay at an address: not fetched on a
 * sender's word), `relay_unreachable`, `file_too_large_for_browser`, `relay_misbehaved` (impossible offsets,
 * ids or answers),
 * `upload_stalled` (gave up after retries), `blob_digest_mismatch` (the relay hashed the upload otherwise),
 * `invalid_content_type`, `file_too_large` (above the format's 1 TiB), `file_changed` (the file's bytes changed
 * while it was read).
 */
export class FileTransferError extends Error {
  readonly code: string;
  readonly detail: string;

  constructor(code: string, detail: string) {
    super(detail);
    this.name = "FileTransferError";
    this.code = code;
    this.detail = detail;
  }
}

/** The part of a browser `File` an upload reads (`File`, and Node's `File`/`Blob` with a name, have it). */
export interface FileSource {
  readonly name: string;
  readonly type: string;
  readonly size: number;
  slice(start: number, end: number): { arrayBuffer(): Promise<ArrayBuffer> };
}

/** Sequential reads of a {@link FileSource} through one 1 MiB window: one `slice` per MiB, not per chunk. */
function reader(file: FileSource): (offset: number, length: number) => Promise<Uint8Array> {
  let windowStart = 0;
  let window = new Uint8Array(0);
  return async (offset, length) => {
    if (offset < windowStart || offset + length > windowStart + window.length) {
      windowStart = offset;
      const end = Math.min(file.size, offset + Math.max(length, READ_BYTES));
      window = new Uint8Array(await file.slice(offset, end).arrayBuffer());
      if (window.length !== end - offset)
        throw new FileTransferError("file_changed", "the file changed while it was read");
    }
    return window.subarray(offset - windowStart, offset - windowStart + length);
  };
}

async function collect(pieces: AsyncIterable<Uint8Array>): Promise<Uint8Array> {
  const parts: Uint8Array[] = [];
  for await (const piece of pieces) parts.push(piece);
  return concat(...parts);
}

/** What {@link uploadFile} needs besides the file. */
export interface UploadOptions {
  /** This device's relay name (the blob's `relay` in the reference). */
  readonly relayName: string;
  readonly random: Random;
  readonly progress?: Progress;
  /** Called when the relay says the token expired; then the request is made again (once per failure). */
  readonly login?: () => Promise<void>;
  /** Waits before retry `attempt` (1, 2, …); the default backs off 0.5 s · 2^(attempt−1), at most 8 s. */
  readonly sleep?: (attempt: number) => Promise<void>;
  readonly pieceBytes?: number;
}

const backoff = (attempt: number): Promise<void> =>
  new Promise((resolve) => setTimeout(resolve, Math.min(8000, 500 * 2 ** (attempt - 1))));

/** One tus answer: the offset (within 0 … length) and the blob id once complete. */
interface UploadState {
  readonly offset: number;
  readonly blobId: string | null;
}

function uploadState(response: Response, length: number, route: string): UploadState {
  const text = (response.headers.get("upload-offset") ?? "").trim();
  if (!/^[0-9]+$/.test(text) || Number(text) > length) {
    throw new FileTransferError(
      "relay_misbehaved",
      `the relay answered ${route} with Upload-Offset ${JSON.stringify(text)}`,
    );
  }
  const blobId = response.headers.get("tetherless-blob-id");
  if (blobId !== null && !BLOB_ID_RE.test(blobId)) {
    throw new FileTransferError("relay_misbehaved", `the relay answered ${route} with a malformed blob id`);
  }
  return { offset: Number(text), blobId };
}

/** The upload id at the end of a creation's `Location`; anything but `…/v1/blobs/uploads/<32 hex>` is refused. */
function uploadIdOf(location: string | null): string {
  const path = location === null ? "" : new URL(location, "http://relay.invalid").pathname;
  const slash = path.lastIndexOf("/");
  const id = path.slice(slash + 1);
  if (!path.slice(0, slash).endsWith(UPLOADS_PATH) || !BLOB_ID_RE.test(id)) {
    throw new FileTransferError("relay_misbehaved", "the relay's upload Location is not an upload");
  }
  return id;
}

/**
 * Encrypt `file` under a fresh key and upload it to this device's relay (`api`, logged in) with tus; returns
 * the checked reference a file message carries. The name is {@link safeName}'s, the content type the file's
 * (`application/octet-stream` when it has none).
 *
 * Throws {@link FileTransferError} (`invalid_content_type`, `file_changed`, `relay_misbehaved`,
 * `upload_stalled`, `blob_digest_mismatch`), {@link RelayError} (`blob_too_large`, `blob_quota_exceeded`, token
 * codes when `login` is not given or does not help …) and {@link TransportError} when the creation gets no
 * answer. Not idempotent: each call is a new upload under a new key. Cancellation (the page closing) leaves an
 * unfinished upload the relay expires (`Upload-Expires`).
 */
export async function uploadFile(api: RelayApi, file: FileSource, options: UploadOptions): Promise<BlobRef> {
  const progress = options.progress ?? (() => undefined);
  const sleep = options.sleep ?? backoff;
  const pieceBytes = options.pieceBytes ?? PIECE_BYTES;
  const contentType = file.type || "application/octet-stream";
  if (contentType.length > 255 || !/^[ -~]+$/.test(contentType)) {
    throw new FileTransferError("invalid_content_type", "the file's media type is not printable ASCII");
  }
  if (file.size > MAX_FILE_BYTES) throw new FileTransferError("file_too_large", "the file is larger than 1 TiB");
  const [fileKey, nonce, capability] = [
    options.random(FILE_KEY_BYTES),
    options.random(NONCE_BYTES),
    options.random(CAPABILITY_BYTES),
  ];
  const encryptor = new Encryptor(fileKey, nonce, file.size);
  const length = encryptor.length;
  const read = reader(file);

  // Pass 1: the ciphertext's digest, a chunk at a time.
  const hasher = sha256.create();
  let hashed = 0;
  for await (const piece of encryptor.readRange(0, length, read)) {
    hasher.update(piece);
    hashed += piece.length;
    if (hashed % (16 * 65552) < piece.length || hashed === length) progress("encrypting", hashed, length);
  }
  const digest = hasher.digest();

  // Each call of the relay: once more after a fresh login when the token expired.
  const relay = async (
    method: "POST" | "HEAD" | "PATCH",
    path: string,
    headers: Record<string, string>,
    body?: Uint8Array,
  ): Promise<Response> => {
    try {
      return await api.request(method, path, { headers: { ...TUS, ...headers }, body, auth: true });
    } catch (error) {
      if (!(options.login && error instanceof RelayError && TOKEN_CODES.has(error.code))) throw error;
      await options.login();
      return api.request(method, path, { headers: { ...TUS, ...headers }, body, auth: true });
    }
  };
  const metadata = `sha256 ${toBase64(digest)},capability ${toBase64(sha256(capability))}`;
  const create = async (): Promise<[string, UploadState]> => {
    const created = await relay("POST", UPLOADS_PATH, { "upload-length": String(length), "upload-metadata": metadata });
    const id = uploadIdOf(created.headers.get("location"));
    return [id, uploadState(created, length, "POST /v1/blobs/uploads")];
  };

  let [uploadId, state] = await create();
  let retries = 0;
  let sent = 0;
  let blobId: string;
  for (;;) {
    const path = `${UPLOADS_PATH}/${uploadId}`;
    try {
      if (state.offset === length && state.blobId === null) {
        state = uploadState(await relay("HEAD", path, {}), length, "HEAD"); // a dedup or a lost answer: the id
      }
      if (state.blobId !== null) {
        if (state.offset !== length)
          throw new FileTransferError("relay_misbehaved", "the relay named a blob for an incomplete upload");
        progress("uploading", length, length);
        blobId = state.blobId;
        break;
      }
      if (state.offset === length)
        throw new FileTransferError("relay_misbehaved", "the relay holds the whole upload but names no blob");
      progress("uploading", state.offset, length);
      const end = Math.min(state.offset + pieceBytes, length);
      const piece = await collect(encryptor.readRange(state.offset, end, read));
      sent += piece.length;
      if (sent > MAX_SENT_FACTOR * length + pieceBytes) {
        throw new FileTransferError(
          "relay_misbehaved",
          `sent ${sent} bytes of a ${length}-byte upload: the relay keeps losing what it stored`,
        );
      }
      const answer = uploadState(
        await relay(
          "PATCH",
          path,
          {
            "content-type": "application/offset+octet-stream",
            "upload-offset": String(state.offset),
            "upload-checksum": `sha256 ${toBase64(sha256(piece))}`,
          },
          piece,
        ),
        length,
        "PATCH",
      );
      if (answer.offset !== end) {
        throw new FileTransferError(
          "relay_misbehaved",
          `the relay answered a PATCH up to ${end} with offset ${answer.offset}`,
        );
      }
      state = answer;
      retries = 0;
    } catch (error) {
      if (error instanceof RelayError && error.code === "blob_digest_mismatch") {
        throw new FileTransferError(
          "blob_digest_mismatch",
          "The relay hashed the upload to another digest (did the file change during the upload?); send it again.",
        );
      }
      const expired = error instanceof RelayError && error.code === "blob_not_found";
      const again = error instanceof TransportError || (error instanceof RelayError && ASK_AGAIN.has(error.code));
      if (!again && !expired) throw error;
      retries += 1;
      if (retries > MAX_UPLOAD_RETRIES) {
        throw new FileTransferError(
          "upload_stalled",
          `The upload stopped after ${MAX_UPLOAD_RETRIES} retries (${error.message}); send the file again.`,
        );
      }
      if (expired) {
        [uploadId, state] = await create(); // expired or collected: the same ciphertext again, as a new upload
        continue;
      }
      await sleep(retries);
      try {
        state = uploadState(await relay("HEAD", path, {}), length, "HEAD");
      } catch (headError) {
        if (!(headError instanceof TransportError || headError instanceof RelayError)) throw headError;
        if (headError instanceof RelayError && headError.code === "blob_not_found") {
          [uploadId, state] = await create();
        }
        // else: the next turn PATCHes at the old offset; a 409 then asks again
      }
    }
  }
  return checkBlobRef({
    relay: options.relayName,
    blob_id: blobId,
    digest,
    key: fileKey,
    length,
    capability,
    name: safeName(file.name),
    content_type: contentType,
    size: file.size,
  });
}

/** protocol/hosts.py `numeric_host`, on a relay name's host: an address in any spelling (`127.1`, `0x7f.1`). */
function numericHost(host: string): boolean {
  if (host.startsWith("[")) return true; // an IPv6 literal (the relay-name rule brackets it)
  const labels = host.replace(/\.$/, "").split(".");
  return /^(?:0x[0-9a-f]*|[0-9]+)$/i.test(labels[labels.length - 1] ?? "");
}

/**
 * The URL of a relay a file message names that is not this device's own: `https://<relay>`. Throws
 * {@link FileTransferError} `blob_relay_refused` for an IP address in any spelling and for `localhost` names
 * (which the browser resolves to loopback itself): a sender must not aim this page at the user's own machine or
 * network. A browser cannot see DNS answers, so a name that resolves to a private address is not caught here;
 * the page's CSP (`connect-src`: this relay and the origins its operator listed) is the limit there.
 */
export function blobRelayUrl(relay: string): string {
  const name = relay.toLowerCase();
  const host = name.startsWith("[") ? name.slice(0, name.indexOf("]") + 1) : name.replace(/:[0-9]+$/, "");
  if (numericHost(host)) {
    throw new FileTransferError(
      "blob_relay_refused",
      `The file's relay ${relay} is an IP address; not connecting there on a sender's word.`,
    );
  }
  if (host === "localhost" || host.endsWith(".localhost")) {
    throw new FileTransferError(
      "blob_relay_refused",
      `The file's relay ${relay} is this computer; not connecting there on a sender's word.`,
    );
  }
  return `https://${name}`;
}

/** What {@link downloadFile} needs besides the reference. */
export interface DownloadOptions {
  /** This device's relay: its name (from `/.well-known`) and its API (same origin in the app). */
  readonly homeRelay: string;
  readonly homeApi: RelayApi;
  /** How other relays are reached (default: the platform's `fetch`). */
  readonly fetch?: Fetch;
  readonly progress?: Progress;
  readonly limitBytes?: number;
  /** The message's id as the CLI prints it: named in the "too large" error (`tetherless blob get REF`). */
  readonly cliRef?: string;
  readonly signal?: AbortSignal;
}

/**
 * Fetch, verify and decrypt the file `ref` names; resolves to its bytes once the whole blob verified (the
 * header's commitment first, every chunk as it streams, then the ciphertext's SHA-256 against the message's).
 *
 * Throws {@link FileTransferError} (`blob_corrupt`, `blob_key_mismatch`, `blob_not_found`, `blob_relay_refused`,
 * `file_too_large_for_browser`, `relay_misbehaved`, `relay_unreachable`: no answer, the transfer broke off, or
 * the browser refused the connection — CSP, CORS), `TetherlessError` `invalid_field` for a reference that does
 * not check and {@link RelayError} for other refusals. Read-only and idempotent; nothing is kept between calls.
 * Cancellation: `signal` aborts the request (`relay_unreachable`).
 */
export async function downloadFile(ref: BlobRef, options: DownloadOptions): Promise<Blob> {
  checkBlobRef(ref);
  const limit = options.limitBytes ?? BROWSER_DOWNLOAD_LIMIT_BYTES;
  if (ref.size > limit) {
    const command = `tetherless blob get ${options.cliRef ?? "<message id>"}`;
    throw new FileTransferError(
      "file_too_large_for_browser",
      `${ref.name} is ${formatSize(ref.size)}; this browser downloads files up to ${formatSize(limit)}. Use the CLI: ${command}`,
    );
  }
  const home = ref.relay.toLowerCase() === options.homeRelay.toLowerCase();
  const api = home ? options.homeApi : new RelayApi(blobRelayUrl(ref.relay), options.fetch);
  const path = `/v1/blobs/${ref.blob_id}`;
  const unreachable = (error: TransportError) =>
    new FileTransferError(
      "relay_unreachable",
      home
        ? `The download of ${ref.name} stopped: the relay does not answer (${error.message}); try again.`
        : `Cannot download ${ref.name} from ${ref.relay}, the relay that holds it: it does not answer, or does not ` +
            `let this page connect (its CORS settings, this relay's web_connect_origins). \`tetherless blob get\` can fetch it.`,
    );
  let response: Response;
  try {
    // The capability, never this device's token: the blob may be on another relay, and it is enough.
    response = await api.request("GET", path, {
      headers: { accept: "application/octet-stream", "tetherless-capability": toBase64Url(ref.capability) },
      signal: options.signal,
    });
  } catch (error) {
    if (error instanceof RelayError && error.code === "blob_not_found") {
      throw new FileTransferError(
        "blob_not_found",
        "The relay does not have this file any more (it expired or was deleted), or does not let this message fetch it.",
      );
    }
    if (error instanceof TransportError) throw unreachable(error);
    throw error;
  }
  const reader = response.body?.getReader();
  if (response.status !== 200 || !reader) {
    await reader?.cancel();
    throw new FileTransferError("relay_misbehaved", `the relay answered GET ${path} with status ${response.status}`);
  }
  const opener = new BlobOpener(ref);
  const parts: BlobPart[] = [];
  let held = 0;
  const progress = options.progress ?? (() => undefined);
  try {
    for (;;) {
      let next: ReadableStreamReadResult<Uint8Array>;
      try {
        next = await reader.read();
      } catch (error) {
        throw unreachable(new TransportError(`GET ${path}`, error));
      }
      if (next.done) break;
      for (const plaintext of opener.push(next.value)) {
        parts.push(plaintext as Uint8Array<ArrayBuffer>);
        held += plaintext.length;
      }
      // Fold the pieces into a Blob now and then: the browser may keep a large Blob out of the script's heap.
      if (held >= PIECE_BYTES) {
        parts.splice(0, parts.length, new Blob(parts));
        held = 0;
      }
      progress("downloading", opener.received, ref.length);
    }
    opener.finish();
  } catch (error) {
    await reader.cancel().catch(() => undefined);
    if (error instanceof BlobError) throw new FileTransferError(error.code, describeBlobError(error));
    throw error;
  }
  return new Blob(parts, { type: "application/octet-stream" });
}

function describeBlobError(error: BlobError): string {
  return error.code === "blob_key_mismatch"
    ? `The file on the relay was not encrypted under this message's key (${error.detail}); nothing was saved.`
    : `The file on the relay is damaged or was changed (${error.detail}); nothing was saved.`;
}

/** `1.5 MiB`, `300 bytes`: a size for people. */
export function formatSize(bytes: number): string {
  if (bytes < 1024) return `${bytes} bytes`;
  const units = ["KiB", "MiB", "GiB", "TiB"];
  let value = bytes / 1024;
  let unit = 0;
  while (value >= 1024 && unit < units.length - 1) {
    value /= 1024;
    unit += 1;
  }
  return `${value.toFixed(1)} ${units[unit]}`;
}
