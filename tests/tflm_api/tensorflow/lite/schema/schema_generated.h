// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#define TFLITE_SCHEMA_VERSION 3
namespace tflite { struct Model { unsigned int version() const { return 3; } }; inline const Model* GetModel(const void*) { return nullptr; } }
