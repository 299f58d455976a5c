// CUDA kernel of fused trigger scoring: one warp per row (the head mode's two dot products are
// spread over the warp's lanes); see ops.h for the per-row semantics.
#undef NDEBUG  // the device-side range check below must survive release builds
#include <cassert>
#include <cstdint>

#include "kernels.cuh"

namespace memgen {
namespace cuda {
namespace {

using trigger::Mode;
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
  const bool decides = trigger::row_is_decision_point(p, row);
  if (!decides) {
    if (lane == 0) p.decisions[row] = trigger::kNoDecision;
    return;
  }
  float skip_logit = 0.0f;
  float invoke_logit = 0.0f;
  if (p.mode == Mode::kLogits) {
    trigger::row_logits<L>(p, row, &skip_logit, &invoke_logit);
  } else if (p.mode == Mode::kHead) {
    const int64_t h = p.hidden_size;
    const H* hidden_row = static_cast<const H*>(p.hidden) + row * h;
    const W* weight = static_cast<const W*>(p.head_weight);
    skip_logit = warp_sum(trigger::partial_dot(hidden_row, weight, lane, h, kWarpSize)) +
                 trigger::load_as_float<W>(p.head_bias, 0);
    invoke_logit = warp_sum(trigger::partial_dot(hidden_row, weight + h, lane, h, kWarpSize)) +
                   trigger::load_as_float<W>(p.head_bias, 1);
  }
  if (lane == 0) trigger::finish_row(p, row, skip_logit, invoke_logit);
}

template <typename F>
void with_storage_type(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kBFloat16:
      f(BF16Bits{});
      break;
    case DType::kFloat16:
      f(F16Bits{});
      break;
    case DType::kFloat32:
    default:
      f(float{});
      break;
  }
}

template <typename L, typename H, typename W>
void launch(const Params& p, cudaStream_t stream) {
  const unsigned blocks = static_cast<unsigned>((p.batch + kRowsPerBlock - 1) / kRowsPerBlock);
  trigger_scoring_kernel<L, H, W><<<blocks, kRowsPerBlock * kWarpSize, 0, stream>>>(p);
}

}  // namespace

cudaError_t trigger_scoring(const Params& p, cudaStream_t stream) {
  if (p.batch == 0) return cudaSuccess;
  switch (p.mode) {
    case Mode::kLogits:
      with_storage_type(p.logits_dtype,
                        [&](auto l) { launch<decltype(l), float, float>(p, stream); });
      break;
    case Mode::kHead:
      with_storage_type(p.hidden_dtype, [&](auto h) {
        with_storage_type(p.head_dtype,
                          [&](auto w) { launch<float, decltype(h), decltype(w)>(p, stream); });
      });
      break;
    case Mode::kAlways:
    default:
      launch<float, float, float>(p, stream);
      break;
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memgen
