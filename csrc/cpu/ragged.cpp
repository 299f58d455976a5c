// CPU kernels of the ragged-step ops (see ops.h, namespace ragged, for the per-item layout).
#include <cstring>

#include "kernels.h"

namespace memgen {
namespace cpu {
namespace {

template <typename Bits>
void fill_mask_row(char* out, int64_t visible_keys, int64_t width, Bits masked) {
  Bits* row = reinterpret_cast<Bits*>(out);
  const int64_t open = visible_keys < width ? visible_keys : width;
  for (int64_t k = 0; k < open; ++k) row[k] = Bits{0};
  for (int64_t k = open; k < width; ++k) row[k] = masked;
}

}  // namespace

void pack(const ragged::PackParams& p, int64_t begin, int64_t end) {
  const int64_t cols = ragged::width(p);
  const int64_t item_bytes = p.dim * ragged::size_of(p.dtype);
  const int64_t mask_row_bytes = p.visible * ragged::size_of(p.dtype);
  const uint32_t masked = ragged::masked_bits(p.dtype);
  for (int64_t g = begin; g < end; ++g) {
    for (int64_t col = 0; col < cols; ++col) {
      const ragged::Item item = ragged::item_of(p, g, col);
      const int64_t at = g * cols + col;
      p.positions[at] = item.position;
      p.slots[at] = item.slot;
      const char* source = ragged::item_source(p, g, col, item.real);
      if (source != nullptr) {
        std::memcpy(p.items + at * item_bytes, source, item_bytes);
      } else {
        std::memset(p.items + at * item_bytes, 0, item_bytes);
      }
      char* mask_row = p.mask + at * mask_row_bytes;
      if (p.dtype == DType::kFloat32) {
        fill_mask_row<uint32_t>(mask_row, item.visible, p.visible, masked);
      } else {
        fill_mask_row<uint16_t>(mask_row, item.visible, p.visible, static_cast<uint16_t>(masked));
      }
    }
  }
}

void write_kv(const ragged::WriteParams& p, int64_t begin, int64_t end) {
  const bool packed_dim = p.src_stride[3] == 1;
  for (int64_t index = begin; index < end; ++index) {
    const int64_t t = index % p.items;
    const int64_t h = (index / p.items) % p.heads;
    const int64_t g = index / (p.items * p.heads);
    char* dst = ragged::write_destination(p, g, h, t);
    const char* src = ragged::write_source(p, g, h, t);
    if (packed_dim) {
      std::memcpy(dst, src, p.head_dim * p.elem_size);
    } else {
      for (int64_t d = 0; d < p.head_dim; ++d) {
        std::memcpy(dst + d * p.elem_size, src + d * p.src_stride[3] * p.elem_size, p.elem_size);
      }
    }
  }
}

}  // namespace cpu
}  // namespace memgen
