// Parity test: the C++ TFLM output for the embedded test image equals the score the
// TFLite reference kernels gave for the same int8 input (kTestImageExpectedScore,
// written by tools/tflite_to_c.py), within one quantization step.
#include <cstdlib>
#include <cstring>

#include "detection_responder.h"
#include "model_settings.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/testing/micro_test.h"
#include "tensorflow/lite/schema/schema_generated.h"
#include "test_image.h"

namespace {
alignas(16) uint8_t tensor_arena[kTensorArenaSize];
}  // namespace

TF_LITE_MICRO_TESTS_BEGIN

TF_LITE_MICRO_TEST(MelanomaModelMatchesPython) {
  const tflite::Model* model = tflite::GetModel(g_model_data);
  TF_LITE_MICRO_EXPECT_EQ(model->version(), static_cast<uint32_t>(TFLITE_SCHEMA_VERSION));
  tflite::MicroMutableOpResolver<kNumOps> resolver;
  TF_LITE_MICRO_EXPECT_EQ(RegisterModelOps(resolver), kTfLiteOk);
  tflite::MicroInterpreter interpreter(model, resolver, tensor_arena, kTensorArenaSize);
  TF_LITE_MICRO_EXPECT_EQ(interpreter.AllocateTensors(), kTfLiteOk);

  TfLiteTensor* input = interpreter.input(0);
  TF_LITE_MICRO_EXPECT_EQ(kTfLiteInt8, input->type);
  TF_LITE_MICRO_EXPECT_EQ(4, input->dims->size);
  TF_LITE_MICRO_EXPECT_EQ(kNumRows, input->dims->data[1]);
  TF_LITE_MICRO_EXPECT_EQ(kNumCols, input->dims->data[2]);
  TF_LITE_MICRO_EXPECT_EQ(static_cast<int>(input->bytes), static_cast<int>(g_test_image_len));
  std::memcpy(input->data.int8, g_test_image, input->bytes);

  TF_LITE_MICRO_EXPECT_EQ(interpreter.Invoke(), kTfLiteOk);
  TfLiteTensor* output = interpreter.output(0);
  TF_LITE_MICRO_EXPECT_EQ(kTfLiteInt8, output->type);
  const int score = output->data.int8[0];
  MicroPrintf("score %d, Python %d, arena used %d bytes", score, kTestImageExpectedScore,
              static_cast<int>(interpreter.arena_used_bytes()));
  TF_LITE_MICRO_EXPECT_LE(std::abs(score - kTestImageExpectedScore), 1);
  TF_LITE_MICRO_EXPECT_LE(static_cast<int>(interpreter.arena_used_bytes()), kTensorArenaSize);
}

TF_LITE_MICRO_TEST(ResponderUsesThresholdAndReferBand) {
  for (int score = -128; score <= 127; ++score) {
    const Decision expected = (score >= kReferLowQ && score <= kReferHighQ) ? Decision::kRefer
                              : score >= kThresholdQ                          ? Decision::kMelanoma
                                                                              : Decision::kNotMelanoma;
    TF_LITE_MICRO_EXPECT(Decide(static_cast<int8_t>(score)) == expected);
  }
}

TF_LITE_MICRO_TESTS_END
