// CPU kernel of fused trigger scoring (see ops.h for the per-row semantics).
#include "kernels.h"

namespace memgen {
namespace cpu {
namespace {

using trigger::Mode;
using trigger::Params;

template <typename L, typename H, typename W>
void score_rows(const Params& p, int64_t begin, int64_t end) {
  for (int64_t row = begin; row < end; ++row) {
    if (!trigger::row_is_decision_point(p, row)) {
      p.decisions[row] = trigger::kNoDecision;
      continue;
    }
    float skip_logit = 0.0f;
    float invoke_logit = 0.0f;
    if (p.mode == Mode::kLogits) {
      trigger::row_logits<L>(p, row, &skip_logit, &invoke_logit);
    } else if (p.mode == Mode::kHead) {
      const int64_t h = p.hidden_size;
      const H* hidden_row = static_cast<const H*>(p.hidden) + row * h;
      const W* weight = static_cast<const W*>(p.head_weight);
      skip_logit = trigger::partial_dot(hidden_row, weight, 0, h, 1) +
                   trigger::load_as_float<W>(p.head_bias, 0);
      invoke_logit = trigger::partial_dot(hidden_row, weight + h, 0, h, 1) +
                     trigger::load_as_float<W>(p.head_bias, 1);
    }
    trigger::finish_row(p, row, skip_logit, invoke_logit);
  }
}

// Instantiates score_rows for the storage type of one dtype, then hands on the rest.
template <typename F>
void with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      return f(BF16Bits{});
    case DType::kFloat16:
      return f(F16Bits{});
    case DType::kFloat32:
    default:
      return f(float{});
  }
}

}  // namespace

int64_t first_token_out_of_range(const int64_t* tokens, int64_t n, int64_t vocab_size) {
  for (int64_t i = 0; i < n; ++i) {
    if (tokens[i] < 0 || tokens[i] >= vocab_size) return i;
  }
  return -1;
}

void trigger_scoring(const Params& p, int64_t begin, int64_t end) {
  switch (p.mode) {
    case Mode::kLogits:
      return with_storage_type(p.logits_dtype, [&](auto l) {
        return score_rows<decltype(l), float, float>(p, begin, end);
      });
    case Mode::kHead:
      return with_storage_type(p.hidden_dtype, [&](auto h) {
        return with_storage_type(p.head_dtype, [&](auto w) {
          return score_rows<float, decltype(h), decltype(w)>(p, begin, end);
        });
      });
    case Mode::kAlways:
    default:
      return score_rows<float, float, float>(p, begin, end);
  }
}

}  // namespace cpu
}  // namespace memgen
