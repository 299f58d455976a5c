// Unit tests of the per-row trigger logic (csrc/ops.h) and the CPU kernel built on it.
#include <cmath>
#include <cstdint>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "ops.h"

using namespace memgen;
using namespace memgen::trigger;

static void test_float_conversions() {
  CHECK(to_float(BF16Bits{0x3F80}) == 1.0f);
  CHECK(to_float(BF16Bits{0xC000}) == -2.0f);
  CHECK(std::isinf(to_float(BF16Bits{0x7F80})));
  CHECK(to_float(F16Bits{0x3C00}) == 1.0f);
  CHECK(to_float(F16Bits{0xC000}) == -2.0f);
  CHECK(to_float(F16Bits{0x7BFF}) == 65504.0f);
  CHECK(to_float(F16Bits{0x0400}) == std::ldexp(1.0f, -14));
  CHECK(to_float(F16Bits{0x0001}) == std::ldexp(1.0f, -24));
  CHECK(to_float(F16Bits{0x03FF}) == std::ldexp(1023.0f, -24));
  CHECK(to_float(F16Bits{0x3555}) == 0.333251953125f);
  CHECK(std::signbit(to_float(F16Bits{0x8000})) && to_float(F16Bits{0x8000}) == 0.0f);
  CHECK(std::isinf(to_float(F16Bits{0x7C00})) && to_float(F16Bits{0xFC00}) < 0.0f);
  CHECK(std::isnan(to_float(F16Bits{0x7E00})));
  // Every positive finite half converts to a strictly larger float than the one before it.
  for (uint32_t bits = 1; bits <= 0x7BFF; ++bits) {
    CHECK(to_float(F16Bits{static_cast<uint16_t>(bits)}) >
          to_float(F16Bits{static_cast<uint16_t>(bits - 1)}));
    CHECK(to_float(F16Bits{static_cast<uint16_t>(bits | 0x8000)}) ==
          -to_float(F16Bits{static_cast<uint16_t>(bits)}));
  }
}

static void test_decision_points() {
  CHECK(!is_decision_point(/*finished=*/true, /*prompt=*/true, true, 0, 5));
  CHECK(is_decision_point(false, true, false, 9, 0));  // prompt step: no delimiter or budget rule
  CHECK(is_decision_point(false, false, true, 4, 5));
  CHECK(!is_decision_point(false, false, true, 5, 5));  // budget spent
  CHECK(!is_decision_point(false, false, false, 0, 5));  // no delimiter
  CHECK(!is_decision_point(false, false, true, 0, 0));  // budget 0: never
}

static void test_decide() {
  CHECK(decide(1.0f, 1.0f, false, 1.0f, 0.0f) == kSkip);  // ties go to SKIP
  CHECK(decide(NAN, 1.0f, false, 1.0f, 0.0f) == kSkip);
  CHECK(decide(0.0f, NAN, true, 1.0f, 0.0f) == kSkip);
  CHECK(decide(0.0f, 0.5f, false, 1.0f, 0.0f) == kInvoke);
  CHECK(decide(0.5f, 0.0f, false, 1.0f, 0.0f) == kSkip);
  CHECK(decide(2.0f, 2.0f, true, 1.0f, 0.49f) == kInvoke);  // p = 0.5
  CHECK(decide(2.0f, 2.0f, true, 1.0f, 0.5f) == kSkip);
  CHECK(decide(1000.0f, 0.0f, true, 1.0f, 0.0f) == kSkip);  // p underflows to 0
  CHECK(decide(0.0f, 1000.0f, true, 1.0f, 0.999999f) == kInvoke);  // p == 1
  const float p = 1.0f / (1.0f + std::exp(-1.0f / 0.25f));     // sigmoid(1 / T)
  CHECK(decide(0.0f, 1.0f, true, 0.25f, p - 1e-4f) == kInvoke);
  CHECK(decide(0.0f, 1.0f, true, 0.25f, p + 1e-4f) == kSkip);
  CHECK(next_count(2, kInvoke, false) == 3);
  CHECK(next_count(2, kInvoke, true) == 2);  // the prompt weave is not an inference memory
  CHECK(next_count(2, kSkip, false) == 2 && next_count(2, kNoDecision, false) == 2);
}

struct Batch {
  std::vector<int64_t> tokens{0, 1, 2, 1, 1};
  bool table[3] = {false, true, true};
  std::vector<int32_t> counts{0, 0, 0, 2, 1};
  bool finished[5] = {false, false, false, false, true};
  std::vector<int8_t> decisions = std::vector<int8_t>(5, 42);
  Params params() {
    Params p;
    p.batch = 5;
    p.last_tokens = tokens.data();
    p.delimiter_table = table;
    p.vocab_size = 3;
    p.counts = counts.data();
    p.budget = 2;
    p.finished = finished;
    p.decisions = decisions.data();
    return p;
  }
};

static void test_cpu_kernel_modes() {
  {  // always: row 0 no delimiter, 1 and 2 invoke, 3 over budget, 4 finished
    Batch b;
    cpu::trigger_scoring(b.params(), 0, 5);
    CHECK((b.decisions == std::vector<int8_t>{kNoDecision, kInvoke, kInvoke, kNoDecision, kNoDecision}));
    CHECK((b.counts == std::vector<int32_t>{0, 1, 1, 2, 1}));
  }
  {  // lora, float32 logits, greedy, split into two row ranges
    Batch b;
    const float logits[10] = {0, 0, 0, 1, 1, 0, 0, 9, 0, 9};
    Params p = b.params();
    p.mode = Mode::kLogits;
    p.logits = logits;
    cpu::trigger_scoring(p, 0, 2);
    cpu::trigger_scoring(p, 2, 5);
    CHECK((b.decisions == std::vector<int8_t>{kNoDecision, kInvoke, kSkip, kNoDecision, kNoDecision}));
    CHECK((b.counts == std::vector<int32_t>{0, 1, 0, 2, 1}));
  }
  {  // head, bfloat16 hidden and float32 weights, sampling; prompt step leaves counts alone
    Batch b;
    const uint16_t hidden_bits[10] = {0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80,
                                      0x3F80, 0x3F80, 0x3F80, 0x3F80, 0x3F80};  // all 1.0
    const float weight[4] = {0.5f, 0.5f, 0.0f, 0.0f};                      // skip = 1, invoke = 0
    const float bias[2] = {0.0f, 1.0f};                                    // -> skip = invoke = 1
    const float uniforms[5] = {0.1f, 0.4f, 0.6f, 0.9f, 0.0f};
    Params p = b.params();
    p.mode = Mode::kHead;
    p.hidden = hidden_bits;
    p.hidden_dtype = DType::kBFloat16;
    p.head_weight = weight;
    p.head_bias = bias;
    p.hidden_size = 2;
    p.do_sample = true;
    p.uniforms = uniforms;
    p.prompt_step = true;
    cpu::trigger_scoring(p, 0, 5);  // p_invoke = 0.5 for every row
    CHECK((b.decisions == std::vector<int8_t>{kInvoke, kInvoke, kSkip, kSkip, kNoDecision}));
    CHECK((b.counts == std::vector<int32_t>{0, 0, 0, 2, 1}));
  }
}

static void test_token_range() {
  const int64_t tokens[4] = {0, 2, 3, -1};
  CHECK(cpu::first_token_out_of_range(tokens, 2, 3) == -1);
  CHECK(cpu::first_token_out_of_range(tokens, 4, 3) == 2);
  CHECK(cpu::first_token_out_of_range(tokens + 3, 1, 3) == 0);
}

int main() {
  test_float_conversions();
  test_decision_points();
  test_decide();
  test_cpu_kernel_modes();
  test_token_range();
  return TEST_MAIN_RESULT();
}
