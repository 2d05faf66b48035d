// Options shared by the app build and the test build: one place decides how TypeScript becomes JavaScript.
export const esbuildBase = {
  bundle: true,
  format: "esm",
  target: "es2022",
  charset: "utf8",
  legalComments: "none",
  logLevel: "warning",
  // No timestamps, hashes of paths or absolute paths in the output: the same sources and lock file give
  // the same bytes on every machine (tests/web/test_node_vectors.py checks it).
  sourcemap: false,
};
