// Arduino-style entry points, as in TFLite-Micro's examples.
#ifndef MELANOMA_MAIN_FUNCTIONS_H_
#define MELANOMA_MAIN_FUNCTIONS_H_

#include "tensorflow/lite/c/common.h"

// Maps the model, registers its ops and allocates the tensor arena.
void setup();

// Gets an image, runs the model and responds to the score.
void loop();

// One loop() that says whether it worked: kTfLiteError when setup() failed or the
// image, the inference or the model's output could not be had.
TfLiteStatus RunInference();

#endif  // MELANOMA_MAIN_FUNCTIONS_H_
