// Image -> model input, as the Python side does it (melanoma_tf.pipeline.decode_and_resize):
// RGB in [0, 255], resized with TensorFlow's antialiased bilinear filter
// (tf.image.resize(..., "bilinear", antialias=True)) and rounded, as in training. The app first takes the centre square
// (the crop guide), because the model was trained on square images.

export const MAX_PIXELS = 50_000_000;  // a 12 MP phone photo is 12e6; beyond this, refuse rather than exhaust memory

/** The largest centred square of a width x height image. */
export function centreSquare(width, height) {
  const side = Math.min(width, height);
  return {x: Math.floor((width - side) / 2), y: Math.floor((height - side) / 2), side};
}

const f32 = Math.fround;

/**
 * Per output index: the first input index and the normalised weights of the triangle kernel,
 * widened by the downscale factor (TensorFlow's ScaleAndTranslate with antialias), in float32
 * and in TensorFlow's order, as tools/benchmark_tflite.py does too.
 */
export function resampleWeights(inSize, outSize) {
  const invScale = f32(1 / f32(f32(outSize) / f32(inSize)));
  const kernelScale = Math.max(invScale, 1);
  const oneOverKernelScale = f32(1 / kernelScale);
  const rows = [];
  for (let i = 0; i < outSize; i++) {
    const centre = f32(f32(i + 0.5) * invScale);
    let start = Math.ceil(f32(f32(centre - kernelScale) - 0.5));
    let end = Math.floor(f32(f32(centre + kernelScale) - 0.5));
    start = Math.min(Math.max(start, 0), inSize - 1);
    end = Math.min(Math.max(end, 0), inSize - 1) + 1;
    const weights = new Float32Array(end - start);
    let total = 0;
    for (let s = start; s < end; s++) {
      const w = Math.max(0, f32(1 - Math.abs(f32(f32(f32(s + 0.5) - centre) * oneOverKernelScale))));
      weights[s - start] = w;
      total = f32(total + w);
    }
    if (total > 0) {
      const oneOverTotal = f32(1 / total);
      for (let k = 0; k < weights.length; k++) weights[k] = f32(weights[k] * oneOverTotal);
    }
    rows.push({start, weights});
  }
  return rows;
}

/** Round half to even, as TensorFlow's tf.round (the training pipeline rounds resized pixels to uint8). */
export function roundHalfEven(x) {
  const r = Math.round(x);
  return (Math.abs(x % 1) === 0.5 && r % 2 !== 0) ? r - 1 : r;
}

/**
 * Resizes RGBA pixels (ImageData.data) of a square region to outSize x outSize RGB values, exactly as
 * the training pipeline does (melanoma_tf.pipeline.decode_and_resize): rows first, then columns, float32
 * sums, rounded to whole grey levels in [0, 255].
 * @param {Uint8ClampedArray} rgba  pixels of the full image, row-major, 4 bytes each
 * @param {number} width  the image's width
 * @param {{x:number,y:number,side:number}} square  the region to use
 * @param {number} outSize  the model's input size
 * @returns {Float32Array} outSize * outSize * 3 values in [0, 255]
 */
export function resizeSquare(rgba, width, square, outSize) {
  const {x, y, side} = square;
  const w = resampleWeights(side, outSize);
  // vertical pass: outSize rows x side columns x 3
  const tmp = new Float32Array(outSize * side * 3);
  for (let r = 0; r < outSize; r++) {
    const {start, weights} = w[r];
    for (let c = 0; c < side; c++) {
      let R = 0, G = 0, B = 0;
      for (let k = 0; k < weights.length; k++) {
        const p = ((y + start + k) * width + x + c) * 4;
        R = f32(R + f32(weights[k] * rgba[p]));
        G = f32(G + f32(weights[k] * rgba[p + 1]));
        B = f32(B + f32(weights[k] * rgba[p + 2]));
      }
      const t = (r * side + c) * 3;
      tmp[t] = R; tmp[t + 1] = G; tmp[t + 2] = B;
    }
  }
  // horizontal pass
  const out = new Float32Array(outSize * outSize * 3);
  for (let r = 0; r < outSize; r++) {
    for (let c = 0; c < outSize; c++) {
      const {start, weights} = w[c];
      let R = 0, G = 0, B = 0;
      for (let k = 0; k < weights.length; k++) {
        const t = (r * side + start + k) * 3;
        R = f32(R + f32(weights[k] * tmp[t]));
        G = f32(G + f32(weights[k] * tmp[t + 1]));
        B = f32(B + f32(weights[k] * tmp[t + 2]));
      }
      const o = (r * outSize + c) * 3;
      out[o] = Math.min(255, Math.max(0, roundHalfEven(R)));
      out[o + 1] = Math.min(255, Math.max(0, roundHalfEven(G)));
      out[o + 2] = Math.min(255, Math.max(0, roundHalfEven(B)));
    }
  }
  return out;
}
