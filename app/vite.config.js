// Vite builds the app into dist/: the page and its script, LiteRT.js's WebAssembly runtime
// (copied from node_modules, never a CDN) and a service worker that precaches all of it.
// package.json overrides rollup with its WebAssembly build: npm 11 writes a lockfile without the other
// platforms' native rollup packages, and `npm ci` then refuses it ("Missing: @rollup/rollup-android-arm-eabi").
import {createHash} from 'node:crypto';
import {copyFileSync, mkdirSync, readdirSync, readFileSync, statSync, writeFileSync} from 'node:fs';
import {dirname, join, relative, resolve} from 'node:path';
import {fileURLToPath} from 'node:url';
import {defineConfig} from 'vite';

const here = dirname(fileURLToPath(import.meta.url));
const wasmDir = resolve(here, 'node_modules/@litertjs/core/wasm');
// LiteRT.js picks one of these by what the browser supports (SIMD or not); no threads, no JSPI.
const RUNTIME = ['litert_wasm_internal.js', 'litert_wasm_internal.wasm',
                 'litert_wasm_compat_internal.js', 'litert_wasm_compat_internal.wasm'];
// Precached on install; the compat build (browsers without WebAssembly SIMD) is cached when first used.
const NOT_PRECACHED = /litert_wasm_compat_internal|\.map$|^sw\.js$/;

function listFiles(dir) {
  return readdirSync(dir).flatMap((name) => {
    const path = join(dir, name);
    return statSync(path).isDirectory() ? listFiles(path) : [path];
  });
}

function liteRtRuntime() {
  return {
    name: 'litert-runtime',
    configureServer(server) {
      server.middlewares.use('/litert/', (req, res, next) => {
        const name = req.url.split('?')[0].replace(/^\//, '');
        if (!RUNTIME.includes(name)) return next();
        res.setHeader('Content-Type', name.endsWith('.wasm') ? 'application/wasm' : 'text/javascript');
        res.end(readFileSync(join(wasmDir, name)));
      });
    },
    writeBundle({dir}) {
      mkdirSync(join(dir, 'litert'), {recursive: true});
      for (const name of RUNTIME) copyFileSync(join(wasmDir, name), join(dir, 'litert', name));
    },
  };
}

function serviceWorker() {
  return {
    name: 'service-worker',
    closeBundle() {
      const dist = resolve(here, 'dist');
      const files = listFiles(dist).map((p) => relative(dist, p).split('\\').join('/')).sort();
      const precache = files.filter((f) => !NOT_PRECACHED.test(f));
      const hash = createHash('sha256');
      for (const f of files) hash.update(f).update(readFileSync(join(dist, f)));
      const source = readFileSync(resolve(here, 'src/sw.js'), 'utf8')
          .replace('__CACHE_VERSION__', hash.digest('hex').slice(0, 16))
          .replace('__PRECACHE__', JSON.stringify(['./', ...precache]));
      writeFileSync(join(dist, 'sw.js'), source);
    },
  };
}

export default defineConfig({
  base: './',  // works from any sub-path (e.g. GitHub Pages)
  build: {target: 'es2022', chunkSizeWarningLimit: 1000},
  plugins: [liteRtRuntime(), serviceWorker()],
  preview: {port: 4173, strictPort: true},
});
