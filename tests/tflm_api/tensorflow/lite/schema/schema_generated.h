// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#include <cstdint>
// As in TFLM: version() is unsigned (uint32_t), and TFLITE_SCHEMA_VERSION lives in micro_interpreter.h.
namespace tflite { struct Model { uint32_t version() const; }; const Model* GetModel(const void* buf); }
