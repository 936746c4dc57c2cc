// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#include "tensorflow/lite/c/common.h"
namespace tflite { class MicroOpResolver {}; template <unsigned int N> class MicroMutableOpResolver : public MicroOpResolver { public:
 TfLiteStatus AddAdd(); TfLiteStatus AddAveragePool2D(); TfLiteStatus AddConcatenation(); TfLiteStatus AddConv2D(); TfLiteStatus AddDepthwiseConv2D();
 TfLiteStatus AddDequantize(); TfLiteStatus AddFullyConnected(); TfLiteStatus AddHardSwish(); TfLiteStatus AddLogistic(); TfLiteStatus AddMaxPool2D();
 TfLiteStatus AddMaximum(); TfLiteStatus AddMean(); TfLiteStatus AddMinimum(); TfLiteStatus AddMul(); TfLiteStatus AddPad(); TfLiteStatus AddQuantize();
 TfLiteStatus AddRelu(); TfLiteStatus AddRelu6(); TfLiteStatus AddReshape(); TfLiteStatus AddSoftmax(); TfLiteStatus AddSub(); TfLiteStatus AddReduceMax(); }; }
