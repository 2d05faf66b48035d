// Bundle the Node peer (test/interop/peer.ts: the TypeScript client driven over stdin by tests/web/) into one
// self-contained file, its npm packages included, so it runs from any directory. tests/web/conftest.py runs
// `node test/interop/build.mjs DIR` into a directory of the test session's own: a test never races
// `npm test` (scripts/build-tests.mjs empties build/) or another worker over a shared output.
import { build } from "esbuild";
import { dirname, join } from "node:path";
import { fileURLToPath, pathToFileURL } from "node:url";
import { esbuildBase } from "../../scripts/common.mjs";

const root = join(dirname(fileURLToPath(import.meta.url)), "..", "..");

/** Write `outdir`/peer.mjs. */
export async function buildPeer(outdir) {
  await build({
    ...esbuildBase,
    absWorkingDir: root,
    entryPoints: ["test/interop/peer.ts"],
    outfile: join(outdir, "peer.mjs"),
    platform: "node",
  });
}

if (process.argv[1] && import.meta.url === pathToFileURL(process.argv[1]).href) {
  await buildPeer(process.argv[2] ?? join(root, "build", "interop"));
}
