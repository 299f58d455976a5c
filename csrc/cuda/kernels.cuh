// CUDA launchers of memgen's ops: CUDA runtime types only (no torch), raw pointers and a stream.
// Each returns the error of its launch (cudaSuccess when nothing had to run).
#pragma once

#include <cuda_runtime_api.h>

#include "../ops.h"

namespace memgen {
namespace cuda {

// Fused trigger scoring for all params.batch rows in one launch. A last token outside the
// delimiter table fails the kernel with a device-side assertion, as torch's own index kernels do
// (checking it on the host would cost a synchronisation per decode step).
cudaError_t trigger_scoring(const trigger::Params& params, cudaStream_t stream);

// Packs a ragged step in one launch; an index outside its source or a slot past the capacity
// fails with a device-side assertion.
cudaError_t pack(const ragged::PackParams& params, cudaStream_t stream);

// Writes a call's keys (or values) at per-row cache slots in one launch.
cudaError_t write_kv(const ragged::WriteParams& params, cudaStream_t stream);

}  // namespace cuda
}  // namespace memgen
