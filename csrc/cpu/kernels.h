// CPU kernels of memgen's ops: torch-free, over raw pointers, one row range per call so that the
// torch binding can hand ranges to at::parallel_for and the C++ tests can call them directly.
#pragma once

#include <cstdint>

#include "../ops.h"

namespace memgen {
namespace cpu {

// Index of the first entry of tokens[0, n) outside [0, vocab_size), or -1 when all are valid.
// Bindings run it before any kernel writes, so bad input fails before any work is done.
int64_t first_token_out_of_range(const int64_t* tokens, int64_t n, int64_t vocab_size);

// Fused trigger scoring over rows [begin, end); every last token must be in range.
void trigger_scoring(const trigger::Params& params, int64_t begin, int64_t end);

// Packs rows [begin, end) of a ragged step: items, positions, slots and mask (ops.h, ragged).
// Every index the layout reads must be in range (checked by the caller).
void pack(const ragged::PackParams& params, int64_t begin, int64_t end);

// Writes entries [begin, end) of the flattened (row, head, item) range of a cache write.
void write_kv(const ragged::WriteParams& params, int64_t begin, int64_t end);

}  // namespace cpu
}  // namespace memgen
