/**
 * Padding to size buckets (protocol/padding.py): ISO/IEC 7816-4 (0x80 then zeros) up to 256, 512, 1 KiB …
 * 64 KiB, then multiples of 64 KiB. Pure.
 */
import { TetherlessError } from "./errors.js";

export const MIN_BUCKET_BYTES = 256;
export const LINEAR_STEP_BYTES = 64 * 1024;

/** The smallest bucket of at least `n` bytes; throws `RangeError` for a negative or non-integer `n`. */
export function bucketFor(n: number): number {
  if (!Number.isSafeInteger(n) || n < 0) throw new RangeError("a length is a non-negative integer");
  if (n <= MIN_BUCKET_BYTES) return MIN_BUCKET_BYTES;
  if (n <= LINEAR_STEP_BYTES) {
    let bucket = MIN_BUCKET_BYTES;
    while (bucket < n) bucket *= 2;
    return bucket;
  }
  return Math.ceil(n / LINEAR_STEP_BYTES) * LINEAR_STEP_BYTES;
}

export function isBucket(n: number): boolean {
  return n > 0 && bucketFor(n) === n;
}

/** `data` + 0x80 + zeros, to the smallest bucket of at least `data.length + 1` bytes. */
export function pad(data: Uint8Array): Uint8Array {
  const out = new Uint8Array(bucketFor(data.length + 1));
  out.set(data);
  out[data.length] = 0x80;
  return out;
}

/** Undo {@link pad}; throws `TetherlessError` `malformed_body` for a non-bucket length or bad padding. */
export function unpad(data: Uint8Array): Uint8Array {
  if (!isBucket(data.length)) throw new TetherlessError("malformed_body", "padded length is not a bucket size");
  let end = data.length;
  while (end > 0 && data[end - 1] === 0) end--;
  if (end === 0 || data[end - 1] !== 0x80) throw new TetherlessError("malformed_body", "bad padding");
  return data.slice(0, end - 1);
}
