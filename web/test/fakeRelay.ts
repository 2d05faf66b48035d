// An in-memory relay speaking the routes src/client uses (docs/protocol.md §5), for Node tests of the client
// without a Python relay — and a malicious one: each answer can be rewritten by a `tamper` hook before the
// client sees it. It checks what a client must get right (signatures, bundles, tokens) loosely; the real
// relay's rules are tested by tests/web/test_node_client.py.
import { fromBase32, toHex } from "../src/protocol/bytes.js";
import { type StructDef, decode, encode } from "../src/protocol/codec.js";
import { verifyChallengeSignature } from "../src/protocol/auth.js";
import { evaluateVersion, verifyGenesis } from "../src/protocol/deviceList.js";
import { formatAddress, parseAddress } from "../src/protocol/ids.js";
import {
  AckRequestDef,
  AckResponseDef,
  AccountCreatedDef,
  AuthSessionDef,
  type Challenge,
  ChallengeDef,
  ChallengeRequestDef,
  ClaimPrekeysRequestDef,
  ClaimPrekeysResponseDef,
  CreateAccountRequestDef,
  type DeviceEntry,
  type DeviceListChain,
  DeviceListChainDef,
  type InboxEnvelope,
  InboxPageDef,
  type PrekeyBundle,
  PrekeyCountsDef,
  PrekeyUploadDef,
  SendRequestDef,
  SendResponseDef,
  SessionRequestDef,
  type SignedDeviceList,
  type SignedPrekey,
  WellKnownDef,
} from "../src/protocol/messages.js";

import {
  AppendRequestDef,
  AppendResponseDef,
  DeviceListAcceptedDef,
  type EnrolmentOffer,
  EnrolmentOfferDef,
  type EnrolmentProposal,
  EnrolmentProposalDef,
  ExpiresAtDef,
  type LogRecord,
  LogPageDef,
  PostDeviceListRequestDef,
} from "../src/protocol/wire.js";

export const RELAY_NAME = "relay.test";

/** Rewrites of the relay's answers, by route: what a malicious relay can do. */
export interface Tamper {
  chain?: (chain: DeviceListChain) => DeviceListChain;
  challenge?: (challenge: Challenge) => Challenge;
  bundle?: (bundle: PrekeyBundle) => PrekeyBundle;
  inbox?: (envelopes: InboxEnvelope[]) => InboxEnvelope[];
  offer?: (offer: EnrolmentOffer) => EnrolmentOffer;
  proposal?: (proposal: EnrolmentProposal) => EnrolmentProposal;
  /** The log records of one page, as served. */
  log?: (records: LogRecord[]) => LogRecord[];
  /** Any route: answer this instead (status, body). */
  raw?: (method: string, path: string) => { status: number; body: string; type: string } | null;
}

interface DeviceRecord {
  entry: DeviceEntry;
  accountId: string;
  signedPrekey: SignedPrekey | null;
  lastResort: SignedPrekey | null;
  oneTime: SignedPrekey[];
  inbox: InboxEnvelope[];
}

function problem(status: number, code: string, detail: string): Response {
  return new Response(JSON.stringify({ type: `https://tetherless.dev/problems/${code}`, status, code, detail }), {
    status,
    headers: { "content-type": "application/problem+json" },
  });
}

export class FakeRelay {
  readonly tamper: Tamper = {};
  /** Serve no one-time prekeys (as a relay that ran out): bundles carry the last-resort ML-KEM key only. */
  oneTimePrekeys = true;
  readonly chains = new Map<string, SignedDeviceList[]>();
  private readonly devices = new Map<string, DeviceRecord>();
  private readonly challenges = new Map<string, Challenge>();
  private readonly tokens = new Map<string, string>();
  private nextCursor = 1;
  private nextToken = 1;
  private readonly idempotency = new Map<string, { id: Uint8Array; sent_at_ms: number; duplicate: boolean }>();
  acknowledged = 0;
  /** Enrolment offers by lookup id (hex), with the proposal once one is posted. */
  readonly enrolments = new Map<string, { offer: EnrolmentOffer; proposal: EnrolmentProposal | null }>();
  /** The account log (one account per fake relay is enough for the tests): records in position order. */
  readonly log: LogRecord[] = [];

  readonly fetch = async (url: string, init: RequestInit): Promise<Response> => {
    const { pathname, searchParams } = new URL(url);
    const method = init.method ?? "GET";
    const raw = this.tamper.raw?.(method, pathname);
    if (raw) return new Response(raw.body, { status: raw.status, headers: { "content-type": raw.type } });
    const body = init.body instanceof Uint8Array ? init.body : new Uint8Array(0);
    const ok = <T extends object>(def: StructDef<T>, value: T, status = 200) =>
      new Response(encode(def, value) as Uint8Array<ArrayBuffer>, {
        status,
        headers: { "content-type": "application/vnd.msgpack" },
      });
    const auth = (): DeviceRecord | Response => {
      const header = new Headers(init.headers).get("authorization") ?? "";
      const device = this.tokens.get(header.replace(/^Bearer /, ""));
      return device ? this.devices.get(device)! : problem(401, "invalid_token", "no such token");
    };
    if (method === "GET" && pathname === "/.well-known/tetherless") {
      return ok(WellKnownDef, { relay: RELAY_NAME, relay_key: new Uint8Array(32), api_versions: ["v1", "v2"] });
    }
    if (method === "POST" && pathname === "/v1/accounts") {
      const { signed } = decode(CreateAccountRequestDef, body);
      const device = verifyGenesis(signed);
      const accountId = signed.device_list.account_id;
      if (this.chains.has(accountId)) return problem(409, "account_exists", "exists");
      this.chains.set(accountId, [signed]);
      this.devices.set(device.device_id, {
        entry: device,
        accountId,
        signedPrekey: null,
        lastResort: null,
        oneTime: [],
        inbox: [],
      });
      const address = formatAddress({ account: accountId, device: device.device_id, relay: RELAY_NAME });
      return ok(AccountCreatedDef, { account_id: accountId, device_id: device.device_id, address }, 201);
    }
    const chainMatch = /^\/v1\/accounts\/([a-z2-7]{32})\/devices$/.exec(pathname);
    if (method === "GET" && chainMatch) {
      const versions = this.chains.get(chainMatch[1]!);
      if (!versions) return problem(404, "unknown_account", "no such account");
      const chain = { account_id: chainMatch[1]!, versions: [...versions] };
      return ok(DeviceListChainDef, this.tamper.chain ? this.tamper.chain(chain) : chain);
    }
    if (method === "POST" && chainMatch) {
      // A next version: judged by the same rules as the client (the real relay's are tested in Python).
      const { signed } = decode(PostDeviceListRequestDef, body);
      const versions = this.chains.get(chainMatch[1]!);
      if (!versions) return problem(404, "unknown_account", "no such account");
      const head = versions[versions.length - 1]!.device_list;
      if (signed.device_list.version !== head.version + 1) return problem(409, "device_list_conflict", "stale");
      let change;
      try {
        change = evaluateVersion(head, signed);
      } catch (error) {
        return problem(422, "invalid_device_list", String(error));
      }
      versions.push(signed);
      for (const d of change.added) {
        const record = {
          entry: d,
          accountId: chainMatch[1]!,
          signedPrekey: null,
          lastResort: null,
          oneTime: [],
          inbox: [],
        };
        this.devices.set(d.device_id, record);
      }
      for (const d of change.removed) {
        this.devices.delete(d.device_id);
        for (const [token, device] of this.tokens) if (device === d.device_id) this.tokens.delete(token);
      }
      const accepted = { account_id: chainMatch[1]!, version: signed.device_list.version, list_hash: change.listHash };
      return ok(DeviceListAcceptedDef, accepted, 201);
    }
    if (method === "POST" && pathname === "/v1/enrolments") {
      const offer = decode(EnrolmentOfferDef, body);
      const key = toHex(offer.lookup_id);
      if (this.enrolments.has(key)) return problem(409, "enrolment_used", "used");
      this.enrolments.set(key, { offer, proposal: null });
      return ok(ExpiresAtDef, { expires_at_ms: Date.now() + 600_000 }, 201);
    }
    const proposalMatch = /^\/v1\/enrolments\/([a-z2-7]{16})\/proposal$/.exec(pathname);
    if (method === "GET" && proposalMatch) {
      const enrolment = this.enrolments.get(toHex(fromBase32(proposalMatch[1]!)));
      if (!enrolment) return problem(404, "enrolment_unknown", "no offer");
      if (!enrolment.proposal) return new Response(null, { status: 204 });
      const proposal = this.tamper.proposal ? this.tamper.proposal(enrolment.proposal) : enrolment.proposal;
      return ok(EnrolmentProposalDef, proposal);
    }
    if (method === "POST" && pathname === "/v1/auth/challenge") {
      const { device_id } = decode(ChallengeRequestDef, body);
      if (!this.devices.has(device_id)) return problem(404, "unknown_device", "no such device");
      const challenge: Challenge = {
        relay: RELAY_NAME,
        device_id,
        nonce: globalThis.crypto.getRandomValues(new Uint8Array(32)),
        expires_at_ms: Date.now() + 60_000,
      };
      this.challenges.set(toHex(challenge.nonce), challenge);
      return ok(ChallengeDef, this.tamper.challenge ? this.tamper.challenge(challenge) : challenge);
    }
    if (method === "POST" && pathname === "/v1/auth/session") {
      const request = decode(SessionRequestDef, body);
      const challenge = this.challenges.get(toHex(request.nonce));
      const device = this.devices.get(request.device_id);
      if (!challenge || !device) return problem(401, "challenge_unknown", "unknown nonce");
      this.challenges.delete(toHex(request.nonce));
      try {
        verifyChallengeSignature(device.entry.sign_key, challenge, request.signature);
      } catch {
        return problem(401, "bad_signature", "signature does not verify");
      }
      const token = `tok${this.nextToken++}`;
      this.tokens.set(token, request.device_id);
      return ok(AuthSessionDef, {
        token,
        account_id: device.accountId,
        device_id: request.device_id,
        expires_at_ms: Date.now() + 3_600_000,
      });
    }
    const me = auth();
    if (me instanceof Response) return me;
    if (method === "PUT" && pathname === "/v1/prekeys") {
      const upload = decode(PrekeyUploadDef, body);
      me.signedPrekey = upload.signed_prekey ?? me.signedPrekey;
      me.lastResort = upload.last_resort ?? me.lastResort;
      me.oneTime.push(...upload.one_time);
      return ok(PrekeyCountsDef, {
        x25519_one_time: me.oneTime.filter((k) => k.kind === "x25519-one-time").length,
        mlkem_one_time: me.oneTime.filter((k) => k.kind === "mlkem768-one-time").length,
        signed_prekey_id: me.signedPrekey?.key_id ?? null,
        last_resort_id: me.lastResort?.key_id ?? null,
      });
    }
    if (method === "POST" && pathname === "/v1/prekeys/claim") {
      const { devices } = decode(ClaimPrekeysRequestDef, body);
      const bundles: PrekeyBundle[] = [];
      const missing: string[] = [];
      for (const address of devices) {
        const target = this.devices.get(parseAddress(address).device);
        if (!target || !target.signedPrekey || !target.lastResort) {
          missing.push(address);
          continue;
        }
        const take = (kind: string) => {
          if (!this.oneTimePrekeys) return null;
          const i = target.oneTime.findIndex((k) => k.kind === kind);
          return i < 0 ? null : target.oneTime.splice(i, 1)[0]!;
        };
        const bundle: PrekeyBundle = {
          address,
          identity_key: target.entry.box_key,
          signed_prekey: target.signedPrekey,
          pq_prekey: take("mlkem768-one-time") ?? target.lastResort,
          one_time_prekey: take("x25519-one-time"),
        };
        bundles.push(this.tamper.bundle ? this.tamper.bundle(bundle) : bundle);
      }
      return ok(ClaimPrekeysResponseDef, { bundles, missing });
    }
    if (method === "POST" && pathname === "/v1/messages") {
      const { envelopes } = decode(SendRequestDef, body);
      const accepted = envelopes.map((e) => {
        // Idempotent per (sender device, idempotency key), as the real relay (docs/protocol.md "Sending").
        const key = `${me.entry.device_id}/${toHex(e.idempotency_key)}`;
        const seen = this.idempotency.get(key);
        if (seen) return { ...seen, duplicate: true };
        const target = this.devices.get(parseAddress(e.recipient).device)!;
        const id = globalThis.crypto.getRandomValues(new Uint8Array(16));
        const sent = Date.now();
        target.inbox.push({
          cursor: this.nextCursor++,
          id,
          sent_at_ms: sent,
          expires_at_ms: sent + 1,
          ciphertext: e.ciphertext,
        });
        const receipt = { id, sent_at_ms: sent, duplicate: false };
        this.idempotency.set(key, receipt);
        return receipt;
      });
      return ok(SendResponseDef, { accepted }, 201);
    }
    if (method === "GET" && pathname === "/v1/inbox") {
      const after = Number(searchParams.get("after") ?? "0");
      const page = me.inbox.filter((e) => e.cursor > after);
      const envelopes = this.tamper.inbox ? this.tamper.inbox(page) : page;
      const next = page.length ? page[page.length - 1]!.cursor : after;
      return ok(InboxPageDef, { envelopes, next_cursor: next, more: false });
    }
    if (method === "POST" && pathname === "/v1/inbox/ack") {
      const request = decode(AckRequestDef, body);
      const before = me.inbox.length;
      me.inbox = me.inbox.filter((e) => e.cursor > (request.up_to ?? -1));
      this.acknowledged += before - me.inbox.length;
      return ok(AckResponseDef, { acknowledged: before - me.inbox.length });
    }
    const offerMatch = /^\/v1\/enrolments\/([a-z2-7]{16})$/.exec(pathname);
    if (method === "GET" && offerMatch) {
      const enrolment = this.enrolments.get(toHex(fromBase32(offerMatch[1]!)));
      if (!enrolment) return problem(404, "enrolment_unknown", "no offer");
      if (enrolment.proposal) return problem(409, "enrolment_used", "used");
      return ok(EnrolmentOfferDef, this.tamper.offer ? this.tamper.offer(enrolment.offer) : enrolment.offer);
    }
    if (method === "POST" && proposalMatch) {
      const enrolment = this.enrolments.get(toHex(fromBase32(proposalMatch[1]!)));
      if (!enrolment) return problem(404, "enrolment_unknown", "no offer");
      if (enrolment.proposal) return problem(409, "enrolment_used", "used");
      enrolment.proposal = decode(EnrolmentProposalDef, body);
      return ok(ExpiresAtDef, { expires_at_ms: Date.now() + 600_000 }, 201);
    }
    if (method === "GET" && pathname === "/v1/log") {
      const after = Number(searchParams.get("after") ?? "0");
      const records = this.log.filter((r) => r.position > after);
      const served = this.tamper.log ? this.tamper.log(records) : records;
      const head = this.log.length;
      return ok(LogPageDef, { records: served, next_after: head, head, horizon: 0, more: false });
    }
    if (method === "POST" && pathname === "/v1/log") {
      const request = decode(AppendRequestDef, body);
      if (request.expected_head !== null && request.expected_head !== this.log.length) {
        return problem(409, "log_conflict", "the head moved");
      }
      const results = request.records.map((r) => {
        const existing = this.log.find((x) => toHex(x.record_id) === toHex(r.record_id));
        if (existing) return { record_id: r.record_id, position: existing.position, duplicate: true };
        const position = this.log.length + 1;
        this.log.push({ ...r, position, committed_at_ms: Date.now(), size: r.ciphertext.length });
        return { record_id: r.record_id, position, duplicate: false };
      });
      return ok(AppendResponseDef, { head: this.log.length, results }, 201);
    }
    return problem(404, "not_found", `${method} ${pathname}`);
  };
}
