// CUDA kernels of the ragged-step ops: one block per packed item (its bytes and its mask row
// spread over the threads), and one thread per element of a cache write. See ops.h (namespace
// ragged) for the layout.
#undef NDEBUG  // the device-side range checks below must survive release builds
#include <cassert>
#include <cstdint>

#include "kernels.cuh"

namespace memgen {
namespace cuda {
namespace {

constexpr int kThreads = 128;

template <typename Bits>
__global__ void pack_kernel(ragged::PackParams p) {
  const int64_t cols = ragged::width(p);
  const int64_t g = blockIdx.x / cols;
  const int64_t col = blockIdx.x % cols;
  const ragged::Item item = ragged::item_of(p, g, col);
  assert((!item.real || item.slot < p.capacity) &&
         "memgen: a ragged step writes past the cache capacity");
  assert(item.visible <= p.visible || !item.real);
  if (item.real) {
    const bool in_a = col < p.a_width;
    assert(ragged::source_in_range(in_a ? p.a : p.b, g, in_a ? col : col - p.a_width) &&
           "memgen: a ragged step reads outside its source (token id, row or item index)");
  }
  const int64_t at = g * cols + col;
  if (threadIdx.x == 0) {
    p.positions[at] = item.position;
    p.slots[at] = item.slot;
  }
  const Bits* source = reinterpret_cast<const Bits*>(ragged::item_source(p, g, col, item.real));
  Bits* out = reinterpret_cast<Bits*>(p.items) + at * p.dim;
  for (int64_t d = threadIdx.x; d < p.dim; d += blockDim.x) {
    out[d] = source != nullptr ? source[d] : Bits{0};
  }
  const Bits masked = static_cast<Bits>(ragged::masked_bits(p.dtype));
  Bits* mask_row = reinterpret_cast<Bits*>(p.mask) + at * p.visible;
  for (int64_t k = threadIdx.x; k < p.visible; k += blockDim.x) {
    mask_row[k] = k < item.visible ? Bits{0} : masked;
  }
}

template <typename Bits>
__global__ void write_kv_kernel(ragged::WriteParams p) {
  const int64_t total = p.groups * p.heads * p.items * p.head_dim;
  for (int64_t index = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; index < total;
       index += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const int64_t d = index % p.head_dim;
    const int64_t t = (index / p.head_dim) % p.items;
    const int64_t h = (index / (p.head_dim * p.items)) % p.heads;
    const int64_t g = index / (p.head_dim * p.items * p.heads);
    assert(p.rows[g] >= 0 && p.rows[g] < p.batch && "memgen::write_kv: a row index is out of range");
    assert(p.slots[g * p.items + t] >= 0 && p.slots[g * p.items + t] < p.seq &&
           "memgen::write_kv: a slot is out of range");
    Bits* dst = reinterpret_cast<Bits*>(ragged::write_destination(p, g, h, t));
    const Bits* src = reinterpret_cast<const Bits*>(ragged::write_source(p, g, h, t));
    dst[d] = src[d * p.src_stride[3]];
  }
}

}  // namespace

cudaError_t pack(const ragged::PackParams& p, cudaStream_t stream) {
  const int64_t blocks = p.groups * ragged::width(p);
  if (blocks == 0) return cudaSuccess;
  if (p.dtype == DType::kFloat32) {
    pack_kernel<uint32_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  } else {
    pack_kernel<uint16_t><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

cudaError_t write_kv(const ragged::WriteParams& p, cudaStream_t stream) {
  const int64_t total = p.groups * p.heads * p.items * p.head_dim;
  if (total == 0) return cudaSuccess;
  const int64_t wanted = (total + kThreads - 1) / kThreads;
  const unsigned blocks = static_cast<unsigned>(wanted < 65535 ? wanted : 65535);
  if (p.elem_size == 4) {
    write_kv_kernel<uint32_t><<<blocks, kThreads, 0, stream>>>(p);
  } else {
    write_kv_kernel<uint16_t><<<blocks, kThreads, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace cuda
}  // namespace memgen
