// Loads the exported model (python -m melanoma_tf.export_app) and runs it with LiteRT.js.
// Each model file is checked against its sidecar (size, SHA-256) before LiteRT reads a byte of it:
// a file cut short or swapped gives a message naming it, never a broken runtime.
import {loadAndCompile, loadLiteRt, Tensor} from '@litertjs/core';

export class ModelError extends Error {}

async function fetchOk(url, what) {
  let response;
  try {
    response = await fetch(url);
  } catch (err) {
    throw new ModelError(`${url}: could not be loaded (${err.message}); open the app once while online`);
  }
  if (!response.ok) throw new ModelError(`${url}: ${what} not found (HTTP ${response.status})`);
  return response;
}

async function fetchJson(url, what) {
  const response = await fetchOk(url, what);
  try {
    return await response.json();
  } catch (err) {
    throw new ModelError(`${url}: ${what} is not valid JSON`);
  }
}

function hex(buffer) {
  return Array.from(new Uint8Array(buffer), (b) => b.toString(16).padStart(2, '0')).join('');
}

const REQUIRED = ['input_size', 'input_dtype', 'threshold_logit'];

async function checkedBytes(url, entry, sidecarUrl) {
  if (entry.size_bytes === undefined || entry.sha256 === undefined) {
    throw new ModelError(`${sidecarUrl}: no size_bytes / sha256 for ${entry.model}`);
  }
  const bytes = new Uint8Array(await (await fetchOk(url, 'the model')).arrayBuffer());
  if (bytes.length !== entry.size_bytes) {
    throw new ModelError(`${url} is ${bytes.length} bytes, its sidecar says ${entry.size_bytes}: `
        + 'the file is damaged or not the model the sidecar describes');
  }
  const digest = hex(await crypto.subtle.digest('SHA-256', bytes));
  if (digest !== entry.sha256) {
    throw new ModelError(`${url} does not match its sidecar (SHA-256 ${digest.slice(0, 12)}…, expected `
        + `${entry.sha256.slice(0, 12)}…): the file is damaged or not the model the sidecar describes`);
  }
  return bytes;
}

async function compiled(bytes, url, size) {
  let model;
  try {
    model = await loadAndCompile(bytes, {accelerator: 'wasm'});
  } catch (err) {
    throw new ModelError(`LiteRT could not load ${url}: ${err.message}`);
  }
  const [input] = model.getInputDetails();
  const shape = Array.from(input.shape);
  // the batch dimension is 1 or, for a model exported with a dynamic batch, -1
  if (input.dtype !== 'float32' || ![1, -1].includes(shape[0]) || shape.slice(1).join() !== [size, size, 3].join()) {
    throw new ModelError(`${url}: input ${input.dtype} [${shape}] is not one ${size}x${size} RGB image`);
  }
  return model;
}

/**
 * Loads the model, or an ensemble's members (sidecar.members; the logit is the mean of theirs, as
 * melanoma_tf.soup --ensemble computes it), each file checked against the sidecar before LiteRT reads it.
 * @param {string} base  folder of app.json, the model file(s) and the sidecar (e.g. './model/')
 * @returns {Promise<{info: object, sidecar: object, run: (input: Float32Array) => Promise<number>}>}
 */
export async function loadDetector(base) {
  const info = await fetchJson(`${base}app.json`, 'the app\'s model description (export one with '
      + 'python -m melanoma_tf.export_app)');
  const sidecarUrl = `${base}${info.sidecar}`;
  const sidecar = await fetchJson(sidecarUrl, 'the model\'s sidecar');
  for (const key of REQUIRED) {
    if (sidecar[key] === undefined) throw new ModelError(`${sidecarUrl}: missing key '${key}'`);
  }
  if (sidecar.input_dtype !== 'float32') {
    throw new ModelError(`${sidecarUrl}: input is ${sidecar.input_dtype}; export the model with `
        + 'python -m melanoma_tf.export_app, which gives it the float interface LiteRT.js needs');
  }
  const entries = sidecar.members ?? [sidecar];
  const names = entries.map((e) => e.model);
  if (!Array.isArray(info.models) || info.models.join() !== names.join()) {
    throw new ModelError(`${base}app.json: models ${info.models} are not the sidecar's ${names}`);
  }
  if (sidecar.members && sidecar.combine !== 'mean_logit') {
    throw new ModelError(`${sidecarUrl}: members combined by '${sidecar.combine}', the app knows 'mean_logit'`);
  }
  const urls = names.map((name) => `${base}${name}`);
  const files = await Promise.all(entries.map((e, i) => checkedBytes(urls[i], e, sidecarUrl)));
  try {
    await loadLiteRt(new URL('./litert/', document.baseURI).href);
  } catch (err) {
    throw new ModelError(`LiteRT could not start: ${err.message}`);
  }
  const size = sidecar.input_size;
  const models = [];
  for (const [i, bytes] of files.entries()) models.push(await compiled(bytes, urls[i], size));
  async function runOne(model, pixels) {
    const tensor = new Tensor(pixels, [1, size, size, 3]);
    try {
      const outputs = await model.run(tensor);
      const logit = outputs[0].toTypedArray()[0];
      for (const t of outputs) t.delete();
      return logit;
    } finally {
      tensor.delete();
    }
  }
  async function run(pixels) {
    let sum = 0;
    for (const model of models) sum += await runOne(model, pixels);
    return sum / models.length;
  }
  return {info, sidecar, run};
}
