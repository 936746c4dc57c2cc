// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
// The comparisons are written as TFLM writes them (copies, then !=, <=), so the compiler
// warns about the same mixed-signedness comparisons the real macros would.
#define TF_LITE_MICRO_TESTS_BEGIN int main() {
#define TF_LITE_MICRO_TESTS_END return 0; }
#define TF_LITE_MICRO_TEST(name) for (int name##_once = 1; name##_once; name##_once = 0)
#define TF_LITE_MICRO_EXPECT_EQ(x, y) do { auto vx = x; auto vy = y; (void)((vx) != (vy)); } while (false)
#define TF_LITE_MICRO_EXPECT_LE(x, y) do { auto vx = x; auto vy = y; (void)((vx) <= (vy)); } while (false)
#define TF_LITE_MICRO_EXPECT(x) do { (void)(x); } while (false)
