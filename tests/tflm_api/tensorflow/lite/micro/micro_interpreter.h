// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#include "tensorflow/lite/c/common.h"
#include "tensorflow/lite/micro/micro_mutable_op_resolver.h"
#include "tensorflow/lite/schema/schema_generated.h"
#define TFLITE_SCHEMA_VERSION (3)
namespace tflite { class MicroInterpreter { public: MicroInterpreter(const Model*, const MicroOpResolver&, uint8_t*, size_t);
 TfLiteStatus AllocateTensors(); TfLiteStatus Invoke(); TfLiteTensor* input(size_t); TfLiteTensor* output(size_t); size_t arena_used_bytes() const; }; }
