// Bundles the SDK with esbuild into dist/tether.min.js (one ES module, minified, private
// members renamed: they all start with `_`) and prints its size, gzipped too, beside the
// size a consumer's bundler gets from dist/ without renaming private members.
//
//   node scripts/bundle.mjs           writes dist/tether.min.js and prints the sizes
//   node scripts/bundle.mjs --check   prints the sizes only
import { build } from "esbuild";
import { mkdirSync, writeFileSync } from "node:fs";
import { gzipSync } from "node:zlib";

const options = { entryPoints: ["src/index.ts"], bundle: true, minify: true, format: "esm", target: "es2020", write: false };
const shipped = (await build({ ...options, mangleProps: /^_/ })).outputFiles[0].contents;
const plain = (await build(options)).outputFiles[0].contents;
if (!process.argv.includes("--check")) {
  mkdirSync("dist", { recursive: true });
  writeFileSync("dist/tether.min.js", shipped);
}
const kib = (n) => `${n} bytes (${(n / 1024).toFixed(1)} KiB)`;
console.log(`dist/tether.min.js: ${kib(shipped.length)}, gzip ${kib(gzipSync(shipped).length)}`);
console.log(`bundled from dist/ by an app's bundler (minified, names kept): ${kib(plain.length)}, gzip ${kib(gzipSync(plain).length)}`);
