#include "image_provider.h"

#include <cstring>

#include "model_settings.h"
#include "test_image.h"

TfLiteStatus GetImage(int image_width, int image_height, int channels, int8_t* image_data) {
  const unsigned int bytes = static_cast<unsigned int>(image_width * image_height * channels);
  if (bytes != g_test_image_len) {
    return kTfLiteError;
  }
  std::memcpy(image_data, g_test_image, bytes);
  return kTfLiteOk;
}
