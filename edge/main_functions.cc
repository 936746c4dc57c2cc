#include "main_functions.h"

#include "detection_responder.h"
#include "image_provider.h"
#include "model_settings.h"
#include "tensorflow/lite/micro/micro_interpreter.h"
#include "tensorflow/lite/micro/micro_log.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/micro/system_setup.h"
#include "tensorflow/lite/schema/schema_generated.h"

namespace {
const tflite::Model* model = nullptr;
tflite::MicroInterpreter* interpreter = nullptr;
TfLiteTensor* input = nullptr;

// One static arena for every tensor; its size was measured with the TFLM
// interpreter by melanoma_tf.quantize (plus headroom) and written to model_data.h.
alignas(16) uint8_t tensor_arena[kTensorArenaSize];
}  // namespace

void setup() {
  tflite::InitializeTarget();
  model = tflite::GetModel(g_model_data);
  if (model->version() != TFLITE_SCHEMA_VERSION) {
    MicroPrintf("Model schema version %d is not the supported %d.", model->version(), TFLITE_SCHEMA_VERSION);
    return;
  }
  // Only the ops this model uses (generated list): smaller flash than AllOpsResolver.
  static tflite::MicroMutableOpResolver<kNumOps> resolver;
  if (RegisterModelOps(resolver) != kTfLiteOk) {
    MicroPrintf("Registering the model's ops failed.");
    return;
  }
  static tflite::MicroInterpreter static_interpreter(model, resolver, tensor_arena, kTensorArenaSize);
  interpreter = &static_interpreter;
  if (interpreter->AllocateTensors() != kTfLiteOk) {
    MicroPrintf("AllocateTensors() failed: arena of %d bytes too small?", kTensorArenaSize);
    return;
  }
  MicroPrintf("Arena used: %d of %d bytes.", static_cast<int>(interpreter->arena_used_bytes()), kTensorArenaSize);
  input = interpreter->input(0);
}

TfLiteStatus RunInference() {
  if (input == nullptr) {
    return kTfLiteError;
  }
  if (GetImage(kNumCols, kNumRows, kNumChannels, input->data.int8) != kTfLiteOk) {
    MicroPrintf("Image capture failed.");
    return kTfLiteError;
  }
  if (interpreter->Invoke() != kTfLiteOk) {
    MicroPrintf("Invoke failed.");
    return kTfLiteError;
  }
  RespondToDetection(interpreter->output(0)->data.int8[0]);
  return kTfLiteOk;
}

void loop() { RunInference(); }
