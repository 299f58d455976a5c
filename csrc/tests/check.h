// A minimal check macro for the C++ unit tests: counts failures, prints where they happened.
#pragma once

#include <cstdio>

namespace memgen_test {
inline int& failures() {
  static int count = 0;
  return count;
}
}  // namespace memgen_test

#define CHECK(cond)                                                             \
  do {                                                                          \
    if (!(cond)) {                                                              \
      std::fprintf(stderr, "%s:%d: CHECK failed: %s\n", __FILE__, __LINE__, #cond); \
      ++memgen_test::failures();                                                \
    }                                                                           \
  } while (0)

#define TEST_MAIN_RESULT()                                                    \
  (memgen_test::failures() == 0 ? (std::printf("all checks passed\n"), 0)     \
                                : (std::fprintf(stderr, "%d checks failed\n", \
                                                memgen_test::failures()),     \
                                   1))
