/**
 * The browser's IndexedDB behind {@link StateBackend}, and the non-extractable key that seals the state
 * (persist.ts). One database `tetherless`, one object store `device` with two records: `key` (the
 * `CryptoKey` itself: IndexedDB stores a non-extractable key by structured clone, its bytes stay out of
 * the page's reach) and `state` (the sealed state). Nothing goes to localStorage.
 */
import type { OutboxBackend } from "./outbox.js";
import type { StateBackend } from "./persist.js";

/** The one database this client keeps in a browser profile (sign-out deletes it: {@link wipeBrowserDevice}). */
export const DB_NAME = "tetherless";
const DB_VERSION = 2; // 2: the object store `outbox` (outbox.ts), one sealed record per queued message
const STORE = "device";
const OUTBOX = "outbox";
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
  const request = indexedDB.open(DB_NAME, DB_VERSION);
  // From any older version (0: new; 1: `device` only) add what is missing; existing records stay.
  request.onupgradeneeded = () => {
    const db = request.result;
    for (const name of [STORE, OUTBOX]) if (!db.objectStoreNames.contains(name)) db.createObjectStore(name);
  };
  return done(request);
}

/**
 * The device's IndexedDB: the sealing key (created on first use, non-extractable), the sealed state and the
 * sealed outbox entries (outbox.ts).
 */
export class IdbBackend implements StateBackend, OutboxBackend {
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

  async loadOutbox(): Promise<(readonly [string, Uint8Array])[]> {
    const store = this.db.transaction(OUTBOX, "readonly").objectStore(OUTBOX);
    const [keys, values] = await Promise.all([done(store.getAllKeys()), done(store.getAll())]);
    return keys.flatMap((key, i) => {
      const value: unknown = values[i];
      return typeof key === "string" && value instanceof Uint8Array ? [[key, value] as const] : [];
    });
  }

  async saveOutboxEntry(id: string, sealed: Uint8Array): Promise<void> {
    const tx = this.db.transaction(OUTBOX, "readwrite", { durability: "strict" });
    tx.objectStore(OUTBOX).put(sealed, id);
    await completed(tx);
  }

  async deleteOutboxEntry(id: string): Promise<void> {
    const tx = this.db.transaction(OUTBOX, "readwrite", { durability: "strict" });
    tx.objectStore(OUTBOX).delete(id);
    await completed(tx);
  }

  /** Close the connection (a database with an open connection cannot be deleted). Idempotent. */
  close(): void {
    this.db.close();
  }
}

/**
 * Sign-out on a shared computer: delete the whole database (the non-extractable key with it, so any copy of
 * the sealed records is useless), every Cache Storage cache of this origin (the service worker's shell) and
 * the service worker's registration. Call with every connection closed ({@link IdbBackend.close}); rejects
 * when another tab still holds one open (it is then "blocked": nothing is deleted until that tab closes).
 * Idempotent. It does not touch the relay: the device stays in its account's list (web/README.md).
 */
export async function wipeBrowserDevice(): Promise<void> {
  // The worker first: an installing worker must not fill a cache after it was deleted.
  const registrations = (await navigator.serviceWorker?.getRegistrations()) ?? [];
  await Promise.all(registrations.map((registration) => registration.unregister()));
  if (globalThis.caches) for (const name of await caches.keys()) await caches.delete(name);
  await new Promise<void>((resolve, reject) => {
    const request = indexedDB.deleteDatabase(DB_NAME);
    request.onsuccess = () => resolve();
    request.onerror = () => reject(request.error ?? new Error("IndexedDB refused to delete the database"));
    request.onblocked = () => reject(new Error("another tab still has this device open: close it and sign out again"));
  });
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
