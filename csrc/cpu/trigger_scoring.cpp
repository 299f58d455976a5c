// CPU kernel of fused trigger scoring (see ops.h for the per-row semantics).
#include "kernels.h"

namespace memgen {
namespace cpu {
namespace {

using trigger::Params;

template <typename L, typename H, typename W>
void score_rows(const Params& p, int64_t begin, int64_t end) {
  const auto dot = [&p](const H* hidden_row, const W* weight_row) {
    return trigger::partial_dot(hidden_row, weight_row, 0, p.hidden_size, 1);
  };
  for (int64_t row = begin; row < end; ++row) {
    trigger::score_row<L, H, W>(p, row, /*writer=*/true, dot);
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
  trigger::dispatch_storage_types(p, [&](auto l, auto h, auto w) {
    score_rows<decltype(l), decltype(h), decltype(w)>(p, begin, end);
  });
}

}  // namespace cpu
}  // namespace memgen
