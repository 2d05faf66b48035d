// Build the app shell into web/dist/ (committed; deterministic: same sources + lock file -> same bytes).
import { build } from "esbuild";
import { createHash } from "node:crypto";
import { copyFile, mkdir, readFile, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { esbuildBase } from "./common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = process.argv[2] ?? join(root, "dist");
const pkg = JSON.parse(await readFile(join(root, "package.json"), "utf8"));

await rm(out, { recursive: true, force: true });
await mkdir(out, { recursive: true });
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["src/app/main.ts"],
  outfile: join(out, "app.js"),
  platform: "browser",
  minify: true,
  define: { __TETHERLESS_WEB_VERSION__: JSON.stringify(pkg.version) },
});
for (const file of ["index.html", "styles.css"]) await copyFile(join(root, "src/app", file), join(out, file));

// The service worker caches the shell under a name from the shell's content hash: a new build of any shell
// file is a new sw.js, which the browser installs in place of the old one (src/sw.ts). "./" is index.html.
const shell = ["app.js", "index.html", "styles.css"];
const hash = createHash("sha256");
for (const file of shell) {
  const body = await readFile(join(out, file));
  hash.update(`${file}\0${body.length}\0`).update(body);
}
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["src/sw.ts"],
  outfile: join(out, "sw.js"),
  platform: "browser",
  format: "iife", // a classic worker script: module workers are not in every browser yet
  minify: true,
  define: {
    __SHELL_VERSION__: JSON.stringify(hash.digest("hex").slice(0, 16)),
    __SHELL_FILES__: JSON.stringify(["./", ...shell.map((file) => `./${file}`)]),
  },
});

// The protocol and client code must stay browser-clean (no Node built-ins): bundle them for the browser,
// write nothing.
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: ["src/protocol/index.ts", "src/client/index.ts"],
  outdir: join(out, "unused"),
  platform: "browser",
  write: false,
});
