// A request without an answer (src/client/http.ts, errors.ts): a TransportError whose message keeps the technical
// detail (the request and the platform's reason) and whose `offline` says whether the platform reported no
// network at the time — the app words the two cases differently (tests/web/test_browser_offline.py,
// test_browser_messages.py check the words in Chromium).
import assert from "node:assert/strict";
import { afterEach, describe, it } from "node:test";
import { RelayApi, TransportError } from "../src/client/index.js";

const failing = () => Promise.reject(new TypeError("Failed to fetch"));
const original = Object.getOwnPropertyDescriptor(globalThis, "navigator");

function setNavigator(value: unknown): void {
  Object.defineProperty(globalThis, "navigator", { value, configurable: true, writable: true });
}

describe("transport errors", () => {
  afterEach(() => {
    if (original) Object.defineProperty(globalThis, "navigator", original);
    else delete (globalThis as { navigator?: unknown }).navigator;
  });

  async function failure(): Promise<TransportError> {
    const error = await new RelayApi("http://relay.invalid", failing).challenge("a".repeat(32)).catch((e) => e);
    assert.ok(error instanceof TransportError);
    return error;
  }

  it("keep the request and the platform's reason in the message", async () => {
    setNavigator({ onLine: true });
    const error = await failure();
    assert.equal(error.message, "POST /v1/auth/challenge: Failed to fetch");
    assert.equal(error.offline, false);
  });

  it("say offline only when the platform reports no network", async () => {
    setNavigator({ onLine: false });
    assert.equal((await failure()).offline, true);
    setNavigator({});
    assert.equal((await failure()).offline, false); // no onLine (Node): not known to be offline
    setNavigator(undefined);
    assert.equal((await failure()).offline, false);
  });
});
