#include "main_functions.h"
#include "tensorflow/lite/micro/micro_log.h"

// On a board, setup() and loop() are called by its runtime and loop() runs once per image forever.
// `make -C edge host|qemu` defines MELANOMA_INFERENCES: the binary then runs that many inferences
// and exits (0 when every one worked), so a run on this machine or under an emulator ends.
int main() {
  setup();
#ifdef MELANOMA_INFERENCES
  for (int i = 0; i < MELANOMA_INFERENCES; ++i) {
    if (RunInference() != kTfLiteOk) {
      MicroPrintf("Inference %d of %d failed.", i + 1, MELANOMA_INFERENCES);
      return 1;
    }
  }
  MicroPrintf("Ran %d inferences.", MELANOMA_INFERENCES);
  return 0;
#else
  while (true) {
    loop();
  }
#endif
}
