// Input geometry and decision labels of the melanoma detector (values come from the generated model_data.h).
#ifndef MELANOMA_MODEL_SETTINGS_H_
#define MELANOMA_MODEL_SETTINGS_H_

#include "model_data.h"

constexpr int kNumCols = kModelInputSize;
constexpr int kNumRows = kModelInputSize;
constexpr int kNumChannels = 3;
constexpr int kMaxImageSize = kNumCols * kNumRows * kNumChannels;

enum class Decision { kNotMelanoma = 0, kMelanoma = 1, kRefer = 2 };
constexpr const char* kDecisionLabels[] = {"not melanoma", "melanoma", "refer to a dermatologist"};

#endif  // MELANOMA_MODEL_SETTINGS_H_
