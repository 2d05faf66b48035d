/**
 * Errors of the relay API client, mapped from RFC 9457 problem documents (docs/protocol.md §2): a
 * {@link RelayError} carries the relay's stable `code` (protocol/errors.py), never parsed from `detail`;
 * an answer that is not a problem of a known code is an {@link UnknownRelayError}; a request that never
 * got an answer is a {@link TransportError}. A malformed *successful* answer is a protocol
 * `TetherlessError` (`malformed_body`/`invalid_field`) from the codec: the relay is not trusted to be well-formed.
 */
import { fromUtf8 } from "../protocol/bytes.js";

/** Every wire code of protocol/errors.py `ErrorCode` (one closed table; a test compares the two). */
export const WIRE_CODES = [
  "malformed_body",
  "invalid_field",
  "invalid_query",
  "unsupported_media_type",
  "not_acceptable",
  "body_too_large",
  "batch_too_large",
  "envelope_too_large",
  "bad_request",
  "not_found",
  "method_not_allowed",
  "missing_token",
  "invalid_token",
  "token_expired",
  "token_revoked",
  "bad_signature",
  "challenge_unknown",
  "challenge_used",
  "challenge_expired",
  "forbidden",
  "unknown_account",
  "unknown_device",
  "account_exists",
  "invalid_device_list",
  "unknown_recipient",
  "remote_recipient",
  "idempotency_conflict",
  "inbox_full",
  "signature_missing",
  "signature_expired",
  "signature_replayed",
  "wrong_destination",
  "digest_mismatch",
  "unknown_relay_key",
  "peer_forbidden",
  "peer_unavailable",
  "peer_address_refused",
  "unknown_relay",
  "device_list_conflict",
  "policy_not_met",
  "device_revoked",
  "recipient_revoked",
  "webauthn_invalid",
  "webauthn_replayed",
  "enrolment_unknown",
  "enrolment_expired",
  "enrolment_used",
  "prekey_invalid",
  "log_conflict",
  "log_epoch_stale",
  "log_rekey_required",
  "record_too_large",
  "snapshot_incomplete",
  "no_snapshot",
  "log_quota",
  "blob_corrupt",
  "blob_key_mismatch",
  "tus_version_unsupported",
  "invalid_header",
  "blob_not_found",
  "blob_offset_mismatch",
  "blob_upload_locked",
  "blob_too_large",
  "blob_quota_exceeded",
  "blob_checksum_unsupported",
  "blob_checksum_mismatch",
  "blob_digest_mismatch",
  "range_not_satisfiable",
  "rate_limited",
  "unavailable",
  "internal",
] as const;
export type WireCode = (typeof WIRE_CODES)[number];

/** Codes after which the same request may succeed later (the relay was busy or briefly unavailable). */
export const RETRYABLE_CODES: ReadonlySet<WireCode> = new Set(["rate_limited", "unavailable", "peer_unavailable"]);

/** A problem the relay answered with: `code` is stable, `detail` is for people. */
export class RelayError extends Error {
  readonly code: WireCode;
  readonly status: number;
  readonly detail: string;
  readonly retryAfterSeconds: number | null;

  constructor(code: WireCode, status: number, detail: string, retryAfterSeconds: number | null = null) {
    super(detail ? `${code}: ${detail}` : code);
    this.name = "RelayError";
    this.code = code;
    this.status = status;
    this.detail = detail;
    this.retryAfterSeconds = retryAfterSeconds;
  }
}

/** An error answer that is not an RFC 9457 problem with a known code (a proxy's page, a newer relay). */
export class UnknownRelayError extends Error {
  readonly status: number;

  constructor(status: number, excerpt: string) {
    super(`HTTP ${status} without a problem document: ${JSON.stringify(excerpt)}`);
    this.name = "UnknownRelayError";
    this.status = status;
  }
}

/**
 * The request got no HTTP answer (connection refused or reset, DNS, TLS, CORS): safe to retry idempotent calls.
 * `message` is the technical detail (`POST /v1/auth/challenge: Failed to fetch`), for logs, not for people;
 * `offline` says whether the platform reported no network at the time (`navigator.onLine` false): the device
 * is offline, rather than the relay down.
 */
export class TransportError extends Error {
  readonly offline: boolean;

  constructor(what: string, cause: unknown, offline = false) {
    super(`${what}: ${cause instanceof Error ? cause.message : String(cause)}`, { cause });
    this.name = "TransportError";
    this.offline = offline;
  }
}

const isWireCode = (code: unknown): code is WireCode =>
  typeof code === "string" && (WIRE_CODES as readonly string[]).includes(code);

/**
 * The error for an answer with `status` ≥ 400 and `body` (never throws). `retryAfterHeader` is the
 * `Retry-After` header, used when the problem lacks `retry_after_seconds`.
 */
export function errorFromProblem(
  status: number,
  body: Uint8Array,
  retryAfterHeader: string | null = null,
): RelayError | UnknownRelayError {
  let text = "";
  try {
    text = fromUtf8(body);
    const problem: unknown = JSON.parse(text);
    if (problem !== null && typeof problem === "object") {
      const p = problem as Record<string, unknown>;
      if (isWireCode(p.code)) {
        const fromBody = typeof p.retry_after_seconds === "number" ? p.retry_after_seconds : null;
        const fromHeader =
          retryAfterHeader !== null && /^\d+$/.test(retryAfterHeader) ? Number(retryAfterHeader) : null;
        return new RelayError(p.code, status, typeof p.detail === "string" ? p.detail : "", fromBody ?? fromHeader);
      }
    }
  } catch {
    // not UTF-8 or not JSON: an unknown answer, below
  }
  return new UnknownRelayError(status, text.slice(0, 200));
}
