// Prints the size of the SDK bundled and minified with esbuild (what a web app ships):
// the client entry point, everything it imports, tree-shaken; gzip size too.
import { build } from "esbuild";
import { gzipSync } from "node:zlib";

const result = await build({
  entryPoints: ["src/index.ts"],
  bundle: true,
  minify: true,
  format: "esm",
  target: "es2020",
  write: false,
});
const bytes = result.outputFiles[0].contents;
const kb = (n) => (n / 1024).toFixed(1);
console.log(`bundle (minified, esm): ${bytes.length} bytes = ${kb(bytes.length)} KiB; gzip ${gzipSync(bytes).length} bytes = ${kb(gzipSync(bytes).length)} KiB`);
