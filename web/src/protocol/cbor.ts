/**
 * A minimal, strict CBOR (RFC 8949) reader for what WebAuthn hands a verifier: COSE_Key maps and
 * authenticator-data extensions. Definite lengths only, integers up to 2^53 − 1, no tags or floats
 * (none appear in those structures); anything else throws `RangeError`. Parsing attacker bytes: every
 * read is bounds-checked and nesting is limited.
 */
import { fromUtf8 } from "./bytes.js";

export type CborValue = number | Uint8Array | string | boolean | null | CborValue[] | Map<number | string, CborValue>;

const MAX_DEPTH = 16;

export class CborReader {
  offset = 0;

  constructor(private readonly data: Uint8Array) {}

  private byte(): number {
    const b = this.data[this.offset];
    if (b === undefined) throw new RangeError("CBOR: truncated");
    this.offset += 1;
    return b;
  }

  private argument(info: number): number {
    if (info < 24) return info;
    const size = info === 24 ? 1 : info === 25 ? 2 : info === 26 ? 4 : info === 27 ? 8 : 0;
    if (size === 0) throw new RangeError("CBOR: indefinite lengths and reserved values are not supported");
    let n = 0;
    for (let i = 0; i < size; i++) n = n * 256 + this.byte();
    if (!Number.isSafeInteger(n)) throw new RangeError("CBOR: integer too large");
    return n;
  }

  private take(length: number): Uint8Array {
    if (this.offset + length > this.data.length) throw new RangeError("CBOR: truncated");
    const out = this.data.slice(this.offset, this.offset + length);
    this.offset += length;
    return out;
  }

  /** Read one data item. */
  read(depth = 0): CborValue {
    if (depth > MAX_DEPTH) throw new RangeError("CBOR: nested too deeply");
    const initial = this.byte();
    const major = initial >> 5;
    const info = initial & 31;
    switch (major) {
      case 0:
        return this.argument(info);
      case 1:
        return -1 - this.argument(info);
      case 2:
        return this.take(this.argument(info));
      case 3:
        return fromUtf8(this.take(this.argument(info)));
      case 4: {
        const n = this.argument(info);
        const out: CborValue[] = [];
        for (let i = 0; i < n; i++) out.push(this.read(depth + 1));
        return out;
      }
      case 5: {
        const n = this.argument(info);
        const out = new Map<number | string, CborValue>();
        for (let i = 0; i < n; i++) {
          const key = this.read(depth + 1);
          if (typeof key !== "number" && typeof key !== "string")
            throw new RangeError("CBOR: map keys are integers or text");
          if (out.has(key)) throw new RangeError("CBOR: duplicate map key");
          out.set(key, this.read(depth + 1));
        }
        return out;
      }
      case 7:
        if (info === 20) return false;
        if (info === 21) return true;
        if (info === 22) return null;
        throw new RangeError("CBOR: unsupported simple value or float");
      default:
        throw new RangeError("CBOR: tags are not supported");
    }
  }

  get done(): boolean {
    return this.offset === this.data.length;
  }
}

/** Decode exactly one item; trailing bytes are an error. */
export function decodeCbor(data: Uint8Array): CborValue {
  const reader = new CborReader(data);
  const value = reader.read();
  if (!reader.done) throw new RangeError("CBOR: trailing bytes");
  return value;
}
