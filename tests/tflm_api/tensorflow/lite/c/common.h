// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#include <cstddef>
#include <cstdint>
typedef enum { kTfLiteOk = 0, kTfLiteError = 1 } TfLiteStatus;
typedef enum { kTfLiteInt8 = 9 } TfLiteType;
struct TfLiteIntArray { int size; int data[4]; };
union TfLitePtrUnion { int8_t* int8; uint8_t* uint8; float* f; };
struct TfLiteTensor { TfLiteType type; TfLitePtrUnion data; TfLiteIntArray* dims; size_t bytes; };
