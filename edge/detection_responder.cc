#include "detection_responder.h"

#include <cmath>

#include "tensorflow/lite/micro/micro_log.h"

Decision Decide(int8_t melanoma_score) {
  const int score = static_cast<int>(melanoma_score);
  if (score >= kReferLowQ && score <= kReferHighQ) {
    return Decision::kRefer;
  }
  return score >= kThresholdQ ? Decision::kMelanoma : Decision::kNotMelanoma;
}

void RespondToDetection(int8_t melanoma_score) {
  const Decision decision = Decide(melanoma_score);
  const float logit = (static_cast<int>(melanoma_score) - kOutputZeroPoint) * kOutputScale;
  // The sidecar's calibration: the same probability the report, the Pi tool and the app show.
  const float probability = 1.0f / (1.0f + std::exp(-(kCalibrationA * logit + kCalibrationB)));
  MicroPrintf("melanoma score %d (logit %d/1000, calibrated probability %d/1000): %s", melanoma_score,
              static_cast<int>(logit * 1000), static_cast<int>(probability * 1000),
              kDecisionLabels[static_cast<int>(decision)]);
}
