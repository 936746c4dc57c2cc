// Turns the model's int8 melanoma score into melanoma / not melanoma / refer.
#ifndef MELANOMA_DETECTION_RESPONDER_H_
#define MELANOMA_DETECTION_RESPONDER_H_

#include <cstdint>

#include "model_settings.h"

// Scores in [kReferLowQ, kReferHighQ] are referred; otherwise melanoma from kThresholdQ up (model_data.h).
Decision Decide(int8_t melanoma_score);

// Reports the decision (MicroPrintf here; a board port lights an LED or shows a screen).
void RespondToDetection(int8_t melanoma_score);

#endif  // MELANOMA_DETECTION_RESPONDER_H_
