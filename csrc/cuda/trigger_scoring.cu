// CUDA kernel of fused trigger scoring: one warp per row (the head mode's two dot products are
// spread over the warp's lanes); see ops.h for the per-row semantics.
#undef NDEBUG  // the device-side range check below must survive release builds
#include <cassert>
#include <cstdint>

#include "kernels.cuh"

namespace memgen {
namespace cuda {
namespace {

using trigger::Params;

constexpr int kWarpSize = 32;
constexpr int kRowsPerBlock = 4;
constexpr unsigned kFullMask = 0xffffffffu;

__device__ __forceinline__ float warp_sum(float v) {
  for (int offset = kWarpSize / 2; offset > 0; offset /= 2) {
    v += __shfl_xor_sync(kFullMask, v, offset);
  }
  return v;
}

template <typename L, typename H, typename W>
__global__ void trigger_scoring_kernel(Params p) {
  const int lane = threadIdx.x % kWarpSize;
  const int64_t row = static_cast<int64_t>(blockIdx.x) * kRowsPerBlock + threadIdx.x / kWarpSize;
  if (row >= p.batch) return;  // whole warps leave together: a warp owns one row
  const int64_t token = p.last_tokens[row];
  assert(token >= 0 && token < p.vocab_size &&
         "memgen::trigger_scoring: a last token lies outside the delimiter table");
  const auto warp_dot = [&p, lane](const H* hidden_row, const W* weight_row) {
    return warp_sum(trigger::partial_dot(hidden_row, weight_row, lane, p.hidden_size, kWarpSize));
  };
  trigger::score_row<L, H, W>(p, row, /*writer=*/lane == 0, warp_dot);
}

template <typename L, typename H, typename W>
void launch(const Params& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.batch + kRowsPerBlock - 1) / kRowsPerBlock);
  trigger_scoring_kernel<L, H, W><<<blocks, kRowsPerBlock * kWarpSize, 0, stream>>>(p);
}

}  // namespace

cudaError_t trigger_scoring(const Params& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  trigger::dispatch_storage_types(p, [&](auto l, auto h, auto w) {
    launch<decltype(l), decltype(h), decltype(w)>(p, stream);
  });
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memgen
