// Tetherless devices in Node for the Python ↔ TypeScript tests (tests/web/test_node_client.py,
// tests/web/test_differential.py): the TypeScript client (src/client) against a real relay, driven by JSON
// lines on stdin, one JSON line answered on stdout per command. Devices are named by `device` (default
// "default"); their state lives in memory for the life of the process. Bytes travel as lowercase hex.
//
// Devices and messages:
//   {"cmd": "create", "relay": URL}                 → {address, account_id, device_id}
//   {"cmd": "link_start", "relay": URL}             → {code, fingerprint, device_id}; joins in the background
//   {"cmd": "link_finish"}                          → {address, account_id, device_id} once the link finished
//   {"cmd": "approve", "code": CODE}                → {fingerprint, device_id, version}: propose the version adding it
//   {"cmd": "send", "to": ADDRESS, "text": T}       → {envelopes: n, message_id, envelope_ids}
//   {"cmd": "seal", "to": ADDRESS, "text": T}       → {message_id, pair_seq, envelopes}: sealed into the outbox, not posted
//   {"cmd": "post_reversed"}                        → {posted: n}: the outbox's envelopes posted newest message first
//   {"cmd": "flush"}                                → {sent: [{recipient, envelope_id, duplicate}]}: client.flushOutbox
//   {"cmd": "receive", "reverse": bool}             → {messages: [...], refused: [{code, detail}]}; `reverse`: every
//                                                     inbox page handed to the client backwards (a reordering relay)
//   {"cmd": "chain", "account": ID}                 → {version, devices: [...], versions: [{version, list_hash, encoded}]}
//   {"cmd": "messages"}                             → {messages: [{direction, peer, message_id, sent_at_ms, text}]}
// The account log (src/client/logsync.ts):
//   {"cmd": "log_sync"}                             → {added: [...], warnings: [{code, detail}], appended, waiting}
//   {"cmd": "log_pending"}                          → {records: [{record_id, plaintext}]}: queued, not appended yet
// Pure functions, for byte-level comparison with the Python code:
//   {"cmd": "open_record", key, ciphertext, writers: {device_id: sign_key}, account_id, record_id, epoch, kind}
//                                                   → {plaintext: its fields, encoded: LogPlaintext re-encoded}
//   {"cmd": "verify_chain", "account": ID, "chain": HEX} → {version, mark, encoded: [each version re-encoded]}
// Errors answer {"ok": false, "error": NAME, "code": CODE, "message": …} and the peer keeps running.
import { createInterface } from "node:readline";
import { fromHex, fromUtf8, toHex, utf8 } from "../../src/protocol/bytes.js";
import { decode, encode } from "../../src/protocol/codec.js";
import { listHash, verifyChain } from "../../src/protocol/deviceList.js";
import { TetherlessError } from "../../src/protocol/errors.js";
import { type Kind, LogPlaintextDef, openSignedRecord } from "../../src/protocol/log.js";
import {
  type DeviceListChain,
  DeviceListChainDef,
  type InboxPage,
  SignedDeviceListDef,
} from "../../src/protocol/messages.js";
import { MemoryStore, RelayApi, RelayError, type StoredMessage, TetherlessClient } from "../../src/client/index.js";
import {
  approveOffer,
  fetchOffer,
  finishLink,
  startLink,
  verifyProposal,
  waitForProposal,
} from "../../src/client/linking.js";
import { LogSync } from "../../src/client/logsync.js";

const TEXT = "text/plain; charset=utf-8";

/** The relay API, optionally handing every inbox page over backwards: a relay that reorders is allowed to. */
class ReorderingApi extends RelayApi {
  reverse = false;

  override async inbox(after: number, limit?: number): Promise<InboxPage> {
    const page = await super.inbox(after, limit);
    return this.reverse ? { ...page, envelopes: [...page.envelopes].reverse() } : page;
  }
}

interface Device {
  readonly api: ReorderingApi;
  readonly store: MemoryStore;
  readonly client: TetherlessClient;
  /** A link in progress (link_start → link_finish). */
  joining?: Promise<void>;
}

const devices = new Map<string, Device>();

function newDevice(name: string, relay: string): Device {
  const api = new ReorderingApi(relay);
  const store = new MemoryStore();
  const device = { api, store, client: new TetherlessClient(api, store) };
  devices.set(name, device);
  return device;
}

function need(name: string): Device {
  const device = devices.get(name);
  if (!device) throw new Error(`no device ${JSON.stringify(name)}: create or link it first`);
  return device;
}

/** `value` with every byte string as hex (and nested structures alike): what JSON can carry. */
function plain(value: unknown): unknown {
  if (value instanceof Uint8Array) return toHex(value);
  if (typeof value === "bigint") return value.toString();
  if (Array.isArray(value)) return value.map(plain);
  if (value instanceof Map) return Object.fromEntries([...value].map(([k, v]) => [String(k), plain(v)]));
  if (value !== null && typeof value === "object") {
    return Object.fromEntries(Object.entries(value).map(([k, v]) => [k, plain(v)]));
  }
  return value;
}

function shown(m: StoredMessage): Record<string, unknown> {
  return {
    direction: m.direction,
    peer: m.peer,
    message_id: toHex(m.messageId),
    sent_at_ms: m.sentAtMs,
    content_type: m.contentType,
    text: fromUtf8(m.body),
  };
}

function identityOf(device: Device): Record<string, unknown> {
  const me = device.client.identity;
  return { address: me.address, account_id: me.accountId, device_id: me.deviceId };
}

function chainView(chain: DeviceListChain, accountId: string): Record<string, unknown> {
  const verified = verifyChain(chain, accountId);
  return {
    version: verified.head.version,
    mark: [verified.mark[0], toHex(verified.mark[1])],
    devices: verified.devices.map((d) => ({ device_id: d.device_id, role: d.role, kem_key: d.kem_key.length > 0 })),
    versions: chain.versions.map((v) => ({
      version: v.device_list.version,
      list_hash: toHex(listHash(v.device_list)),
      encoded: toHex(encode(SignedDeviceListDef, v)),
    })),
  };
}

async function handle(command: Record<string, unknown>): Promise<Record<string, unknown>> {
  const name = typeof command.device === "string" ? command.device : "default";
  switch (command.cmd) {
    case "create": {
      const device = newDevice(name, String(command.relay));
      await device.client.createAccount();
      await device.client.login();
      await device.client.publishPrekeys();
      return identityOf(device);
    }
    case "link_start": {
      const device = newDevice(name, String(command.relay));
      const pending = await startLink(device.api, device.store);
      device.joining = (async () => {
        const proposal = await waitForProposal(device.api, pending, { pollMs: 100 });
        await finishLink(device.api, device.store, pending, await verifyProposal(device.api, pending, proposal));
        await device.client.login();
        await device.client.publishPrekeys();
      })();
      device.joining.catch(() => undefined); // awaited (and reported) by link_finish
      return { code: pending.code, fingerprint: pending.fingerprint, device_id: pending.deviceId };
    }
    case "link_finish": {
      const device = need(name);
      if (!device.joining) throw new Error("no link in progress");
      await device.joining;
      return identityOf(device);
    }
    case "approve": {
      const { api, store, client } = need(name);
      await client.login();
      const checked = await fetchOffer(api, client.identity, String(command.code));
      const dl = await approveOffer(api, store, client.identity, checked);
      return { fingerprint: checked.fingerprint, device_id: checked.deviceId, version: dl.version };
    }
    case "send": {
      const { client } = need(name);
      const sent = await client.send(String(command.to), TEXT, utf8(String(command.text)));
      const out = client.store.messages().filter((m) => m.direction === "out");
      return {
        envelopes: sent.length,
        message_id: toHex(out[out.length - 1]!.messageId),
        envelope_ids: sent.map((s) => toHex(s.envelopeId)),
      };
    }
    case "seal": {
      const { client, store } = need(name);
      const messageId = globalThis.crypto.getRandomValues(new Uint8Array(16));
      const entry = await client.seal(String(command.to), TEXT, utf8(String(command.text)), {
        messageId,
        sentAtMs: Date.now(),
      });
      if (!entry) throw new Error("not sealed");
      return { message_id: toHex(messageId), pair_seq: entry.pairSeq, envelopes: store.outbox().length };
    }
    case "post_reversed": {
      // The relay receives the newest message first; the outbox entries stay, for `flush` to finish them.
      const { api, store } = need(name);
      const entries = [...store.outbox()].reverse();
      for (const entry of entries) await api.send([...entry.envelopes]);
      return { posted: entries.length };
    }
    case "flush": {
      const sent = await need(name).client.flushOutbox();
      return {
        sent: sent.map((s) => ({ recipient: s.recipient, envelope_id: toHex(s.envelopeId), duplicate: s.duplicate })),
      };
    }
    case "receive": {
      const { api, client } = need(name);
      api.reverse = command.reverse === true;
      try {
        const { received, refused } = await client.receive();
        return {
          messages: received.map((m) => ({
            sender: m.sender,
            content_type: m.contentType,
            pair_seq: m.pairSeq,
            message_id: toHex(m.messageId),
            sent_at_ms: m.sentAtMs,
            relay_sent_at_ms: m.relaySentAtMs,
            envelope_id: toHex(m.envelopeId),
            text: fromUtf8(m.body),
          })),
          refused: refused.map((r) => ({ code: r.code, detail: r.detail })),
        };
      } finally {
        api.reverse = false;
      }
    }
    case "chain": {
      const { api, client } = need(name);
      const account = String(command.account);
      const { version, devices: listed } = await client.verifiedDevices(account);
      return {
        ...chainView(await api.deviceChain(account), account),
        version,
        devices: listed.map((d) => ({ device_id: d.device_id, role: d.role, kem_key: d.kem_key.length > 0 })),
      };
    }
    case "messages":
      return { messages: need(name).store.messages().map(shown) };
    case "log_sync": {
      const { api, store, client } = need(name);
      await client.login();
      const log = new LogSync(api, store);
      const result = await log.sync();
      const { appended, waitingForKey } = await log.appendPending();
      return {
        added: result.added.map(shown),
        warnings: result.warnings.map((w) => ({ code: w.code, detail: w.detail })),
        appended,
        waiting: waitingForKey || result.waitingForKey,
      };
    }
    case "log_pending":
      return {
        records: need(name)
          .store.logPending()
          .map((e) => ({ record_id: toHex(e.recordId), plaintext: plain(e.plaintext) })),
      };
    case "open_record": {
      const writers = new Map(
        Object.entries(command.writers as Record<string, string>).map(([id, key]) => [id, fromHex(key)]),
      );
      const plaintext = openSignedRecord(fromHex(String(command.key)), fromHex(String(command.ciphertext)), writers, {
        accountId: String(command.account_id),
        recordId: fromHex(String(command.record_id)),
        epoch: Number(command.epoch),
        kind: String(command.kind ?? "event") as Kind,
      });
      return { plaintext: plain(plaintext), encoded: toHex(encode(LogPlaintextDef, plaintext)) };
    }
    case "verify_chain": {
      const chain = decode(DeviceListChainDef, fromHex(String(command.chain)));
      return chainView(chain, String(command.account));
    }
    default:
      throw new Error(`unknown command ${JSON.stringify(command.cmd)}`);
  }
}

const lines = createInterface({ input: process.stdin });
for await (const line of lines) {
  if (!line.trim()) continue;
  let answer: Record<string, unknown>;
  try {
    answer = { ok: true, ...(await handle(JSON.parse(line) as Record<string, unknown>)) };
  } catch (error) {
    const code = error instanceof TetherlessError || error instanceof RelayError ? error.code : null;
    const name = error instanceof Error ? error.name : "Error";
    answer = { ok: false, error: name, code, message: error instanceof Error ? error.message : String(error) };
  }
  process.stdout.write(`${JSON.stringify(answer)}\n`);
}
