// What the page shows for one logit, by the sidecar's rules (the same as melanoma_tf.evaluate,
// tools/benchmark_tflite.py and the edge responder):
// - the probability is the validation-fitted Platt calibration sigmoid(a * z + b)
//   (the temperature sigmoid(z / T) for a sidecar without one);
// - the decision compares the raw logit z with the validation-chosen threshold (95% sensitivity);
//   within the refer band (refer_margin_logit, in temperature-scaled units) it is "uncertain: refer".

export const sigmoid = (x) => 1 / (1 + Math.exp(-x));

export function shownProbability(z, sidecar) {
  const c = sidecar.calibration;
  if (c && c.method === 'platt') return sigmoid(c.a * z + c.b);
  return sigmoid(z / (sidecar.temperature || 1));
}

/** 'melanoma' (see a dermatologist), 'not_melanoma' or 'refer' (uncertain). */
export function decide(z, sidecar) {
  const margin = (sidecar.refer_margin_logit || 0) * (sidecar.temperature || 1);
  const distance = z - sidecar.threshold_logit;
  if (Math.abs(distance) < margin) return 'refer';
  return distance >= 0 ? 'melanoma' : 'not_melanoma';
}
