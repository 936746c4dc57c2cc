// Fills the model's int8 input with one RGB image (row-major, HWC), quantized with the model's input scale.
#ifndef MELANOMA_IMAGE_PROVIDER_H_
#define MELANOMA_IMAGE_PROVIDER_H_

#include <cstdint>

#include "tensorflow/lite/c/common.h"

// The default provider copies the embedded test image (generated test_image.cc).
// A board port replaces image_provider.cc with one that reads its camera, resizes
// to kNumCols x kNumRows and quantizes: q = round(pixel / kInputScale + kInputZeroPoint).
TfLiteStatus GetImage(int image_width, int image_height, int channels, int8_t* image_data);

#endif  // MELANOMA_IMAGE_PROVIDER_H_
