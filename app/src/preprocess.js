// Image -> model input, as the Python side does it (melanoma_tf.pipeline.decode_and_resize):
// RGB floats in [0, 255], resized with TensorFlow's antialiased bilinear filter
// (tf.image.resize(..., "bilinear", antialias=True)). The app first takes the centre square
// (the crop guide), because the model was trained on square images.

export const MAX_PIXELS = 50_000_000;  // a 12 MP phone photo is 12e6; beyond this, refuse rather than exhaust memory

/** The largest centred square of a width x height image. */
export function centreSquare(width, height) {
  const side = Math.min(width, height);
  return {x: Math.floor((width - side) / 2), y: Math.floor((height - side) / 2), side};
}

/**
 * Per output index: the first input index and the normalised weights of the triangle kernel,
 * widened by the downscale factor (TensorFlow's ScaleAndTranslate with antialias).
 */
export function resampleWeights(inSize, outSize) {
  const invScale = inSize / outSize;
  const kernelScale = Math.max(invScale, 1);
  const radius = kernelScale;  // triangle kernel radius 1, scaled
  const rows = [];
  for (let i = 0; i < outSize; i++) {
    const centre = (i + 0.5) * invScale;
    let start = Math.ceil(centre - radius - 0.5);
    let end = Math.floor(centre + radius - 0.5);
    start = Math.min(Math.max(start, 0), inSize - 1);
    end = Math.min(Math.max(end, 0), inSize - 1) + 1;
    const weights = new Float32Array(end - start);
    let total = 0;
    for (let s = start; s < end; s++) {
      const w = Math.max(0, 1 - Math.abs((s + 0.5 - centre) / kernelScale));
      weights[s - start] = w;
      total += w;
    }
    if (total > 0) for (let k = 0; k < weights.length; k++) weights[k] /= total;
    rows.push({start, weights});
  }
  return rows;
}

/**
 * Resizes RGBA pixels (ImageData.data) of a square region to outSize x outSize RGB floats.
 * @param {Uint8ClampedArray} rgba  pixels of the full image, row-major, 4 bytes each
 * @param {number} width  the image's width
 * @param {{x:number,y:number,side:number}} square  the region to use
 * @param {number} outSize  the model's input size
 * @returns {Float32Array} outSize * outSize * 3 values in [0, 255]
 */
export function resizeSquare(rgba, width, square, outSize) {
  const {x, y, side} = square;
  const w = resampleWeights(side, outSize);
  // horizontal pass: side rows x outSize columns x 3
  const tmp = new Float32Array(side * outSize * 3);
  for (let r = 0; r < side; r++) {
    const rowOffset = ((y + r) * width + x) * 4;
    for (let c = 0; c < outSize; c++) {
      const {start, weights} = w[c];
      let R = 0, G = 0, B = 0;
      for (let k = 0; k < weights.length; k++) {
        const p = rowOffset + (start + k) * 4;
        R += weights[k] * rgba[p];
        G += weights[k] * rgba[p + 1];
        B += weights[k] * rgba[p + 2];
      }
      const t = (r * outSize + c) * 3;
      tmp[t] = R; tmp[t + 1] = G; tmp[t + 2] = B;
    }
  }
  // vertical pass
  const out = new Float32Array(outSize * outSize * 3);
  for (let r = 0; r < outSize; r++) {
    const {start, weights} = w[r];
    for (let c = 0; c < outSize; c++) {
      let R = 0, G = 0, B = 0;
      for (let k = 0; k < weights.length; k++) {
        const t = ((start + k) * outSize + c) * 3;
        R += weights[k] * tmp[t];
        G += weights[k] * tmp[t + 1];
        B += weights[k] * tmp[t + 2];
      }
      const o = (r * outSize + c) * 3;
      out[o] = R; out[o + 1] = G; out[o + 2] = B;
    }
  }
  return out;
}
