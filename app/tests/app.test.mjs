// The app in a real browser (Debian's Chromium, headless): parity with Python, offline, privacy,
// bad input, a damaged model, and the screenshots README shows.
import assert from 'node:assert/strict';
import {createHash} from 'node:crypto';
import {mkdirSync, mkdtempSync, readFileSync, writeFileSync} from 'node:fs';
import {tmpdir} from 'node:os';
import {join} from 'node:path';
import {after, before, test} from 'node:test';
import {chromium} from 'playwright-core';
import {
  APP, chromiumPath, classify, expectedOutputs, launch, NO_HAM, PHONE, pythonCommand, REPO, startServer, waitReady,
} from './helpers.mjs';

// A test run leaves the tracked screenshots alone; UPDATE_SCREENSHOTS=1 npm test rewrites the ones the docs show,
// with taken_with.json naming the model and app.json they show (a test below fails when those change).
const TRACKED_SCREENSHOTS = join(REPO, 'docs', 'screenshots');
const SCREENSHOTS = process.env.UPDATE_SCREENSHOTS ? TRACKED_SCREENSHOTS : join(APP, 'test-results', 'screenshots');
const sha256 = (path) => createHash('sha256').update(readFileSync(path)).digest('hex');
// the model file(s) the app loads: one model, or an ensemble's members (app.json names them)
const MODEL_FILES = JSON.parse(readFileSync(join(APP, 'public', 'model', 'app.json'), 'utf8')).models;
const shipped = () => ({
  model_sha256: MODEL_FILES.map((name) => sha256(join(APP, 'public', 'model', name))).join(','),
  app_json_sha256: sha256(join(APP, 'public', 'model', 'app.json')),
});
let server;
let browser;
let expectedCache;
// one Python run for every test: 20 images, the 2 nearest the threshold, 2 non-square copies, the rule on a grid
const expectedAll = () => (expectedCache ??= expectedOutputs(20, {refer: 2, nonSquare: 2}));
const expected20 = () => expectedAll().images.filter((e) => e.kind === 'picked');

before(async () => {
  server = await startServer();
  browser = await launch();
});

after(async () => {
  await browser?.close();
  await server?.close();
});

test('shows what Python shows for 20 HAM10000 images, asks for nothing off the device', {skip: NO_HAM}, async () => {
  const expected = expectedAll().images;
  assert.equal(expected.length, 24);
  assert.equal(expected20().length, 20);
  // All three answers are exercised on real images, the refer band included, and non-square photos too.
  assert.deepEqual([...new Set(expected.map((e) => e.decision))].sort(), ['melanoma', 'not_melanoma', 'refer']);
  assert.equal(expected.filter((e) => e.kind === 'non_square').length, 2);
  // The app's pixels are the training pipeline's: for a square image, the expected logit is evaluate's own.
  for (const e of expected.filter((x) => x.kind !== 'non_square')) {
    assert.ok(Math.abs(e.logit - e.logit_tf_decode) <= 1e-6, `${e.path}: ${e.logit} vs ${e.logit_tf_decode}`);
  }
  const context = await browser.newContext(PHONE);
  const page = await context.newPage();
  const requests = [];
  page.on('request', (r) => requests.push({url: r.url(), method: r.method()}));
  await page.goto(server.url);
  assert.equal(await waitReady(page), 'ready', await page.locator('#status').textContent());
  mkdirSync(SCREENSHOTS, {recursive: true});
  await page.screenshot({path: join(SCREENSHOTS, 'main.png'), fullPage: true});

  const times = [];
  let worst = 0;
  for (const e of expected) {
    const got = await classify(page, e.path);
    worst = Math.max(worst, Math.abs(got.probability - e.probability));
    assert.equal(got.state, 'ready', got.status);
    assert.ok(Math.abs(got.probability - e.probability) <= 1e-4,
        `${e.path}: app ${got.probability}, Python ${e.probability}`);
    assert.equal(got.decision, e.decision, `${e.path}: app ${got.decision}, Python ${e.decision}`);
    assert.equal(got.shown, `${(100 * got.probability).toFixed(1)}%`);
    times.push(got.ms);
    if (e === expected[0]) await page.screenshot({path: join(SCREENSHOTS, 'result.png'), fullPage: true});
  }
  times.sort((a, b) => a - b);
  console.log(`in-browser inference (WASM, this machine): median ${times[times.length >> 1].toFixed(1)} ms, `
      + `min ${times[0].toFixed(1)} ms over ${times.length} images; largest probability difference to Python `
      + `${worst.toExponential(2)}`);

  if (process.env.UPDATE_SCREENSHOTS) {
    writeFileSync(join(SCREENSHOTS, 'taken_with.json'), JSON.stringify(shipped(), null, 2) + '\n');
  }

  // Privacy: every request went to the app's own origin, and none sent data.
  const origin = new URL(server.url).origin;
  const foreign = requests.filter((r) => !r.url.startsWith(origin) && !/^(data|blob):/.test(r.url));
  assert.deepEqual(foreign, []);
  assert.deepEqual(requests.filter((r) => r.method !== 'GET'), []);
  // ... and the page's Content-Security-Policy refuses any other destination.
  const blocked = await page.evaluate(async () => {
    try {
      await fetch('https://example.org/collect', {method: 'POST', body: 'x'});
      return false;
    } catch (err) {
      return true;
    }
  });
  assert.ok(blocked, 'a request to another origin was not blocked');
  await context.close();
});

test('decide() and shownProbability() follow the Python rule on every logit of a grid around the threshold',
    {skip: NO_HAM}, async () => {
  const {grid, sidecar} = expectedAll();
  const {decide, shownProbability} = await import('../src/decision.js');
  assert.ok(grid.length > 400);
  assert.deepEqual(new Set(grid.map((g) => g.decision)), new Set(['melanoma', 'not_melanoma', 'refer']));
  for (const g of grid) {
    assert.equal(decide(g.logit, sidecar), g.decision, `logit ${g.logit}`);
    assert.ok(Math.abs(shownProbability(g.logit, sidecar) - g.probability) < 1e-12, `logit ${g.logit}`);
  }
});

test('the screenshots the docs show were taken of the model and numbers the app ships', () => {
  const taken = JSON.parse(readFileSync(join(TRACKED_SCREENSHOTS, 'taken_with.json'), 'utf8'));
  assert.deepEqual(taken, shipped(),
      'docs/screenshots show another model or app.json: rerun UPDATE_SCREENSHOTS=1 npm test and commit them');
});

test('works offline after the first visit', {skip: NO_HAM}, async () => {
  const context = await browser.newContext(PHONE);
  const page = await context.newPage();
  let firstLoadBytes = 0;
  page.on('response', async (response) => {
    try {
      firstLoadBytes += (await response.body()).length;
    } catch (err) { /* redirects and aborted requests have no body */ }
  });
  await page.goto(server.url);
  assert.equal(await waitReady(page), 'ready');
  // wait until the service worker controls the page and has cached the model
  await page.evaluate(async () => {
    await navigator.serviceWorker.ready;
    if (!navigator.serviceWorker.controller) {
      await new Promise((resolve) => navigator.serviceWorker.addEventListener('controllerchange', resolve));
    }
  });
  const [cached, cachedBytes] = await page.evaluate(async () => {
    const names = await caches.keys();
    const cache = await caches.open(names[0]);
    const requests = await cache.keys();
    let bytes = 0;
    for (const r of requests) bytes += (await (await cache.match(r)).arrayBuffer()).byteLength;
    return [requests.map((r) => new URL(r.url).pathname), bytes];
  });
  for (const file of [...MODEL_FILES.map((name) => `/model/${name}`), '/model/model.json', '/model/app.json',
    '/litert/litert_wasm_internal.wasm']) {
    assert.ok(cached.includes(file), `${file} not cached: ${cached.join(', ')}`);
  }
  // the page's own responses miss what the service worker fetches for itself; the cache holds all of it
  console.log(`first load: ${(firstLoadBytes / 1e6).toFixed(2)} MB seen by the page, `
      + `${(cachedBytes / 1e6).toFixed(2)} MB stored for offline use`);

  await context.setOffline(true);
  await page.reload();
  assert.equal(await waitReady(page), 'ready', await page.locator('#status').textContent());
  const [first] = expected20();
  const got = await classify(page, first.path);
  assert.equal(got.state, 'ready', got.status);
  assert.ok(Math.abs(got.probability - first.probability) <= 0.01);
  await context.close();
});

test('a file that is not an image, an undecodable one and a huge one get a message, not a crash', {skip: NO_HAM}, async () => {
  const context = await browser.newContext(PHONE);
  const page = await context.newPage();
  const errors = [];
  page.on('pageerror', (err) => errors.push(err.message));
  await page.goto(server.url);
  assert.equal(await waitReady(page), 'ready');

  let got = await classify(page, {name: 'notes.txt', mimeType: 'text/plain', buffer: Buffer.from('hello')});
  assert.equal(got.state, 'error');
  assert.match(got.status, /notes\.txt is not an image/);

  got = await classify(page, {name: 'broken.jpg', mimeType: 'image/jpeg', buffer: Buffer.from('not a jpeg')});
  assert.equal(got.state, 'error');
  assert.match(got.status, /broken\.jpg could not be read as an image/);

  // 8000 x 8000 = 64 megapixels, beyond what the app takes: a small PNG that decodes huge
  const huge = await page.evaluate(async () => {
    const canvas = new OffscreenCanvas(8000, 8000);
    canvas.getContext('2d').fillRect(0, 0, 10, 10);
    const blob = await canvas.convertToBlob({type: 'image/png'});
    return Array.from(new Uint8Array(await blob.arrayBuffer()));
  });
  got = await classify(page, {name: 'huge.png', mimeType: 'image/png', buffer: Buffer.from(huge)});
  assert.equal(got.state, 'error');
  assert.match(got.status, /huge\.png is 64 megapixels/);
  assert.equal(await page.locator('#result').isHidden(), true);

  // the page still works after all that
  const [first] = expected20();
  got = await classify(page, first.path);
  assert.equal(got.state, 'ready', got.status);
  assert.deepEqual(errors, []);
  await context.close();
});

test('a damaged or swapped model file is refused with a message naming it', async () => {
  const name = MODEL_FILES.at(-1);  // of an ensemble, the last member: every file is checked, not the first only
  const original = readFileSync(join(APP, 'dist', 'model', name));
  const flipped = Buffer.from(original);
  flipped[flipped.length >> 1] ^= 0xff;
  const escaped = name.replace('.', '\\.');
  for (const [body, message] of [
    [flipped, new RegExp(`${escaped} does not match its sidecar`)],
    [original.subarray(0, 50_000), new RegExp(`${escaped} is 50000 bytes, its sidecar says`)]]) {
    const context = await browser.newContext(PHONE);
    const page = await context.newPage();
    await page.route(`**/model/${name}`, (route) => route.fulfill({body, contentType: 'application/octet-stream'}));
    await page.goto(server.url);
    assert.equal(await waitReady(page), 'error');
    assert.match(await page.locator('#status').textContent(), message);
    assert.equal(await page.locator('#picker').isDisabled(), true);
    await context.close();
  }
});

test('the built app carries its runtime and model: no CDN, no other origin in any file', async () => {
  const sw = readFileSync(join(APP, 'dist', 'sw.js'), 'utf8');
  const html = readFileSync(join(APP, 'dist', 'index.html'), 'utf8');
  assert.match(html, /connect-src 'self'/);
  for (const file of [...MODEL_FILES.map((name) => `model/${name}`), 'model/model.json', 'model/app.json',
    'litert/litert_wasm_internal.js']) {
    assert.ok(sw.includes(`"${file}"`), `${file} not precached`);
  }
  assert.doesNotMatch(html, /https?:\/\/(?!www\.w3\.org)/);
});

test('Chromium can install it as an app (manifest, icons, service worker)', async () => {
  // a persistent profile: Chromium never offers to install from an incognito-like context
  const context = await chromium.launchPersistentContext(mkdtempSync(join(tmpdir(), 'app-profile-')),
      {executablePath: chromiumPath(), args: ['--no-sandbox'], ...PHONE});
  try {
    const page = await context.newPage();
    await page.goto(server.url);
    assert.equal(await waitReady(page), 'ready');
    await page.evaluate(async () => navigator.serviceWorker.ready);
    const cdp = await context.newCDPSession(page);
    const manifest = await cdp.send('Page.getAppManifest');
    assert.deepEqual(manifest.errors, []);
    assert.deepEqual((await cdp.send('Page.getInstallabilityErrors')).installabilityErrors, []);
  } finally {
    await context.close();
  }
});

test('the Python side is $PYTHON, else the README\'s .venv, else python on PATH', () => {
  const repo = mkdtempSync(join(tmpdir(), 'app-repo-'));
  assert.equal(pythonCommand({}, repo), 'python');
  mkdirSync(join(repo, '.venv', 'bin'), {recursive: true});
  writeFileSync(join(repo, '.venv', 'bin', 'python'), '');
  assert.equal(pythonCommand({}, repo), join(repo, '.venv', 'bin', 'python'));
  assert.equal(pythonCommand({PYTHON: '/opt/py/bin/python3'}, repo), '/opt/py/bin/python3');
});
