// The page: load the model once, then for each photo: centre square -> model -> what the report shows.
import {decide, shownProbability} from './decision.js';
import {loadDetector, ModelError} from './model.js';
import {centreSquare, MAX_PIXELS, resizeSquare} from './preprocess.js';

const $ = (id) => document.getElementById(id);
const MAX_FILE_BYTES = 40 * 1024 * 1024;
const DECISIONS = {
  melanoma: ['Possible melanoma: see a dermatologist',
    'The score is above the threshold chosen so that 95% of melanomas in the validation images were flagged.'],
  refer: ['Uncertain: have it checked by a dermatologist',
    'The score is too close to the threshold for the model to tell.'],
  not_melanoma: ['Not melanoma, according to this model',
    'Below the threshold. The model still misses some melanomas: a changing or worrying spot needs a doctor.'],
};
const pct = (x) => `${(100 * x).toFixed(1)}%`;
let analysed = 0;
let statusChanges = 0;

function setStatus(text, state) {
  const status = $('status');
  status.textContent = text;
  status.dataset.state = state;
  status.dataset.stamp = String(++statusChanges);
}

function drawGuide(source, width, height) {
  const canvas = $('preview');
  const ctx = canvas.getContext('2d');
  ctx.clearRect(0, 0, canvas.width, canvas.height);
  const side = canvas.width;
  if (source) {
    // the whole photo, letterboxed, with the analysed square outlined
    const scale = Math.min(side / width, side / height);
    const w = width * scale, h = height * scale, x0 = (side - w) / 2, y0 = (side - h) / 2;
    ctx.drawImage(source, x0, y0, w, h);
    const sq = centreSquare(width, height);
    ctx.fillStyle = 'rgba(0, 0, 0, 0.45)';
    const sx = x0 + sq.x * scale, sy = y0 + sq.y * scale, ss = sq.side * scale;
    ctx.fillRect(x0, y0, w, sy - y0);
    ctx.fillRect(x0, sy + ss, w, y0 + h - sy - ss);
    ctx.fillRect(x0, sy, sx - x0, ss);
    ctx.fillRect(sx + ss, sy, x0 + w - sx - ss, ss);
    ctx.strokeStyle = '#fff';
    ctx.lineWidth = 2;
    ctx.setLineDash([8, 6]);
    ctx.strokeRect(sx + 1, sy + 1, ss - 2, ss - 2);
  } else {
    ctx.strokeStyle = '#1f4e5f';
    ctx.lineWidth = 2;
    ctx.setLineDash([8, 6]);
    ctx.strokeRect(side * 0.1, side * 0.1, side * 0.8, side * 0.8);
  }
}

function showModelCard(info, sidecar) {
  $('threshold-text').textContent = `The decision threshold was chosen on validation images to flag `
      + `${pct(info.target_sensitivity ?? sidecar.target_sensitivity ?? 0.95)} of melanomas; below is how often `
      + 'it did on images it had never seen.';
  const body = $('tested-on').querySelector('tbody');
  body.replaceChildren(...info.tested_on.map((set) => {
    const row = document.createElement('tr');
    const ci = set.roc_auc_ci ? ` [${set.roc_auc_ci.map((v) => v.toFixed(2)).join(', ')}]` : '';
    for (const text of [`${set.name}: ${set.description}`, `${set.n_images} (${set.n_melanoma})`,
      pct(set.sensitivity), pct(set.specificity), `${set.roc_auc.toFixed(3)}${ci}`]) {
      const cell = document.createElement('td');
      cell.textContent = text;
      row.append(cell);
    }
    return row;
  }));
  $('trained-on').textContent = `Trained on ${info.trained_on}.`;
}

async function decodeFile(file) {
  if (!file.type.startsWith('image/') && file.type !== '') {
    throw new ModelError(`${file.name} is not an image (${file.type}); choose a JPEG or PNG photo`);
  }
  if (file.size > MAX_FILE_BYTES) {
    throw new ModelError(`${file.name} is ${(file.size / 1e6).toFixed(0)} MB; the app takes photos up to `
        + `${MAX_FILE_BYTES / 1024 / 1024} MB`);
  }
  let bitmap;
  try {
    bitmap = await createImageBitmap(file);
  } catch (err) {
    throw new ModelError(`${file.name} could not be read as an image; choose a JPEG or PNG photo`);
  }
  if (bitmap.width * bitmap.height > MAX_PIXELS) {
    const mp = (bitmap.width * bitmap.height / 1e6).toFixed(0);
    bitmap.close();
    throw new ModelError(`${file.name} is ${mp} megapixels; the app takes up to ${MAX_PIXELS / 1e6}: `
        + 'take or choose a smaller photo');
  }
  return bitmap;
}

async function classify(detector, file) {
  const bitmap = await decodeFile(file);
  drawGuide(bitmap, bitmap.width, bitmap.height);
  const square = centreSquare(bitmap.width, bitmap.height);
  const canvas = new OffscreenCanvas(square.side, square.side);
  const ctx = canvas.getContext('2d', {willReadFrequently: true});
  ctx.drawImage(bitmap, square.x, square.y, square.side, square.side, 0, 0, square.side, square.side);
  bitmap.close();
  const pixels = ctx.getImageData(0, 0, square.side, square.side).data;
  const input = resizeSquare(pixels, square.side, {x: 0, y: 0, side: square.side}, detector.sidecar.input_size);
  const start = performance.now();
  const logit = await detector.run(input);
  const ms = performance.now() - start;
  const probability = shownProbability(logit, detector.sidecar);
  const decision = decide(logit, detector.sidecar);
  const result = $('result');
  result.hidden = false;
  result.dataset.decision = decision;
  result.dataset.probability = String(probability);
  result.dataset.logit = String(logit);
  result.dataset.inferenceMs = String(ms);
  result.dataset.stamp = String(++analysed);
  $('decision').textContent = DECISIONS[decision][0];
  $('probability').textContent = pct(probability);
  let advice = DECISIONS[decision][1];
  const holdout = detector.info.tested_on[0];
  if (decision === 'melanoma' && holdout && holdout.ppv !== undefined) {
    advice += ` Most flagged lesions are harmless: of those flagged in the ${holdout.name}, ${pct(holdout.ppv)} `
        + 'were melanomas.';
  }
  $('advice').textContent = advice;
  $('timing').textContent = `Analysed on this device in ${ms.toFixed(0)} ms (${file.name}).`;
}

async function start() {
  drawGuide(null);
  if ('serviceWorker' in navigator && import.meta.env.PROD) {
    navigator.serviceWorker.register('./sw.js').catch((err) => console.warn('no offline cache:', err));
  }
  let detector;
  try {
    detector = await loadDetector('./model/');
  } catch (err) {
    setStatus(err instanceof ModelError ? err.message : `The model could not be loaded: ${err.message}`, 'error');
    return;
  }
  showModelCard(detector.info, detector.sidecar);
  setStatus('Ready. Take or choose a photo of the lesion.', 'ready');
  let busy = false;
  for (const input of [$('camera'), $('picker')]) {
    input.disabled = false;
    input.addEventListener('change', async () => {
      const file = input.files && input.files[0];
      input.value = '';
      if (!file || busy) return;
      busy = true;
      setStatus(`Analysing ${file.name}…`, 'busy');
      try {
        await classify(detector, file);
        setStatus('Done. Take or choose another photo.', 'ready');
      } catch (err) {
        $('result').hidden = true;
        setStatus(err instanceof ModelError ? err.message : `${file.name}: ${err.message}`, 'error');
      } finally {
        busy = false;
      }
    });
  }
  document.body.dataset.ready = 'true';
}

start();
