// Unit tests of the ragged-step layout (csrc/ops.h) and the CPU packing and cache-write kernels,
// run under AddressSanitizer so that an out-of-bounds copy fails here first.
#include <cstdint>
#include <cstring>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "ops.h"

using namespace memgen;
using namespace memgen::ragged;

static void test_layout() {
  // Block A has width 3 with 2 real items, block B width 2 with 1 real item; the row holds 5 items.
  const Item a0 = layout_item(0, 5, 2, 3, 1, 20);
  CHECK(a0.real && a0.slot == 5 && a0.position == 5 && a0.visible == 6);
  const Item a2 = layout_item(2, 5, 2, 3, 1, 20);  // padding inside block A
  CHECK(!a2.real && a2.slot == 20 && a2.position == 7 && a2.visible == 8);
  const Item b0 = layout_item(3, 5, 2, 3, 1, 20);  // block B follows A's real items
  CHECK(b0.real && b0.slot == 7 && b0.position == 7 && b0.visible == 8);
  const Item b1 = layout_item(4, 5, 2, 3, 1, 20);
  CHECK(!b1.real && b1.slot == 20);
  const Item empty = layout_item(0, 0, 0, 1, 0, 4);  // an empty row's padding still sees one slot
  CHECK(!empty.real && empty.position == 0 && empty.visible == 1);
  CHECK(masked_bits(DType::kFloat32) == 0xff7fffffu && masked_bits(DType::kBFloat16) == 0xff7fu &&
        masked_bits(DType::kFloat16) == 0xfbffu);
}

static void test_pack_step_kernel() {
  // Two rows: a token each, then up to 2 latents (row 0: 2, row 1: 0); dim 3, float32.
  const std::vector<float> embed = {0, 0, 0, 1, 1, 1, 2, 2, 2, 3, 3, 3};
  const std::vector<float> latents = {10, 11, 12, 13, 14, 15, 20, 21, 22, 23, 24, 25};
  const std::vector<int64_t> tokens = {3, 1};
  const std::vector<int32_t> lengths = {2, 0}, n_latents = {2, 0};
  const int64_t cols = 3, dim = 3, visible = 5;
  std::vector<float> items(2 * cols * dim, -1.0f), mask(2 * cols * visible, 7.0f);
  std::vector<int64_t> positions(2 * cols), slots(2 * cols);
  PackParams p;
  p.groups = 2;
  p.a_width = 1;
  p.b_width = 2;
  p.dim = dim;
  p.capacity = 9;
  p.visible = visible;
  p.lengths = lengths.data();
  p.n_b = n_latents.data();
  p.a = Source{reinterpret_cast<const char*>(embed.data()), dim * 4, 0, tokens.data(), nullptr, 4, 1};
  p.b = Source{reinterpret_cast<const char*>(latents.data()), 2 * dim * 4, dim * 4, nullptr, nullptr, 2, 2};
  p.items = reinterpret_cast<char*>(items.data());
  p.positions = positions.data();
  p.slots = slots.data();
  p.mask = reinterpret_cast<char*>(mask.data());
  cpu::pack(p, 0, 2);
  CHECK(items[0] == 3 && items[3] == 10 && items[6] == 13);  // row 0: token 3, latents 0 and 1
  CHECK(items[9] == 1 && items[12] == 0 && items[15] == 0);  // row 1: token 1, then padding
  CHECK(slots[0] == 2 && slots[1] == 3 && slots[2] == 4 && slots[3] == 0 && slots[4] == 9);
  CHECK(positions[2] == 4 && positions[4] == 0);
  float masked;
  const uint32_t bits = masked_bits(DType::kFloat32);
  std::memcpy(&masked, &bits, sizeof(masked));
  CHECK(mask[0] == 0 && mask[2] == 0 && mask[3] == masked);  // row 0's token sees slots 0..2
  CHECK(mask[3 * visible + 0] == 0 && mask[3 * visible + 1] == masked);  // row 1's token sees slot 0
}

static void test_write_kv_kernel() {
  // dst [2 rows, 1 head, 4 slots, 2 dims]; src [1 group, 1 head, 2 items, 2 dims] stored transposed.
  std::vector<float> dst(2 * 4 * 2, 0.0f);
  const std::vector<float> src = {1, 2, 3, 4};  // item t, dim d at t * 2 + d
  const std::vector<int64_t> rows = {1}, slots = {3, 0};
  WriteParams p;
  p.groups = 1;
  p.heads = 1;
  p.items = 2;
  p.head_dim = 2;
  p.elem_size = 4;
  p.batch = 2;
  p.seq = 4;
  p.rows = rows.data();
  p.slots = slots.data();
  p.dst = reinterpret_cast<char*>(dst.data());
  p.src = reinterpret_cast<const char*>(src.data());
  p.src_stride[0] = 4;
  p.src_stride[1] = 4;
  p.src_stride[2] = 2;
  p.src_stride[3] = 1;
  cpu::write_kv(p, 0, 2);
  CHECK(dst[8 + 6] == 1 && dst[8 + 7] == 2 && dst[8 + 0] == 3 && dst[8 + 1] == 4);
  p.src_stride[2] = 1;  // the same data read as [d, t]: a strided last dimension
  p.src_stride[3] = 2;
  cpu::write_kv(p, 0, 2);
  CHECK(dst[8 + 6] == 1 && dst[8 + 7] == 3 && dst[8 + 0] == 2 && dst[8 + 1] == 4);
  for (int i = 0; i < 8; ++i) CHECK(dst[i] == 0.0f);  // row 0 untouched
}

int main() {
  test_layout();
  test_pack_step_kernel();
  test_write_kv_kernel();
  return TEST_MAIN_RESULT();
}
