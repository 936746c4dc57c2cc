// Loads the exported model (python -m melanoma_tf.export_app) and runs it with LiteRT.js.
// The model file is checked against its sidecar (size, SHA-256) before LiteRT reads a byte of it:
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

const REQUIRED = ['input_size', 'input_dtype', 'threshold_logit', 'sha256', 'size_bytes'];

/**
 * @param {string} base  folder of app.json, the model and its sidecar (e.g. './model/')
 * @returns {Promise<{info: object, sidecar: object, run: (input: Float32Array) => Promise<number>}>}
 */
export async function loadDetector(base) {
  const info = await fetchJson(`${base}app.json`, 'the app\'s model description (export one with '
      + 'python -m melanoma_tf.export_app)');
  const sidecarUrl = `${base}${info.sidecar}`;
  const modelUrl = `${base}${info.model}`;
  const sidecar = await fetchJson(sidecarUrl, 'the model\'s sidecar');
  for (const key of REQUIRED) {
    if (sidecar[key] === undefined) throw new ModelError(`${sidecarUrl}: missing key '${key}'`);
  }
  if (sidecar.input_dtype !== 'float32') {
    throw new ModelError(`${sidecarUrl}: input is ${sidecar.input_dtype}; export the model with `
        + 'python -m melanoma_tf.export_app, which gives it the float interface LiteRT.js needs');
  }
  const bytes = new Uint8Array(await (await fetchOk(modelUrl, 'the model')).arrayBuffer());
  if (bytes.length !== sidecar.size_bytes) {
    throw new ModelError(`${modelUrl} is ${bytes.length} bytes, its sidecar says ${sidecar.size_bytes}: `
        + 'the file is damaged or not the model the sidecar describes');
  }
  const digest = hex(await crypto.subtle.digest('SHA-256', bytes));
  if (digest !== sidecar.sha256) {
    throw new ModelError(`${modelUrl} does not match its sidecar (SHA-256 ${digest.slice(0, 12)}…, expected `
        + `${sidecar.sha256.slice(0, 12)}…): the file is damaged or not the model the sidecar describes`);
  }
  let model;
  try {
    await loadLiteRt(new URL('./litert/', document.baseURI).href);
    model = await loadAndCompile(bytes, {accelerator: 'wasm'});
  } catch (err) {
    throw new ModelError(`LiteRT could not load ${modelUrl}: ${err.message}`);
  }
  const [input] = model.getInputDetails();
  const size = sidecar.input_size;
  const shape = Array.from(input.shape);
  // the batch dimension is 1 or, for a model exported with a dynamic batch, -1
  if (input.dtype !== 'float32' || ![1, -1].includes(shape[0]) || shape.slice(1).join() !== [size, size, 3].join()) {
    throw new ModelError(`${modelUrl}: input ${input.dtype} [${shape}] is not one ${size}x${size} RGB image`);
  }
  async function run(pixels) {
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
  return {info, sidecar, run};
}
