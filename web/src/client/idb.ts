/**
 * The browser's IndexedDB behind {@link StateBackend}, and the non-extractable key that seals the state
 * (persist.ts). One database `tetherless`, one object store `device` with two records: `key` (the
 * `CryptoKey` itself: IndexedDB stores a non-extractable key by structured clone, its bytes stay out of
 * the page's reach) and `state` (the sealed state). Nothing goes to localStorage.
 */
import type { StateBackend } from "./persist.js";

const DB_NAME = "tetherless";
const STORE = "device";
const KEY_RECORD = "key";
const STATE_RECORD = "state";

function done<T>(request: IDBRequest<T>): Promise<T> {
  return new Promise((resolve, reject) => {
    request.onsuccess = () => resolve(request.result);
    request.onerror = () => reject(request.error ?? new Error("IndexedDB request failed"));
  });
}

function completed(tx: IDBTransaction): Promise<void> {
  return new Promise((resolve, reject) => {
    tx.oncomplete = () => resolve();
    tx.onerror = () => reject(tx.error ?? new Error("IndexedDB transaction failed"));
    tx.onabort = () => reject(tx.error ?? new Error("IndexedDB transaction aborted"));
  });
}

function openDb(): Promise<IDBDatabase> {
  const request = indexedDB.open(DB_NAME, 1);
  request.onupgradeneeded = () => request.result.createObjectStore(STORE);
  return done(request);
}

/** The device's IndexedDB: the sealing key (created on first use, non-extractable) and the sealed state. */
export class IdbBackend implements StateBackend {
  private constructor(
    private readonly db: IDBDatabase,
    readonly key: CryptoKey,
  ) {}

  /**
   * Open the database; create the AES-256-GCM key when there is none (`extractable: false`). Throws the
   * browser's `DOMException` when IndexedDB or WebCrypto is unavailable (a private window may refuse).
   */
  static async open(): Promise<IdbBackend> {
    const db = await openDb();
    const tx = db.transaction(STORE, "readonly");
    const stored: unknown = await done(tx.objectStore(STORE).get(KEY_RECORD));
    if (stored instanceof CryptoKey) return new IdbBackend(db, stored);
    const key = await crypto.subtle.generateKey({ name: "AES-GCM", length: 256 }, false, ["encrypt", "decrypt"]);
    // `add`, not `put`: if another context created a key meanwhile, this fails instead of orphaning its state.
    const write = db.transaction(STORE, "readwrite", { durability: "strict" });
    write.objectStore(STORE).add(key, KEY_RECORD);
    await completed(write);
    return new IdbBackend(db, key);
  }

  async load(): Promise<Uint8Array | null> {
    const tx = this.db.transaction(STORE, "readonly");
    const value: unknown = await done(tx.objectStore(STORE).get(STATE_RECORD));
    return value instanceof Uint8Array ? value : null;
  }

  /** Resolves when the transaction completed with strict durability (flushed, not only queued). */
  async save(sealed: Uint8Array): Promise<void> {
    const tx = this.db.transaction(STORE, "readwrite", { durability: "strict" });
    tx.objectStore(STORE).put(sealed, STATE_RECORD);
    await completed(tx);
  }
}

/**
 * Ask the browser not to evict this origin's storage under pressure (`navigator.storage.persist()`).
 * Resolves whether it was granted (Chromium decides by engagement; false is not an error). Never throws.
 */
export async function requestPersistence(): Promise<boolean> {
  try {
    return (await navigator.storage?.persist?.()) ?? false;
  } catch {
    return false;
  }
}
