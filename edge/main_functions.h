// Arduino-style entry points, as in TFLite-Micro's examples.
#ifndef MELANOMA_MAIN_FUNCTIONS_H_
#define MELANOMA_MAIN_FUNCTIONS_H_

// Maps the model, registers its ops and allocates the tensor arena.
void setup();

// Gets an image, runs the model and responds to the score.
void loop();

#endif  // MELANOMA_MAIN_FUNCTIONS_H_
