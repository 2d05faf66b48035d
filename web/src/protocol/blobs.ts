/**
 * Encrypted media blobs (protocol/blobs.py; docs/crypto.md "Media blobs", decision 0014 D1, D2): age's STREAM
 * behind a key-committing header, and the file reference that travels inside the end-to-end message.
 *
 *     payload_key = HKDF-SHA-256(ikm=file_key, salt=nonce, info="payload", L=32)
 *     commitment  = HKDF-SHA-256(ikm=file_key, salt=nonce, info="tetherless-blob/1 commitment", L=32)
 *     header      = MAGIC (8) ‖ nonce (16) ‖ commitment (32)
 *     padded      = file ‖ 0x80 ‖ 0x00 … up to paddedSize(file length)
 *     chunk i     = ChaCha20-Poly1305(payload_key, i as 11-byte big-endian ‖ last, padded[i·64 KiB …], ad="")
 *     ciphertext  = header ‖ chunk 0 ‖ chunk 1 ‖ …
 *
 * Pure: no I/O, no clock; the file key, nonce and capability are parameters. Reading the file is the caller's
 * (a callback: {@link Encryptor.readRange}); receiving is push-based ({@link BlobOpener}), so the client feeds
 * bytes as the network delivers them. Vectors: protocol/vectors/blob-stream.json (test/blobs.test.ts).
 */
import { chacha20poly1305 } from "@noble/ciphers/chacha.js";
import { sha256 } from "@noble/hashes/sha2.js";
import { concat, equal, utf8 } from "./bytes.js";
import { type StructDef, bytes, decode, encode, int, str } from "./codec.js";
import { TetherlessError } from "./errors.js";
import { RELAY_RE } from "./ids.js";
import { hkdf } from "./kdf.js";

export const MAGIC = utf8("TLBLOB\x00\x01");
export const FILE_KEY_BYTES = 32;
export const NONCE_BYTES = 16;
export const COMMITMENT_BYTES = 32;
export const CAPABILITY_BYTES = 32;
export const HEADER_BYTES = MAGIC.length + NONCE_BYTES + COMMITMENT_BYTES; // 56
export const CHUNK_BYTES = 65536;
export const TAG_BYTES = 16;
export const CIPHER_CHUNK_BYTES = CHUNK_BYTES + TAG_BYTES;
/** The smallest padded size (Signal's smallest attachment bucket): tiny files all look alike. */
export const MIN_PADDED_BYTES = 541;
/** The largest file this format describes (1 TiB), as in protocol/blobs.py. */
export const MAX_FILE_BYTES = 2 ** 40;
/** The content type of a file message: its body is a MessagePack {@link BlobRef} (protocol/payload.py). */
export const FILE_CONTENT_TYPE = "application/vnd.tetherless.file+msgpack";

const PAYLOAD_INFO = utf8("payload");
const COMMITMENT_INFO = utf8("tetherless-blob/1 commitment");
const MARKER = 0x80;

/** Why a blob does not open: `blob_corrupt` (bytes that are not the blob's) or `blob_key_mismatch` (header). */
export type BlobErrorCode = "blob_corrupt" | "blob_key_mismatch";

/** A blob that must not be trusted, with protocol/errors.py's code. Never carries plaintext. */
export class BlobError extends TetherlessError {
  declare readonly code: BlobErrorCode;

  constructor(code: BlobErrorCode, detail: string) {
    super(code, detail);
    this.name = "BlobError";
  }
}

// -- sizes (D2) ---------------------------------------------------------------------------------------------

/**
 * The padded plaintext size of an `n`-byte file: `max(541, ⌊1.05^k⌋)` for the smallest `k` with
 * `1.05^k ≥ n + 1`. Exact: computed in BigInt as `21^k / 20^k` (the float formula rounds the wrong way at some
 * bucket edges). Throws `RangeError` for `n` outside 0 … {@link MAX_FILE_BYTES} or not an integer.
 */
export function paddedSize(n: number): number {
  if (!Number.isSafeInteger(n) || n < 0 || n > MAX_FILE_BYTES) {
    throw new RangeError(`a file size is an integer between 0 and ${MAX_FILE_BYTES} bytes`);
  }
  const need = BigInt(n + 1);
  if (need <= BigInt(MIN_PADDED_BYTES)) return MIN_PADDED_BYTES;
  // 1.05^k ≥ need ⇔ 21^k ≥ need · 20^k. The float estimate is off by at most one near an edge; the loops
  // make the answer exact whatever it is.
  let k = Math.max(0, Math.ceil(Math.log(n + 1) / Math.log(1.05)));
  const holds = (e: number) => 21n ** BigInt(e) >= need * 20n ** BigInt(e);
  while (!holds(k)) k += 1;
  while (k > 0 && holds(k - 1)) k -= 1;
  return Number(21n ** BigInt(k) / 20n ** BigInt(k));
}

/** How many STREAM chunks a padded plaintext of `padded` bytes (> 0) takes; the last holds 1 … 64 KiB. */
export function chunkCount(padded: number): number {
  if (!(padded > 0)) throw new RangeError("a padded size is positive");
  return Math.ceil(padded / CHUNK_BYTES);
}

/** The blob's length for a padded plaintext of `padded` bytes: the header and one tag per chunk. */
export function ciphertextLength(padded: number): number {
  return HEADER_BYTES + padded + TAG_BYTES * chunkCount(padded);
}

/** The ciphertext length of an encrypted `size`-byte file (what the relay stores and sees). */
export function blobLength(size: number): number {
  return ciphertextLength(paddedSize(size));
}

// -- keys and header (D1) -----------------------------------------------------------------------------------

/** `[payloadKey, commitment]` of a blob. Throws `RangeError` when the key is not 32 bytes or the nonce not 16. */
export function derive(fileKey: Uint8Array, nonce: Uint8Array): [Uint8Array, Uint8Array] {
  if (fileKey.length !== FILE_KEY_BYTES || nonce.length !== NONCE_BYTES) {
    throw new RangeError(`a blob's file key is ${FILE_KEY_BYTES} bytes and its nonce ${NONCE_BYTES}`);
  }
  return [hkdf(nonce, fileKey, PAYLOAD_INFO, 32), hkdf(nonce, fileKey, COMMITMENT_INFO, 32)];
}

/** The 56-byte header: MAGIC ‖ nonce ‖ commitment. */
export function header(nonce: Uint8Array, commitment: Uint8Array): Uint8Array {
  if (nonce.length !== NONCE_BYTES || commitment.length !== COMMITMENT_BYTES) {
    throw new RangeError("a blob header holds a 16-byte nonce and a 32-byte commitment");
  }
  return concat(MAGIC, nonce, commitment);
}

/** `[nonce, commitment]` from a header; throws {@link BlobError} `blob_corrupt` for one of another format. */
export function parseHeader(data: Uint8Array): [Uint8Array, Uint8Array] {
  if (data.length < HEADER_BYTES || !equal(data.subarray(0, MAGIC.length), MAGIC)) {
    throw new BlobError("blob_corrupt", "not a Tetherless blob (bad or unsupported header)");
  }
  const nonceEnd = MAGIC.length + NONCE_BYTES;
  return [data.slice(MAGIC.length, nonceEnd), data.slice(nonceEnd, HEADER_BYTES)];
}

// -- STREAM (age's payload encryption) ----------------------------------------------------------------------

function chunkNonce(index: number, last: boolean): Uint8Array {
  if (!Number.isSafeInteger(index) || index < 0) throw new RangeError("a STREAM chunk index is a non-negative integer");
  const nonce = new Uint8Array(12);
  // 11 bytes big-endian; a safe integer fits in the last 7 of them.
  let rest = index;
  for (let i = 10; i >= 4; i--) {
    nonce[i] = rest % 256;
    rest = Math.floor(rest / 256);
  }
  nonce[11] = last ? 1 : 0;
  return nonce;
}

/**
 * age's STREAM under one payload key: chunk `i` is sealed with the nonce `i ‖ last`, so a chunk opens only at
 * its own position with its own last-flag (reordering, truncation and extension fail).
 */
export class PayloadStream {
  constructor(private readonly payloadKey: Uint8Array) {}

  /** Encrypt chunk `index` (at most 64 KiB). Deterministic, so an upload can re-encrypt any piece again. */
  seal(index: number, plaintext: Uint8Array, last: boolean): Uint8Array {
    if (plaintext.length > CHUNK_BYTES) throw new RangeError("a STREAM chunk holds at most 64 KiB");
    return chacha20poly1305(this.payloadKey, chunkNonce(index, last)).encrypt(plaintext);
  }

  /** Decrypt chunk `index`; throws {@link BlobError} `blob_corrupt` for a wrong length or a failed tag. */
  open(index: number, ciphertext: Uint8Array, last: boolean): Uint8Array {
    if (ciphertext.length < TAG_BYTES || ciphertext.length > CIPHER_CHUNK_BYTES) {
      throw new BlobError("blob_corrupt", `chunk ${index} has an impossible length`);
    }
    try {
      return chacha20poly1305(this.payloadKey, chunkNonce(index, last)).decrypt(ciphertext);
    } catch {
      throw new BlobError("blob_corrupt", `chunk ${index} does not authenticate`);
    }
  }
}

// -- padding ------------------------------------------------------------------------------------------------

/** The bytes at `[start, end)` of a file's padding (0x80 at `size`, zeros after), with `size ≤ start`. */
function paddingBytes(start: number, end: number, size: number): Uint8Array {
  const out = new Uint8Array(Math.max(0, end - start));
  if (out.length && start === size) out[0] = MARKER;
  return out;
}

/**
 * The file's bytes in chunk `index`'s padded plaintext, checking that what lies past `size` is the padding
 * (0x80 at `size`, then zeros). Throws {@link BlobError} `blob_corrupt` otherwise. The chunk authenticated
 * already, so a bad padding is a sender that broke the format, not a forgery: no constant time needed.
 */
export function stripPadding(index: number, plaintext: Uint8Array, size: number): Uint8Array {
  const chunkStart = index * CHUNK_BYTES;
  const keep = Math.max(0, Math.min(plaintext.length, size - chunkStart));
  const expected = paddingBytes(chunkStart + keep, chunkStart + plaintext.length, size);
  if (!equal(plaintext.subarray(keep), expected)) throw new BlobError("blob_corrupt", `chunk ${index} has bad padding`);
  return plaintext.subarray(0, keep);
}

// -- encryption ---------------------------------------------------------------------------------------------

/** `length` bytes of the file at `offset` (never past its size); may be asynchronous (a browser `File`). */
export type ReadFile = (offset: number, length: number) => Uint8Array | Promise<Uint8Array>;

/**
 * Encrypts one file as a blob, a chunk at a time and at any offset. `fileKey` (32 bytes) and `nonce` (16)
 * are fresh random bytes per file (never reused, never derived from the content); `size` is the true length.
 * Deterministic in these three, so a retried upload re-encrypts exactly the bytes it sent before.
 */
export class Encryptor {
  readonly header: Uint8Array;
  readonly size: number;
  readonly padded: number;
  readonly chunks: number;
  readonly length: number;
  private readonly stream: PayloadStream;

  constructor(fileKey: Uint8Array, nonce: Uint8Array, size: number) {
    const [payloadKey, commitment] = derive(fileKey, nonce);
    this.stream = new PayloadStream(payloadKey);
    this.size = size;
    this.padded = paddedSize(size);
    this.chunks = chunkCount(this.padded);
    this.length = ciphertextLength(this.padded);
    this.header = header(nonce, commitment);
  }

  /** The `[start, end)` range of the file that chunk `index` covers (empty when it holds padding only). */
  fileSpan(index: number): [number, number] {
    if (!Number.isSafeInteger(index) || index < 0 || index >= this.chunks) {
      throw new RangeError(`a chunk index of this blob is between 0 and ${this.chunks - 1}`);
    }
    const start = index * CHUNK_BYTES;
    return [Math.min(start, this.size), Math.min(start + CHUNK_BYTES, this.size)];
  }

  /**
   * Ciphertext chunk `index`, given the file's bytes in {@link fileSpan} (the padding is added here). Throws
   * `RangeError` when `data` is not exactly that span or `index` is out of range. Idempotent.
   */
  chunk(index: number, data: Uint8Array): Uint8Array {
    const [start, end] = this.fileSpan(index);
    if (data.length !== end - start) throw new RangeError(`chunk ${index} holds ${end - start} bytes of the file`);
    const chunkStart = index * CHUNK_BYTES;
    const chunkEnd = Math.min(chunkStart + CHUNK_BYTES, this.padded);
    const padding = paddingBytes(Math.max(chunkStart, this.size), chunkEnd, this.size);
    return this.stream.seal(index, padding.length ? concat(data, padding) : data, index === this.chunks - 1);
  }

  /**
   * The ciphertext bytes `[start, end)`, in pieces of at most one chunk. `read` is called once per chunk the
   * range touches, in order, so memory stays at one chunk whatever the range. Throws `RangeError` for a range
   * outside 0 … length and when `read` returns another number of bytes than asked (the file changed).
   * Stopping the iteration early is safe.
   */
  async *readRange(start: number, end: number, read: ReadFile): AsyncGenerator<Uint8Array> {
    if (!(0 <= start && start <= end && end <= this.length)) {
      throw new RangeError(`a ciphertext range lies within 0 … ${this.length}`);
    }
    if (start < HEADER_BYTES) yield this.header.subarray(start, Math.min(end, HEADER_BYTES));
    let position = Math.max(start, HEADER_BYTES);
    while (position < end) {
      const index = Math.floor((position - HEADER_BYTES) / CIPHER_CHUNK_BYTES);
      const chunkOffset = HEADER_BYTES + index * CIPHER_CHUNK_BYTES;
      const [fileStart, fileEnd] = this.fileSpan(index);
      const data = fileEnd > fileStart ? await read(fileStart, fileEnd - fileStart) : new Uint8Array(0);
      if (data.length !== fileEnd - fileStart) throw new RangeError("the file changed while it was being read");
      const piece = this.chunk(index, data).subarray(position - chunkOffset, end - chunkOffset);
      yield piece;
      position += piece.length;
    }
  }
}

// -- decryption ---------------------------------------------------------------------------------------------

/**
 * Opens one blob's chunks after checking its header against the file key from the end-to-end message: throws
 * (constructor) {@link BlobError} `blob_corrupt` for a header of another format and `blob_key_mismatch` when
 * the commitment is not the key's (compared in constant time, before any chunk is opened: ChaCha20-Poly1305
 * alone is not key-committing).
 */
export class Decryptor {
  readonly nonce: Uint8Array;
  private readonly stream: PayloadStream;

  constructor(fileKey: Uint8Array, headerBytes: Uint8Array) {
    const [nonce, commitment] = parseHeader(headerBytes);
    if (fileKey.length !== FILE_KEY_BYTES) {
      throw new BlobError("blob_key_mismatch", `a blob's file key is ${FILE_KEY_BYTES} bytes`);
    }
    const [payloadKey, expected] = derive(fileKey, nonce);
    if (!equal(commitment, expected)) {
      throw new BlobError("blob_key_mismatch", "the blob was not encrypted under this file key");
    }
    this.nonce = nonce;
    this.stream = new PayloadStream(payloadKey);
  }

  /** The padded plaintext of chunk `index` (random access); {@link stripPadding} cuts it to the file. */
  openChunk(index: number, ciphertextChunk: Uint8Array, last: boolean): Uint8Array {
    return this.stream.open(index, ciphertextChunk, last);
  }
}

/**
 * A whole blob received as a stream of pieces of any size (sans I/O): {@link push} the bytes as they arrive and
 * get each chunk's file bytes once it authenticated; {@link finish} at the end. The header's commitment is
 * checked before any chunk is opened; each chunk is opened at its position with the last-flag the true size
 * fixes; the ciphertext is hashed as it passes and {@link finish} compares it with the reference's digest.
 *
 * A caller must not publish the plaintext until {@link finish} returned: a relay can serve chunks that
 * authenticate in a blob of another digest only with the file key, but the digest is the message's promise.
 * Throws {@link BlobError} (`blob_corrupt`: a chunk that does not open, bad padding, more bytes than `length`,
 * fewer at the end, another digest; `blob_key_mismatch`: the header). After a throw the object is unusable.
 */
export class BlobOpener {
  private readonly hasher = sha256.create();
  private readonly chunks: number;
  private readonly buffer = new Uint8Array(CIPHER_CHUNK_BYTES);
  private filled = 0;
  /** Bytes received so far (hashed, and checked up to the last whole chunk). */
  received = 0;
  private decryptor: Decryptor | null = null;
  private index = 0;

  constructor(private readonly ref: Pick<BlobRef, "key" | "digest" | "length" | "size">) {
    if (ref.length !== blobLength(ref.size)) throw new RangeError("a blob's length is the blob length of its size");
    this.chunks = chunkCount(paddedSize(ref.size));
  }

  /** The file's bytes of every chunk that `data` completed (possibly none). */
  push(data: Uint8Array): Uint8Array[] {
    if (this.received + data.length > this.ref.length) {
      throw new BlobError("blob_corrupt", `the relay sent more than the blob's ${this.ref.length} bytes`);
    }
    this.hasher.update(data);
    this.received += data.length;
    const out: Uint8Array[] = [];
    let offset = 0;
    while (offset < data.length) {
      const need = this.need();
      const take = Math.min(need - this.filled, data.length - offset);
      this.buffer.set(data.subarray(offset, offset + take), this.filled);
      this.filled += take;
      offset += take;
      if (this.filled === need) {
        const whole = this.buffer.subarray(0, need);
        if (this.decryptor === null) {
          this.decryptor = new Decryptor(this.ref.key, whole);
        } else {
          const last = this.index === this.chunks - 1;
          const padded = this.decryptor.openChunk(this.index, whole, last);
          out.push(stripPadding(this.index, padded, this.ref.size));
          this.index += 1;
        }
        this.filled = 0;
      }
    }
    return out;
  }

  /** Check that the whole blob arrived and hashes to the reference's digest; throws `blob_corrupt` otherwise. */
  finish(): void {
    if (this.received !== this.ref.length || this.index !== this.chunks) {
      throw new BlobError("blob_corrupt", `the relay sent ${this.received} of the blob's ${this.ref.length} bytes`);
    }
    if (!equal(this.hasher.digest(), this.ref.digest)) {
      throw new BlobError("blob_corrupt", "the blob's SHA-256 is not the one in the message");
    }
  }

  /** Bytes the current unit (the header, then each chunk) needs; the last chunk is shorter. */
  private need(): number {
    if (this.decryptor === null) return HEADER_BYTES;
    return Math.min(CIPHER_CHUNK_BYTES, this.ref.length - HEADER_BYTES - this.index * CIPHER_CHUNK_BYTES);
  }
}

// -- the reference inside the end-to-end message (D5) -------------------------------------------------------

const NAME_MAX_BYTES = 255;
const FALLBACK_NAME = "file";
export const BLOB_ID_RE = /^[0-9a-f]{32}$/;
const UNSAFE_NAME_CHARACTERS = /[/\\:*?"<>|]/g;
// control, format (bidi overrides: "\u202egpj.exe" shows as "exe.jpg"), surrogate, private, unassigned, line breaks
const DROPPED = /^[\p{Cc}\p{Cf}\p{Cs}\p{Co}\p{Cn}\p{Zl}\p{Zp}]$/u;
const SPACE = /^\p{Zs}$/u;
const WINDOWS_RESERVED = /^(con|prn|aux|nul|com[0-9]|lpt[0-9])(\..*)?$/i;

/** Where a file's blob lives and how to open it; travels only inside the end-to-end encrypted message. */
export interface BlobRef {
  readonly relay: string;
  /** 32 lowercase hex digits. */
  readonly blob_id: string;
  /** SHA-256 of the whole ciphertext. */
  readonly digest: Uint8Array;
  /** The file key. */
  readonly key: Uint8Array;
  /** The ciphertext's length: always `blobLength(size)`. */
  readonly length: number;
  readonly capability: Uint8Array;
  readonly name: string;
  readonly content_type: string;
  /** The file's true size. */
  readonly size: number;
}

/** protocol/blobs.py `BlobRef` (a plain msgspec Struct: a map of its fields in this order). */
export const BlobRefDef: StructDef<BlobRef> = {
  name: "BlobRef",
  fields: [
    { name: "relay", type: str({ pattern: RELAY_RE }) },
    { name: "blob_id", type: str({ pattern: BLOB_ID_RE }) },
    { name: "digest", type: bytes(32, 32) },
    { name: "key", type: bytes(FILE_KEY_BYTES, FILE_KEY_BYTES) },
    { name: "length", type: int(0) },
    { name: "capability", type: bytes(CAPABILITY_BYTES, CAPABILITY_BYTES) },
    { name: "name", type: str({ minLength: 1, maxLength: NAME_MAX_BYTES }) },
    { name: "content_type", type: str({ minLength: 1, maxLength: 255 }) },
    { name: "size", type: int(0, MAX_FILE_BYTES) },
  ],
};

/** UTF-8 length of a string of whole code points (surrogates were dropped before it is asked). */
const utf8Length = (text: string): number => utf8(text).length;

/**
 * A file name to save `name` under, never a path nor a device or hidden file (protocol/blobs.py `safe_name`,
 * rule for rule): path separators and characters Windows refuses become `_`; control, format, surrogate,
 * private-use and unassigned characters are dropped; other white space becomes a space; leading dots and
 * trailing dots/spaces are cut; Windows device names get a `_` prefix; at most 255 UTF-8 bytes (the extension
 * kept when it can be). An empty result is `file`. Never throws; idempotent.
 *
 * "Unassigned" follows this JavaScript engine's Unicode version, which may differ from the Python one's:
 * a name with a character assigned in one and not the other is refused by the older side's check.
 */
export function safeName(name: string): string {
  let text = "";
  for (const c of name) {
    if (DROPPED.test(c)) continue;
    text += SPACE.test(c) ? " " : c;
  }
  text = stripDotsAndSpaces(text.replace(UNSAFE_NAME_CHARACTERS, "_"));
  if (WINDOWS_RESERVED.test(text)) text = "_" + text;
  if (utf8Length(text) > NAME_MAX_BYTES) {
    const dot = text.lastIndexOf(".");
    const tail = dot < 0 ? "" : text.slice(dot);
    const extension = tail && utf8Length(tail) - 1 > 0 && utf8Length(tail) - 1 <= 16 ? tail : "";
    const stem = text.slice(0, text.length - extension.length);
    let budget = NAME_MAX_BYTES - utf8Length(extension);
    let kept = "";
    for (const c of stem) {
      budget -= utf8Length(c);
      if (budget < 0) break;
      kept += c;
    }
    text = (kept + extension).replace(/[. ]+$/u, "");
  }
  return text || FALLBACK_NAME;
}

function stripDotsAndSpaces(text: string): string {
  return text.replace(/^[. ]+/u, "").replace(/[. ]+$/u, "");
}

/**
 * `ref` when its fields agree (protocol/blobs.py `BlobRef.check`); throws `TetherlessError` `invalid_field`
 * otherwise: a field outside its schema, a `length` that is not the blob length of `size`, a `name` that is not
 * a plain file name (a receiver must never be steered outside the place it chose), a `content_type` that is
 * not printable ASCII.
 */
export function checkBlobRef(ref: BlobRef): BlobRef {
  try {
    decode(BlobRefDef, encode(BlobRefDef, ref));
  } catch (error) {
    if (error instanceof TetherlessError) throw new TetherlessError("invalid_field", `blob reference: ${error.detail}`);
    throw error;
  }
  if (ref.length !== blobLength(ref.size)) {
    throw new TetherlessError("invalid_field", "blob reference: length does not match size");
  }
  if (safeName(ref.name) !== ref.name || utf8Length(ref.name) > NAME_MAX_BYTES) {
    throw new TetherlessError("invalid_field", "blob reference: name is not a plain file name");
  }
  if (!/^[ -~]*$/.test(ref.content_type)) {
    throw new TetherlessError("invalid_field", "blob reference: content type is not printable ASCII");
  }
  return ref;
}

/** The body of a file message. Throws `invalid_field` for a reference that does not check. */
export function encodeBlobRef(ref: BlobRef): Uint8Array {
  return encode(BlobRefDef, checkBlobRef(ref));
}

/** A file message's body as a checked reference; throws `malformed_body` / `invalid_field`. */
export function decodeBlobRef(body: Uint8Array): BlobRef {
  return checkBlobRef(decode(BlobRefDef, body));
}
