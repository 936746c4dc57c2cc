#include "main_functions.h"

// On a board, setup() and loop() are called by its runtime; here: run once per image forever.
int main() {
  setup();
  while (true) {
    loop();
  }
}
