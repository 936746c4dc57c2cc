// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
// Stricter than TFLM (which declares no format attribute): a mismatched argument is undefined behaviour on a board.
void MicroPrintf(const char* format, ...) __attribute__((format(printf, 1, 2)));
