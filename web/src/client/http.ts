/**
 * The relay API over `fetch`, one typed method per route this client uses (docs/protocol.md §5;
 * docs/openapi.json). Requests and answers are MessagePack (`application/vnd.msgpack`); errors come back
 * as {@link RelayError}s. DOM-free: works on Node's fetch (HTTP/1.1) and a browser's (HTTP/1.1 or 2).
 */
import { type StructDef, MSGPACK, decode, encode } from "../protocol/codec.js";
import {
  type AccountCreated,
  AccountCreatedDef,
  type AckRequest,
  AckRequestDef,
  type AckResponse,
  AckResponseDef,
  type AuthSession,
  AuthSessionDef,
  type Challenge,
  ChallengeDef,
  ChallengeRequestDef,
  type ClaimPrekeysResponse,
  ClaimPrekeysRequestDef,
  ClaimPrekeysResponseDef,
  CreateAccountRequestDef,
  type DeviceListChain,
  DeviceListChainDef,
  type InboxPage,
  InboxPageDef,
  type OutboundEnvelope,
  type PrekeyCounts,
  PrekeyCountsDef,
  type PrekeyUpload,
  PrekeyUploadDef,
  type SendResponse,
  SendRequestDef,
  SendResponseDef,
  type SessionRequest,
  SessionRequestDef,
  type SignedDeviceList,
  type WellKnown,
  WellKnownDef,
} from "../protocol/messages.js";
import { RelayError, TransportError, UnknownRelayError, errorFromProblem } from "./errors.js";

/** The part of `fetch` this client needs (a test passes a malicious relay's fetch here). */
export type Fetch = (url: string, init: RequestInit) => Promise<Response>;

const ID_PATH = /^[a-z2-7]{32}$/;

/**
 * Whether the platform says there is no network (a browser's `navigator.onLine`). Only `false` is trusted:
 * `true` means a network interface is up, not that the relay is reachable; Node has no `onLine` (not offline).
 */
function isOffline(): boolean {
  const nav = (globalThis as { navigator?: { onLine?: unknown } }).navigator;
  return nav?.onLine === false;
}

export class RelayApi {
  /** The bearer token of `POST /v1/auth/session`; authenticated calls fail with `missing_token` without it. */
  token: string | null = null;
  readonly baseUrl: string;
  private readonly fetchFn: Fetch;

  /** `baseUrl`: the relay's origin, e.g. `http://localhost:8443` (no trailing path). */
  constructor(baseUrl: string, fetchFn: Fetch = (url, init) => globalThis.fetch(url, init)) {
    this.baseUrl = baseUrl.replace(/\/+$/, "");
    this.fetchFn = fetchFn;
  }

  /**
   * One request. Throws {@link TransportError} without an answer, {@link RelayError} /
   * `UnknownRelayError` for an error answer, and the codec's `TetherlessError` (`malformed_body`,
   * `invalid_field`) for a success answer that does not decode as `responseDef`. Cancellation: pass
   * `signal`; an aborted request is a `TransportError` and may or may not have reached the relay.
   */
  async call<Req extends object, Res extends object>(
    method: "GET" | "POST" | "PUT" | "DELETE",
    path: string,
    opts: {
      request?: { def: StructDef<Req>; value: Req };
      response: StructDef<Res>;
      auth?: boolean;
      signal?: AbortSignal;
    },
  ): Promise<Res> {
    const headers: Record<string, string> = { accept: MSGPACK };
    let body: Uint8Array | undefined;
    if (opts.request) {
      body = encode(opts.request.def, opts.request.value);
      headers["content-type"] = MSGPACK;
    }
    const response = await this.request(method, path, { headers, body, auth: opts.auth, signal: opts.signal });
    let raw: Uint8Array;
    try {
      raw = new Uint8Array(await response.arrayBuffer());
    } catch (error) {
      throw new TransportError(`${method} ${path}`, error, isOffline());
    }
    return decode(opts.response, raw, MSGPACK);
  }

  /**
   * One request whose successful answer is returned unread (the blob routes: tus headers, a streamed body).
   * `auth` adds this device's token. Throws {@link TransportError} without an answer and {@link RelayError} /
   * `UnknownRelayError` for an answer with status ≥ 400 (its body read). Cancellation: pass `signal`.
   */
  async request(
    method: "GET" | "HEAD" | "POST" | "PUT" | "PATCH" | "DELETE",
    path: string,
    opts: {
      headers?: Record<string, string>;
      body?: Uint8Array | undefined;
      auth?: boolean | undefined;
      signal?: AbortSignal | undefined;
    } = {},
  ): Promise<Response> {
    const headers = { ...opts.headers };
    if (opts.auth) {
      if (this.token === null) throw new Error("not logged in: call login() first");
      headers.authorization = `Bearer ${this.token}`;
    }
    let response: Response;
    try {
      const init: RequestInit = { method, headers };
      if (opts.body) init.body = opts.body as Uint8Array<ArrayBuffer>;
      if (opts.signal) init.signal = opts.signal;
      response = await this.fetchFn(`${this.baseUrl}${path}`, init);
      if (response.status < 400) return response;
      const raw = new Uint8Array(await response.arrayBuffer());
      throw errorFromProblem(response.status, raw, response.headers.get("retry-after"));
    } catch (error) {
      if (error instanceof RelayError || error instanceof UnknownRelayError) throw error;
      throw new TransportError(`${method} ${path}`, error, isOffline());
    }
  }

  wellKnown(): Promise<WellKnown> {
    return this.call("GET", "/.well-known/tetherless", { response: WellKnownDef });
  }

  /** `POST /v1/accounts` with a genesis list. Not idempotent: a retry answers `account_exists`. */
  createAccount(signed: SignedDeviceList): Promise<AccountCreated> {
    return this.call("POST", "/v1/accounts", {
      request: { def: CreateAccountRequestDef, value: { signed } },
      response: AccountCreatedDef,
    });
  }

  /** `GET /v1/accounts/{id}/devices`: the whole chain, genesis first. Verify it before use (deviceList.verifyChain). */
  deviceChain(accountId: string): Promise<DeviceListChain> {
    if (!ID_PATH.test(accountId)) throw new RangeError(`not an account id: ${accountId}`);
    return this.call("GET", `/v1/accounts/${accountId}/devices`, { response: DeviceListChainDef });
  }

  challenge(deviceId: string): Promise<Challenge> {
    return this.call("POST", "/v1/auth/challenge", {
      request: { def: ChallengeRequestDef, value: { device_id: deviceId } },
      response: ChallengeDef,
    });
  }

  authSession(request: SessionRequest): Promise<AuthSession> {
    return this.call("POST", "/v1/auth/session", {
      request: { def: SessionRequestDef, value: request },
      response: AuthSessionDef,
    });
  }

  /** `PUT /v1/prekeys`: idempotent for the very same keys (a retried upload is answered like the first). */
  putPrekeys(upload: PrekeyUpload): Promise<PrekeyCounts> {
    return this.call("PUT", "/v1/prekeys", {
      request: { def: PrekeyUploadDef, value: upload },
      response: PrekeyCountsDef,
      auth: true,
    });
  }

  prekeyCounts(): Promise<PrekeyCounts> {
    return this.call("GET", "/v1/prekeys", { response: PrekeyCountsDef, auth: true });
  }

  /** `POST /v1/prekeys/claim`. Not idempotent (one-time keys are consumed); verify every bundle before use. */
  claimPrekeys(devices: string[]): Promise<ClaimPrekeysResponse> {
    return this.call("POST", "/v1/prekeys/claim", {
      request: { def: ClaimPrekeysRequestDef, value: { devices } },
      response: ClaimPrekeysResponseDef,
      auth: true,
    });
  }

  /** `POST /v1/messages`: all or nothing; idempotent per (this device, idempotency key). */
  send(envelopes: OutboundEnvelope[]): Promise<SendResponse> {
    return this.call("POST", "/v1/messages", {
      request: { def: SendRequestDef, value: { envelopes } },
      response: SendResponseDef,
      auth: true,
    });
  }

  inbox(after: number, limit?: number): Promise<InboxPage> {
    const query = `after=${after}${limit === undefined ? "" : `&limit=${limit}`}`;
    return this.call("GET", `/v1/inbox?${query}`, { response: InboxPageDef, auth: true });
  }

  /** `POST /v1/inbox/ack`: idempotent. Call only after the envelopes are durably processed. */
  ack(request: AckRequest): Promise<AckResponse> {
    return this.call("POST", "/v1/inbox/ack", {
      request: { def: AckRequestDef, value: request },
      response: AckResponseDef,
      auth: true,
    });
  }
}
