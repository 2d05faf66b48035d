/**
 * The only place protocol messages become bytes and bytes become messages (protocol/codec.py).
 *
 * Messages are described by {@link StructDef}s that mirror the msgspec Structs of protocol/messages.py:
 * fields in declaration order, encoded as a map of field names (or an array for `array_like` structs),
 * a leading `"type"` field for tagged structs, fields equal to their default left out for
 * `omit_defaults` structs, bytes as MessagePack bin (JSON: padded base64), unknown fields ignored on
 * decode. Two encodings of one definition: MessagePack (`application/vnd.msgpack`) and JSON.
 *
 * Integers are JavaScript numbers: values above 2^53 − 1 are refused (`invalid_field`) although the
 * schemas allow up to 2^63 − 1 (no field the protocol fills from a clock or a counter comes close).
 */
import { decode as msgpackDecode, encode as msgpackEncode } from "@msgpack/msgpack";
import { equal, fromBase64, fromUtf8, toBase64, utf8 } from "./bytes.js";
import { TetherlessError } from "./errors.js";

export type Type =
  | { readonly kind: "int"; readonly min?: number; readonly max?: number }
  | {
      readonly kind: "str";
      readonly minLength?: number;
      readonly maxLength?: number;
      readonly pattern?: RegExp;
      readonly oneOf?: readonly string[];
    }
  | { readonly kind: "bytes"; readonly minLength?: number; readonly maxLength?: number }
  | { readonly kind: "bool" }
  | { readonly kind: "literal"; readonly values: readonly number[] }
  | { readonly kind: "list"; readonly item: Type; readonly minLength?: number; readonly maxLength?: number }
  | { readonly kind: "optional"; readonly inner: Type }
  | { readonly kind: "struct"; readonly def: StructDef<object> }
  /** `dict[str, V]`: a JavaScript `Map` in insertion order (integer-like keys are refused on encode). */
  | { readonly kind: "map"; readonly value: Type }
  /** A msgspec union of tagged structs, told apart by their `"type"` field. */
  | { readonly kind: "union"; readonly defs: readonly StructDef<object>[] };

export interface FieldDef {
  readonly name: string;
  readonly type: Type;
  /** The default a missing field takes on decode; a field without one is required. */
  readonly default?: () => unknown;
  /**
   * Under `omit_defaults`, whether a value at its default is left out. msgspec omits plain defaults and
   * empty-collection factories but keeps a `default_factory=str` field (DeviceEntry.name): `false` there.
   */
  readonly omitAtDefault?: boolean;
}

export interface StructDef<T extends object> {
  readonly name: string;
  readonly fields: readonly FieldDef[];
  readonly omitDefaults?: boolean;
  readonly arrayLike?: boolean;
  /** msgspec `tag=`: encoded as a leading `"type": tag` field. */
  readonly tag?: string;
  /** Phantom: the TypeScript type the definition describes. */
  readonly _type?: T;
}

export const MSGPACK = "application/vnd.msgpack";
export const JSON_TYPE = "application/json";
export type MediaType = typeof MSGPACK | typeof JSON_TYPE;

// -- schema helpers ------------------------------------------------------------------------------------

export const int = (min = 0, max: number = Number.MAX_SAFE_INTEGER): Type => ({ kind: "int", min, max });
export const str = (opts: Omit<Extract<Type, { kind: "str" }>, "kind"> = {}): Type => ({ kind: "str", ...opts });
export const bytes = (minLength = 0, maxLength: number = Number.MAX_SAFE_INTEGER): Type => ({
  kind: "bytes",
  minLength,
  maxLength,
});
export const bool: Type = { kind: "bool" };
export const list = (item: Type, minLength = 0, maxLength: number = Number.MAX_SAFE_INTEGER): Type => ({
  kind: "list",
  item,
  minLength,
  maxLength,
});
export const optional = (inner: Type): Type => ({ kind: "optional", inner });
export const struct = <T extends object>(def: StructDef<T>): Type => ({
  kind: "struct",
  def: def as StructDef<object>,
});
export const literal = (...values: number[]): Type => ({ kind: "literal", values });
export const map = (value: Type): Type => ({ kind: "map", value });
export const union = (...defs: StructDef<object>[]): Type => {
  if (defs.some((d) => d.tag === undefined)) throw new TypeError("a union holds tagged structs only");
  return { kind: "union", defs };
};

// -- omit_defaults -----------------------------------------------------------------------------------------
//
// msgspec decides "at its default" by *identity* (`value is default`), plus "empty" for collection
// factories. For the values CPython shares (False, True, None, b"", "", small ints) identity is equality;
// for a struct default (DeviceList.policy = DEFAULT_POLICY) it is not: a Policy decoded from the wire or
// built anew is encoded even when it equals the default. This implementation mirrors that with a shared
// frozen default object per struct-typed field (`default` returns the same object every time) compared by
// identity, and equality for everything else, so decoded messages re-encode to the same bytes.

function deepEqual(a: unknown, b: unknown): boolean {
  if (a instanceof Uint8Array && b instanceof Uint8Array) return equal(a, b);
  if (Array.isArray(a) && Array.isArray(b)) return a.length === b.length && a.every((x, i) => deepEqual(x, b[i]));
  if (a !== null && b !== null && typeof a === "object" && typeof b === "object") {
    const ka = Object.keys(a);
    const kb = Object.keys(b);
    return (
      ka.length === kb.length &&
      ka.every((k) => deepEqual((a as Record<string, unknown>)[k], (b as Record<string, unknown>)[k]))
    );
  }
  return a === b;
}

function isDefault(value: unknown, defaultValue: unknown): boolean {
  if (
    defaultValue !== null &&
    typeof defaultValue === "object" &&
    !(defaultValue instanceof Uint8Array) &&
    !Array.isArray(defaultValue)
  ) {
    return value === defaultValue;
  }
  return deepEqual(value, defaultValue);
}

// -- encoding -------------------------------------------------------------------------------------------

function invalid(path: string, why: string): TetherlessError {
  return new TetherlessError("invalid_field", `${why}${path ? ` - at \`${path}\`` : ""}`);
}

function toWire(type: Type, value: unknown, json: boolean, path: string): unknown {
  switch (type.kind) {
    case "int":
      if (typeof value !== "number" || !Number.isSafeInteger(value)) throw invalid(path, "Expected `int`");
      return value;
    case "str":
      if (typeof value !== "string") throw invalid(path, "Expected `str`");
      return value;
    case "bytes":
      if (!(value instanceof Uint8Array)) throw invalid(path, "Expected `bytes`");
      return json ? toBase64(value) : value;
    case "bool":
      if (typeof value !== "boolean") throw invalid(path, "Expected `bool`");
      return value;
    case "literal":
      if (typeof value !== "number" || !type.values.includes(value)) throw invalid(path, "Invalid enum value");
      return value;
    case "list":
      if (!Array.isArray(value)) throw invalid(path, "Expected `array`");
      return value.map((item, i) => toWire(type.item, item, json, `${path}[${i}]`));
    case "optional":
      return value === null || value === undefined ? null : toWire(type.inner, value, json, path);
    case "struct":
      return structToWire(type.def, value, json, path);
    case "map": {
      if (!(value instanceof Map)) throw invalid(path, "Expected `object`");
      const entries: [string, unknown][] = [];
      for (const [k, v] of value) {
        if (typeof k !== "string") throw invalid(path, "Expected `str` keys");
        // The MessagePack encoder walks a plain object, whose integer-like keys JavaScript moves first: such a
        // key would be written out of msgspec's insertion order, so it is refused rather than re-ordered.
        if (/^(0|[1-9][0-9]*)$/.test(k)) throw invalid(path, "an integer-like key cannot keep its order here");
        entries.push([k, toWire(type.value, v, json, `${path}[...]`)]);
      }
      return Object.fromEntries(entries);
    }
    case "union": {
      const tag = value !== null && typeof value === "object" ? (value as { type?: unknown }).type : undefined;
      const def = type.defs.find((d) => d.tag === tag);
      if (!def) throw invalid(path, "Expected a tagged struct of the union (a `type` field)");
      return structToWire(def, value, json, path);
    }
  }
}

function structToWire(def: StructDef<object>, value: unknown, json: boolean, path: string): unknown {
  if (value === null || typeof value !== "object") throw invalid(path, `Expected \`${def.name}\``);
  const record = value as Record<string, unknown>;
  if (def.arrayLike) {
    return def.fields.map((f) => toWire(f.type, record[f.name] ?? defaultOf(f, path), json, `${path}[${f.name}]`));
  }
  const out: Record<string, unknown> = {};
  if (def.tag !== undefined) out.type = def.tag;
  for (const field of def.fields) {
    const fieldValue = field.name in record ? record[field.name] : defaultOf(field, path);
    if (def.omitDefaults && field.default && field.omitAtDefault !== false && isDefault(fieldValue, field.default())) {
      continue;
    }
    out[field.name] = toWire(field.type, fieldValue, json, path ? `${path}.${field.name}` : field.name);
  }
  return out;
}

function defaultOf(field: FieldDef, path: string): unknown {
  if (!field.default) throw invalid(path, `Object missing required field \`${field.name}\``);
  return field.default();
}

/** Encode `message` as `def` in `mediaType`. Throws `invalid_field` when `message` does not fit the schema. */
export function encode<T extends object>(def: StructDef<T>, message: T, mediaType: MediaType = MSGPACK): Uint8Array {
  const wire = structToWire(def as StructDef<object>, message, mediaType === JSON_TYPE, "");
  if (mediaType === JSON_TYPE) return utf8(JSON.stringify(wire));
  return msgpackEncode(wire, { ignoreUndefined: false });
}

// -- decoding -------------------------------------------------------------------------------------------

function fromWire(type: Type, raw: unknown, json: boolean, path: string): unknown {
  switch (type.kind) {
    case "int": {
      const n =
        typeof raw === "bigint" && raw >= BigInt(Number.MIN_SAFE_INTEGER) && raw <= BigInt(Number.MAX_SAFE_INTEGER)
          ? Number(raw)
          : raw;
      if (typeof n !== "number" || !Number.isSafeInteger(n)) throw invalid(path, "Expected `int`");
      if ((type.min !== undefined && n < type.min) || (type.max !== undefined && n > type.max)) {
        throw invalid(path, `Expected \`int\` in [${type.min}, ${type.max}]`);
      }
      return n;
    }
    case "str": {
      if (typeof raw !== "string") throw invalid(path, "Expected `str`");
      const length = [...raw].length; // msgspec counts code points
      if (
        (type.minLength !== undefined && length < type.minLength) ||
        (type.maxLength !== undefined && length > type.maxLength)
      ) {
        throw invalid(path, "Expected `str` of a bounded length");
      }
      if (type.pattern && !type.pattern.test(raw))
        throw invalid(path, `Expected \`str\` matching ${type.pattern.source}`);
      if (type.oneOf && !type.oneOf.includes(raw)) throw invalid(path, "Invalid enum value");
      return raw;
    }
    case "bytes": {
      let value: Uint8Array;
      if (json) {
        if (typeof raw !== "string") throw invalid(path, "Expected `str` (base64)");
        try {
          value = fromBase64(raw);
        } catch {
          throw invalid(path, "Invalid base64 encoded string");
        }
      } else {
        if (!(raw instanceof Uint8Array)) throw invalid(path, "Expected `bytes`");
        value = raw.slice();
      }
      if (
        (type.minLength !== undefined && value.length < type.minLength) ||
        (type.maxLength !== undefined && value.length > type.maxLength)
      ) {
        throw invalid(path, "Expected `bytes` of a bounded length");
      }
      return value;
    }
    case "bool":
      if (typeof raw !== "boolean") throw invalid(path, "Expected `bool`");
      return raw;
    case "literal": {
      const n = typeof raw === "bigint" ? Number(raw) : raw;
      if (typeof n !== "number" || !type.values.includes(n)) throw invalid(path, "Invalid enum value");
      return n;
    }
    case "list": {
      if (!Array.isArray(raw)) throw invalid(path, "Expected `array`");
      if (
        (type.minLength !== undefined && raw.length < type.minLength) ||
        (type.maxLength !== undefined && raw.length > type.maxLength)
      ) {
        throw invalid(path, "Expected `array` of a bounded length");
      }
      return raw.map((item, i) => fromWire(type.item, item, json, `${path}[${i}]`));
    }
    case "optional":
      return raw === null ? null : fromWire(type.inner, raw, json, path);
    case "struct":
      return structFromWire(type.def, raw, json, path);
    case "map": {
      if (raw === null || typeof raw !== "object" || Array.isArray(raw) || raw instanceof Uint8Array) {
        throw invalid(path, "Expected `object`");
      }
      const entries = raw instanceof Map ? [...raw.entries()] : Object.entries(raw);
      const out = new Map<string, unknown>();
      for (const [k, v] of entries) {
        if (typeof k !== "string") throw invalid(path, "Expected `str` keys");
        out.set(k, fromWire(type.value, v, json, `${path}[...]`));
      }
      return out;
    }
    case "union": {
      const tag =
        raw !== null && typeof raw === "object" && !Array.isArray(raw) ? (raw as { type?: unknown }).type : undefined;
      const def = type.defs.find((d) => d.tag === tag);
      if (!def) throw invalid(path, "Invalid value for tag field `type`");
      const out = structFromWire(def, raw, json, path) as Record<string, unknown>;
      return { type: def.tag, ...out };
    }
  }
}

function structFromWire(def: StructDef<object>, raw: unknown, json: boolean, path: string): object {
  const out: Record<string, unknown> = {};
  if (def.arrayLike) {
    if (!Array.isArray(raw)) throw invalid(path, `Expected \`array\` (${def.name})`);
    def.fields.forEach((field, i) => {
      // Trailing unknown elements are ignored; missing trailing elements take their defaults.
      out[field.name] = i < raw.length ? fromWire(field.type, raw[i], json, `${path}[${i}]`) : defaultOf(field, path);
    });
    return out;
  }
  if (raw === null || typeof raw !== "object" || Array.isArray(raw) || raw instanceof Uint8Array) {
    throw invalid(path, `Expected \`object\` (${def.name})`);
  }
  const record = raw as Record<string, unknown>;
  if (def.tag !== undefined && record.type !== def.tag) throw invalid(path, `Invalid value for tag field \`type\``);
  for (const field of def.fields) {
    const fieldPath = path ? `${path}.${field.name}` : field.name;
    out[field.name] = Object.hasOwn(record, field.name)
      ? fromWire(field.type, record[field.name], json, fieldPath)
      : defaultOf(field, path);
  }
  return out;
}

function parse(body: Uint8Array, mediaType: MediaType): unknown {
  try {
    if (mediaType === JSON_TYPE) return JSON.parse(fromUtf8(body));
    return msgpackDecode(body, { useBigInt64: true });
  } catch (error) {
    throw new TetherlessError("malformed_body", error instanceof Error ? error.message : "does not decode");
  }
}

/**
 * Decode and validate `body` as `def`. Throws `TetherlessError` `malformed_body` when the bytes are not
 * MessagePack/JSON (trailing bytes included), `invalid_field` when they do not match the schema.
 */
export function decode<T extends object>(def: StructDef<T>, body: Uint8Array, mediaType: MediaType = MSGPACK): T {
  return structFromWire(def as StructDef<object>, parse(body, mediaType), mediaType === JSON_TYPE, "") as T;
}

/** Decode one of several tagged structs (a stream item) by its `"type"` field. */
export function decodeTagged<T extends object>(
  defs: readonly StructDef<T>[],
  body: Uint8Array,
  mediaType: MediaType = MSGPACK,
): { readonly def: StructDef<T>; readonly value: T } {
  const raw = parse(body, mediaType);
  const tag = raw !== null && typeof raw === "object" ? (raw as Record<string, unknown>).type : undefined;
  const def = defs.find((d) => d.tag === tag);
  if (!def) throw invalid("", "Invalid value for tag field `type`");
  return { def, value: structFromWire(def as StructDef<object>, raw, mediaType === JSON_TYPE, "") as T };
}

// -- streams (protocol/codec.py: 0xce + u32 length + item; JSON Lines) ---------------------------------

export const FRAME_HEADER_BYTES = 5;

/** One stream item, framed for `mediaType`. */
export function encodeStreamItem<T extends object>(
  def: StructDef<T>,
  message: T,
  mediaType: MediaType = MSGPACK,
): Uint8Array {
  const item = encode(def, message, mediaType);
  if (mediaType === JSON_TYPE) {
    const out = new Uint8Array(item.length + 1);
    out.set(item);
    out[item.length] = 0x0a;
    return out;
  }
  const out = new Uint8Array(FRAME_HEADER_BYTES + item.length);
  out[0] = 0xce;
  new DataView(out.buffer).setUint32(1, item.length, false);
  out.set(item, FRAME_HEADER_BYTES);
  return out;
}

/**
 * Incremental decoder of a stream of tagged items: {@link feed} bytes as they arrive, get every complete
 * item. Throws `malformed_body` on a bad frame header or an item above `maxItemBytes` (the stream is then
 * unusable: reconnect from the last cursor).
 */
export class StreamDecoder<T extends object> {
  private buffer: Uint8Array = new Uint8Array(0);

  constructor(
    private readonly defs: readonly StructDef<T>[],
    private readonly mediaType: MediaType = MSGPACK,
    private readonly maxItemBytes = 16 * 1024 * 1024,
  ) {}

  feed(data: Uint8Array): { readonly def: StructDef<T>; readonly value: T }[] {
    const joined = new Uint8Array(this.buffer.length + data.length);
    joined.set(this.buffer);
    joined.set(data, this.buffer.length);
    const items: { def: StructDef<T>; value: T }[] = [];
    let offset = 0;
    for (;;) {
      const rest = joined.subarray(offset);
      if (this.mediaType === MSGPACK) {
        if (rest.length < FRAME_HEADER_BYTES) break;
        const length = new DataView(rest.buffer, rest.byteOffset).getUint32(1, false);
        if (rest[0] !== 0xce || length > this.maxItemBytes) {
          throw new TetherlessError("malformed_body", "bad stream frame header");
        }
        if (rest.length < FRAME_HEADER_BYTES + length) break;
        items.push(decodeTagged(this.defs, rest.subarray(FRAME_HEADER_BYTES, FRAME_HEADER_BYTES + length), MSGPACK));
        offset += FRAME_HEADER_BYTES + length;
      } else {
        const nl = rest.indexOf(0x0a);
        if (nl < 0) {
          if (rest.length > this.maxItemBytes) throw new TetherlessError("malformed_body", "stream line too long");
          break;
        }
        const line = rest.subarray(0, nl);
        if (fromUtf8(line).trim()) items.push(decodeTagged(this.defs, line, JSON_TYPE));
        offset += nl + 1;
      }
    }
    this.buffer = joined.slice(offset);
    return items;
  }
}
