// Shared by the browser tests: the built app served locally, the system Chromium, the Python side.
import {spawnSync} from 'node:child_process';
import {existsSync, mkdtempSync, readFileSync} from 'node:fs';
import {tmpdir} from 'node:os';
import {dirname, join, resolve} from 'node:path';
import {fileURLToPath} from 'node:url';
import {chromium} from 'playwright-core';
import {preview} from 'vite';

export const APP = resolve(dirname(fileURLToPath(import.meta.url)), '..');
export const REPO = resolve(APP, '..');
// The shared HAM10000 subset, as the Python tests find it ($MELANOMA_TF_HAM10000 or ../shared).
export const SHARED_HAM = process.env.MELANOMA_TF_HAM10000 || resolve(REPO, '../shared/data/ham10000');
/** false, or why the tests that classify real images are skipped (as the Python tests skip). */
export const NO_HAM = existsSync(join(SHARED_HAM, 'HAM10000_metadata.csv')) ? false
  : `real HAM10000 data not found at ${SHARED_HAM} (set MELANOMA_TF_HAM10000)`;

/** Debian's chromium (apt-get install chromium), or CHROMIUM=...; playwright downloads no browser. */
export function chromiumPath() {
  const candidates = [process.env.CHROMIUM, '/usr/bin/chromium', '/usr/bin/chromium-browser'].filter(Boolean);
  const found = candidates.find((p) => existsSync(p));
  if (!found) throw new Error(`no Chromium at ${candidates.join(', ')}: apt-get install chromium, or set CHROMIUM`);
  return found;
}

export async function startServer() {
  if (!existsSync(join(APP, 'dist', 'index.html'))) throw new Error('app/dist is missing: run npm run build first');
  const server = await preview({root: APP, logLevel: 'silent', preview: {port: 0, strictPort: false}});
  const url = server.resolvedUrls.local[0];
  return {url, close: () => server.close()};
}

export async function launch() {
  return chromium.launch({executablePath: chromiumPath(), args: ['--no-sandbox']});
}

export const PHONE = {viewport: {width: 390, height: 844}, deviceScaleFactor: 1, isMobile: true, hasTouch: true};

export async function waitReady(page) {
  await page.waitForFunction(() => document.body.dataset.ready === 'true'
      || document.getElementById('status').dataset.state === 'error', null, {timeout: 120_000});
  return page.locator('#status').getAttribute('data-state');
}

/** Picks a file and waits until the page has answered (a result or an error). */
export async function classify(page, file) {
  const before = await page.locator('#status').getAttribute('data-stamp');
  await page.setInputFiles('#picker', file);
  await page.waitForFunction((stamp) => {
    const status = document.getElementById('status');
    return status.dataset.stamp !== stamp && status.dataset.state !== 'busy';
  }, before, {timeout: 60_000});
  const result = page.locator('#result');
  return {
    state: await page.locator('#status').getAttribute('data-state'),
    status: await page.locator('#status').textContent(),
    probability: Number(await result.getAttribute('data-probability')),
    shown: await page.locator('#probability').textContent(),
    decision: await result.getAttribute('data-decision'),
    ms: Number(await result.getAttribute('data-inference-ms')),
  };
}

/**
 * The Python that has this package installed: $PYTHON, else the README's virtual environment
 * (`.venv` at the repository root), else `python` on PATH (an activated environment).
 */
export function pythonCommand(env = process.env, repo = REPO) {
  if (env.PYTHON) return env.PYTHON;
  const venv = [join(repo, '.venv', 'bin', 'python'), join(repo, '.venv', 'Scripts', 'python.exe')];
  return venv.find((p) => existsSync(p)) || 'python';
}

/** Runs a Python script of this repository with {@link pythonCommand}. */
export function runPython(args) {
  const python = pythonCommand();
  const result = spawnSync(python, args, {cwd: REPO, encoding: 'utf8', maxBuffer: 64 << 20});
  if (result.status !== 0) {
    throw new Error(`${python} ${args.join(' ')} failed (${result.status}):\n${result.stderr.slice(-3000)}`);
  }
  return result.stdout;
}

/**
 * Expected app outputs from the Python LiteRT interpreter: n shared HAM10000 images, the `refer` images nearest
 * the threshold, `nonSquare` landscape / portrait copies, and the decision rule on a grid of logits.
 */
export function expectedOutputs(n, {refer = 0, nonSquare = 0} = {}) {
  const work = mkdtempSync(join(tmpdir(), 'app-expected-'));
  const out = join(work, 'expected.json');
  runPython(['app/tests/expected_outputs.py', '--n', String(n), '--refer', String(refer), '--non-square',
    String(nonSquare), '--work', work, '--grid', '--data', SHARED_HAM, '--out', out]);
  return JSON.parse(readFileSync(out, 'utf8'));
}
