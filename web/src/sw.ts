/**
 * The service worker: the app shell offline (issue 16 item 3). It caches exactly the shell files of one build
 * (index.html at the scope's root, app.js, styles.css) under a cache named after that build's content hash,
 * and answers them cache-first; everything else — the relay's API above all — is left to the network: no
 * answer of the relay, no token and no message is ever put in a cache.
 *
 * Updates: scripts/build.mjs writes the hash into this file, so a new build is a byte-different sw.js; the
 * browser installs it on the next visit, it caches the new shell under the new name, takes over at once
 * (the shell is one script, so an open page never mixes two builds' files) and deletes the older caches.
 * Sign-out (src/app/main.ts) unregisters it and deletes the caches.
 *
 * Type-checked against the DOM library (tsconfig.json), so the few worker types it uses are declared here.
 */
export {};

/** The build's content hash and the shell's paths relative to the scope (scripts/build.mjs defines them). */
declare const __SHELL_VERSION__: string;
declare const __SHELL_FILES__: readonly string[];

interface ExtendableEvent extends Event {
  waitUntil(promise: Promise<unknown>): void;
}
interface FetchEvent extends ExtendableEvent {
  readonly request: Request;
  respondWith(response: Promise<Response>): void;
}
interface WorkerScope {
  readonly registration: { readonly scope: string };
  readonly clients: { claim(): Promise<void> };
  skipWaiting(): Promise<void>;
  addEventListener(type: "install" | "activate", listener: (event: ExtendableEvent) => void): void;
  addEventListener(type: "fetch", listener: (event: FetchEvent) => void): void;
}

const worker = self as unknown as WorkerScope;
/** Every cache this worker makes starts with this; activation deletes the older builds' ones. */
const CACHE_PREFIX = "tetherless-shell-";
const CACHE = CACHE_PREFIX + __SHELL_VERSION__;
const scope = new URL(worker.registration.scope);
/** Absolute URLs (no query) of the shell; the scope's root is index.html. */
const SHELL = new Set(__SHELL_FILES__.map((file) => new URL(file, scope).href));

worker.addEventListener("install", (event) => {
  // `reload`: fetch from the relay, not the HTTP cache, so the cache holds this build's files and no older one.
  const requests = [...SHELL].map((url) => new Request(url, { cache: "reload" }));
  event.waitUntil(
    caches
      .open(CACHE)
      .then((cache) => cache.addAll(requests))
      .then(() => worker.skipWaiting()),
  );
});

worker.addEventListener("activate", (event) => {
  event.waitUntil(
    caches
      .keys()
      .then((names) =>
        Promise.all(names.filter((n) => n.startsWith(CACHE_PREFIX) && n !== CACHE).map((n) => caches.delete(n))),
      )
      .then(() => worker.clients.claim()),
  );
});

/** The cached shell file `request` asks for, or null when the network must answer it. */
function shellUrl(request: Request): string | null {
  if (request.method !== "GET") return null;
  const url = new URL(request.url);
  if (url.origin !== scope.origin) return null;
  // Opening the app (a navigation to the scope's root, with any query) is the shell's index.
  if (request.mode === "navigate" && url.pathname === scope.pathname) return scope.href;
  if (url.search) return null;
  return SHELL.has(url.href) ? url.href : null;
}

worker.addEventListener("fetch", (event) => {
  const url = shellUrl(event.request);
  if (url === null) return; // not answered here: the browser asks the network as if there were no worker
  event.respondWith(
    caches
      .open(CACHE)
      .then((cache) => cache.match(url))
      .then((hit) => hit ?? fetch(event.request)),
  );
});
