/**
 * Self-certifying ids and addresses (protocol/ids.py, docs/protocol.md §3). Ids are the first 20 bytes of
 * a domain-separated SHA-256 in lowercase base32 without padding (32 characters of [a-z2-7]); an address
 * is `<device-id>.<account-id>@<relay>`, the device part empty for an account address. Pure.
 */
import { toBase32 } from "./bytes.js";
import { TetherlessError } from "./errors.js";
import { digest } from "./signing.js";

export const ID_BYTES = 20;
const ID_RE = /^[a-z2-7]{32}$/;
// host or host:port; letters, digits, dots, dashes, or an IPv6 literal in brackets (ids.py RELAY_PATTERN).
export const RELAY_RE = /^(?:[A-Za-z0-9.-]{1,253}|\[[0-9A-Fa-f:.]{2,45}\])(?::[0-9]{1,5})?$/;

function idOf(domain: string, signKey: Uint8Array): string {
  if (signKey.length !== 32) throw new RangeError("an Ed25519 public key is 32 bytes");
  return toBase32(digest(domain, signKey).subarray(0, ID_BYTES));
}

/** The device id of an Ed25519 public signing key. */
export function deviceIdFor(signKey: Uint8Array): string {
  return idOf("device-id", signKey);
}

/** The account id of the account whose genesis device holds `genesisSignKey`. */
export function accountIdFor(genesisSignKey: Uint8Array): string {
  return idOf("account-id", genesisSignKey);
}

export function isId(value: string): boolean {
  return ID_RE.test(value);
}

export interface Address {
  readonly account: string;
  readonly relay: string;
  /** Empty for an account address. */
  readonly device: string;
}

/** The canonical text of an address (relay names in lowercase, as `parseAddress` gives them). */
export function formatAddress(address: Address): string {
  const local = address.device ? `${address.device}.${address.account}` : address.account;
  return `${local}@${address.relay}`;
}

/** Parse an address; throws `TetherlessError` `invalid_field` when `text` is not one. */
export function parseAddress(text: string): Address {
  const at = text.lastIndexOf("@");
  const bad = () => new TetherlessError("invalid_field", `not an address: ${JSON.stringify(text.slice(0, 100))}`);
  if (at < 0) throw bad();
  const local = text.slice(0, at);
  const relay = text.slice(at + 1);
  if (!RELAY_RE.test(relay)) throw bad();
  const dot = local.lastIndexOf(".");
  const device = dot < 0 ? "" : local.slice(0, dot);
  const account = dot < 0 ? local : local.slice(dot + 1);
  if (!isId(account) || (dot >= 0 && !isId(device))) throw bad();
  return { account, relay: relay.toLowerCase(), device };
}

/** `formatAddress(parseAddress(text))`: the one form addresses are compared in. */
export function canonicalAddress(text: string): string {
  return formatAddress(parseAddress(text));
}
