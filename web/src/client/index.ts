/**
 * The browser client's network layer, DOM-free: the relay API over `fetch` ({@link RelayApi}), its errors,
 * the local state interface with an in-memory store and a sealed persistent one (IndexedDB in the browser),
 * and a device ({@link TetherlessClient}).
 */
export * from "./client.js";
export * from "./errors.js";
export * from "./http.js";
export * from "./store.js";
export * from "./idb.js";
export * from "./persist.js";
export * from "./outbox.js";
export * from "./blobs.js";
