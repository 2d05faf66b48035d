// A Tetherless device in Node for the differential test (tests/web/test_node_client.py): the TypeScript
// client (src/client) against a real relay, driven by JSON lines on stdin, one JSON line answered on stdout
// per command. State lives in memory for the life of the process.
//
//   {"cmd": "create", "relay": URL}          → {"ok": true, "address": …, "account_id": …}
//   {"cmd": "send", "to": ADDRESS, "text": T} → {"ok": true, "envelopes": n}
//   {"cmd": "receive"}                        → {"ok": true, "messages": [{sender, text, content_type, pair_seq}], "refused": [...]}
//   {"cmd": "chain", "account": ID}           → {"ok": true, "version": n, "devices": [{device_id, role, kem_key: bool}]}
// Errors answer {"ok": false, "error": NAME, "code": CODE, "message": …} and the peer keeps running.
import { createInterface } from "node:readline";
import { fromUtf8, utf8 } from "../../src/protocol/bytes.js";
import { TetherlessError } from "../../src/protocol/errors.js";
import { MemoryStore, RelayApi, RelayError, TetherlessClient } from "../../src/client/index.js";

let client: TetherlessClient | null = null;
const need = () => {
  if (!client) throw new Error("create first");
  return client;
};

async function handle(command: Record<string, unknown>): Promise<Record<string, unknown>> {
  switch (command.cmd) {
    case "create": {
      client = new TetherlessClient(new RelayApi(String(command.relay)), new MemoryStore());
      const me = await client.createAccount();
      await client.login();
      await client.publishPrekeys();
      return { address: me.address, account_id: me.accountId, device_id: me.deviceId };
    }
    case "send": {
      const sent = await need().send(String(command.to), "text/plain; charset=utf-8", utf8(String(command.text)));
      return { envelopes: sent.length };
    }
    case "receive": {
      const { received, refused } = await need().receive();
      return {
        messages: received.map((m) => ({
          sender: m.sender,
          content_type: m.contentType,
          pair_seq: m.pairSeq,
          text: fromUtf8(m.body),
        })),
        refused: refused.map((r) => ({ code: r.code, detail: r.detail })),
      };
    }
    case "chain": {
      const { version, devices } = await need().verifiedDevices(String(command.account));
      return {
        version,
        devices: devices.map((d) => ({ device_id: d.device_id, role: d.role, kem_key: d.kem_key.length > 0 })),
      };
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
