// Compile web/test/*.test.ts into web/build/test/ for `node --test` (one bundle per test file), and the browser
// benchmark's page script (test/bench/bench.ts, driven by bench/browser.py) into web/build/bench/bench.mjs. The
// interop peer (test/interop/peer.ts) is built by test/interop/build.mjs, once per pytest session, into a
// directory of its own, so this script and the peer tests never write the same files.
import { build } from "esbuild";
import { readdir, rm } from "node:fs/promises";
import { dirname, join } from "node:path";
import { fileURLToPath } from "node:url";
import { buildBench } from "../test/bench/build.mjs";
import { esbuildBase } from "./common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..");
const out = join(root, "build", "test");
const tests = (await readdir(join(root, "test"))).filter((name) => name.endsWith(".test.ts")).sort();

await rm(out, { recursive: true, force: true });
await build({
  ...esbuildBase,
  absWorkingDir: root,
  entryPoints: tests.map((name) => `test/${name}`),
  outdir: out,
  outExtension: { ".js": ".mjs" },
  platform: "node",
  packages: "external",
});

await rm(join(root, "build", "bench"), { recursive: true, force: true });
await buildBench(join(root, "build", "bench"));
