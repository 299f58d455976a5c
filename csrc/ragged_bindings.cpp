// Torch face of the ragged-step ops (latent-token injection and the batched weaver forward):
// argument checks, then the torch-free kernels of csrc/cpu and csrc/cuda. Schemas are defined
// with the others in bindings.cpp. On the CPU every index is checked before any output is
// written; on CUDA the kernels assert them on the device (a host check would cost a sync).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <tuple>

#include "binding_utils.h"
#include "cpu/kernels.h"

#ifdef MEMGEN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace memgen {
namespace {

constexpr const char* kPackStep = "memgen::pack_step";
constexpr const char* kPackRagged = "memgen::pack_ragged";
constexpr const char* kWriteKV = "memgen::write_kv";

using Packed = std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor>;

// Inputs and outputs of one packing call, kept alive while the kernel runs.
struct PackCall {
  ragged::PackParams params;
  at::Tensor keep[6];
  at::Tensor items, positions, slots, mask;
};

const char* bytes(const at::Tensor& t) { return static_cast<const char*>(t.const_data_ptr()); }

int64_t element_size(DType dtype) { return ragged::size_of(dtype); }

void check_int_vector(const at::Tensor& t, const char* name, at::ScalarType dtype, int64_t groups,
                      const at::Device& device, const char* op) {
  check_tensor(t, name, dtype, {groups}, device, op);
}

void check_sizes(int64_t capacity, int64_t visible, const char* op) {
  TORCH_CHECK_VALUE(capacity >= 1, op, ": argument 'capacity' must be >= 1, got ", capacity);
  TORCH_CHECK_VALUE(visible >= 1 && visible <= capacity, op,
                    ": argument 'visible' must lie in [1, capacity = ", capacity, "], got ",
                    visible);
}

// Host-side check of every index the layout will read or write (CPU tensors only).
void check_layout_on_host(const ragged::PackParams& p, const char* op, const char* a_name,
                          const char* b_name) {
  for (int64_t g = 0; g < p.groups; ++g) {
    const int64_t length = p.lengths[g];
    const int64_t n_a = p.n_a != nullptr ? p.n_a[g] : p.a_width;
    const int64_t n_b = p.n_b != nullptr ? p.n_b[g] : p.b_width;
    TORCH_CHECK_VALUE(length >= 0, op, ": lengths[", g, "] = ", length, " must be >= 0");
    TORCH_CHECK_VALUE(n_a >= 0 && n_a <= p.a_width, op, ": row ", g, " has ", n_a, " ", a_name,
                      " items, expected 0..", p.a_width);
    TORCH_CHECK_VALUE(n_b >= 0 && n_b <= p.b_width, op, ": row ", g, " has ", n_b, " ", b_name,
                      " items, expected 0..", p.b_width);
    const int64_t end = length + n_a + n_b;
    TORCH_CHECK_VALUE(end <= p.capacity, op, ": row ", g, " would hold ", end,
                      " items, past the cache capacity ", p.capacity);
    TORCH_CHECK_VALUE(end <= p.visible, op, ": row ", g, " would hold ", end,
                      " items, past the mask width 'visible' = ", p.visible);
    if (n_a > 0) {
      TORCH_CHECK_VALUE(ragged::source_in_range(p.a, g, 0) && ragged::source_in_range(p.a, g, n_a - 1),
                        op, ": row ", g, " reads ", a_name, " items outside their source");
    }
    if (n_b > 0) {
      TORCH_CHECK_VALUE(ragged::source_in_range(p.b, g, 0) && ragged::source_in_range(p.b, g, n_b - 1),
                        op, ": row ", g, " reads ", b_name, " items outside their source");
    }
  }
}

void allocate_outputs(PackCall& call, const at::TensorOptions& float_options) {
  ragged::PackParams& p = call.params;
  const int64_t cols = p.a_width + p.b_width;
  call.items = at::empty({p.groups, cols, p.dim}, float_options);
  call.positions = at::empty({p.groups, cols}, float_options.dtype(at::kLong));
  call.slots = at::empty({p.groups, cols}, float_options.dtype(at::kLong));
  call.mask = at::empty({p.groups, 1, cols, p.visible}, float_options);
  p.items = static_cast<char*>(call.items.data_ptr());
  p.positions = call.positions.data_ptr<int64_t>();
  p.slots = call.slots.data_ptr<int64_t>();
  p.mask = static_cast<char*>(call.mask.data_ptr());
}

void run_pack_cpu(const PackCall& call, const char* op, const char* a_name, const char* b_name) {
  const ragged::PackParams& p = call.params;
  check_layout_on_host(p, op, a_name, b_name);
  const int64_t per_row = (p.a_width + p.b_width) * (p.dim + p.visible);
  const int64_t grain = std::max<int64_t>(1, 65536 / std::max<int64_t>(1, per_row));
  at::parallel_for(0, p.groups, grain, [&](int64_t begin, int64_t end) { cpu::pack(p, begin, end); });
}

#ifdef MEMGEN_WITH_CUDA
void run_pack_cuda(const PackCall& call, const char* op, const char*, const char*) {
  const c10::cuda::CUDAGuard guard(call.items.device());
  const cudaError_t err = cuda::pack(call.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, op, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

using PackRunner = void (*)(const PackCall&, const char*, const char*, const char*);

// pack_step: the pending token of every row (if `tokens` is given), then latents[g, :n_latents[g]].
template <PackRunner Run>
Packed pack_step(const c10::optional<at::Tensor>& tokens, const at::Tensor& embed_weight,
                 const c10::optional<at::Tensor>& latents,
                 const c10::optional<at::Tensor>& n_latents, const at::Tensor& lengths,
                 int64_t capacity, int64_t visible) {
  const char* op = kPackStep;
  TORCH_CHECK_VALUE(lengths.dim() == 1, op, ": argument 'lengths' must be int32[G], got ",
                    describe(lengths));
  const int64_t groups = lengths.size(0);
  const at::Device device = lengths.device();
  check_int_vector(lengths, "lengths", at::kInt, groups, device, op);
  TORCH_CHECK_VALUE(embed_weight.dim() == 2 && embed_weight.device() == device, op,
                    ": argument 'embed_weight' must be a float tensor [V, d] on ", device.str(),
                    ", got ", describe(embed_weight));
  PackCall call;
  ragged::PackParams& p = call.params;
  p.dtype = float_dtype(embed_weight, "embed_weight", op);
  p.dim = embed_weight.size(1);
  TORCH_CHECK_VALUE(tokens.has_value() || latents.has_value(), op,
                    ": nothing to pack: pass 'tokens', 'latents' or both");
  check_sizes(capacity, visible, op);
  p.groups = groups;
  p.capacity = capacity;
  p.visible = visible;
  const int64_t es = element_size(p.dtype);
  call.keep[0] = lengths.contiguous();
  p.lengths = call.keep[0].const_data_ptr<int32_t>();
  if (tokens.has_value()) {
    check_int_vector(*tokens, "tokens", at::kLong, groups, device, op);
    call.keep[1] = tokens->contiguous();
    call.keep[2] = embed_weight.contiguous();
    p.a_width = 1;
    p.a.data = bytes(call.keep[2]);
    p.a.row_stride = p.dim * es;
    p.a.row_index = call.keep[1].const_data_ptr<int64_t>();
    p.a.row_count = embed_weight.size(0);
    p.a.item_count = 1;
  }
  if (latents.has_value()) {
    const at::Tensor& l = *latents;
    TORCH_CHECK_VALUE(l.dim() == 3 && l.size(0) == groups && l.size(2) == p.dim &&
                          l.scalar_type() == embed_weight.scalar_type() && l.device() == device,
                      op, ": argument 'latents' must be ", c10::toString(embed_weight.scalar_type()),
                      "[", groups, ", K, ", p.dim, "] on ", device.str(), ", got ", describe(l));
    TORCH_CHECK_VALUE(n_latents.has_value(), op,
                      ": argument 'n_latents' (int32[G], latents per row) is required with 'latents'");
    check_int_vector(*n_latents, "n_latents", at::kInt, groups, device, op);
    call.keep[3] = l.contiguous();
    call.keep[4] = n_latents->contiguous();
    p.b_width = l.size(1);
    p.n_b = call.keep[4].const_data_ptr<int32_t>();
    p.b.data = bytes(call.keep[3]);
    p.b.row_stride = p.b_width * p.dim * es;
    p.b.item_stride = p.dim * es;
    p.b.row_count = groups;
    p.b.item_count = p.b_width;
  } else {
    TORCH_CHECK_VALUE(!n_latents.has_value(), op,
                      ": argument 'n_latents' must be None without 'latents'");
  }
  allocate_outputs(call, embed_weight.options());
  Run(call, op, "token", "latent");
  return {call.items, call.positions, call.slots, call.mask};
}

// pack_ragged: stream[rows[g], lengths[g] : lengths[g] + pending[g]] (the items row g's cache
// has not seen), then the queries (if given) for every row.
template <PackRunner Run>
Packed pack_ragged(const at::Tensor& stream, const at::Tensor& rows, const at::Tensor& lengths,
                   const at::Tensor& pending, int64_t width,
                   const c10::optional<at::Tensor>& queries, int64_t capacity, int64_t visible) {
  const char* op = kPackRagged;
  TORCH_CHECK_VALUE(rows.dim() == 1, op, ": argument 'rows' must be int64[G], got ", describe(rows));
  const int64_t groups = rows.size(0);
  const at::Device device = rows.device();
  check_int_vector(rows, "rows", at::kLong, groups, device, op);
  check_int_vector(lengths, "lengths", at::kInt, groups, device, op);
  check_int_vector(pending, "pending", at::kInt, groups, device, op);
  TORCH_CHECK_VALUE(stream.dim() == 3 && stream.device() == device, op,
                    ": argument 'stream' must be a float tensor [B, S, d] on ", device.str(),
                    ", got ", describe(stream));
  TORCH_CHECK_VALUE(width >= 0, op, ": argument 'width' must be >= 0, got ", width);
  check_sizes(capacity, visible, op);
  PackCall call;
  ragged::PackParams& p = call.params;
  p.dtype = float_dtype(stream, "stream", op);
  p.dim = stream.size(2);
  p.groups = groups;
  p.capacity = capacity;
  p.visible = visible;
  const int64_t es = element_size(p.dtype);
  call.keep[0] = lengths.contiguous();
  call.keep[1] = rows.contiguous();
  call.keep[2] = pending.contiguous();
  call.keep[3] = stream.contiguous();
  p.lengths = call.keep[0].const_data_ptr<int32_t>();
  p.a_width = width;
  p.n_a = call.keep[2].const_data_ptr<int32_t>();
  p.a.data = bytes(call.keep[3]);
  p.a.row_stride = stream.size(1) * p.dim * es;
  p.a.item_stride = p.dim * es;
  p.a.row_index = call.keep[1].const_data_ptr<int64_t>();
  p.a.start = p.lengths;
  p.a.row_count = stream.size(0);
  p.a.item_count = stream.size(1);
  if (queries.has_value()) {
    const at::Tensor& q = *queries;
    TORCH_CHECK_VALUE(q.dim() == 2 && q.size(1) == p.dim && q.scalar_type() == stream.scalar_type() &&
                          q.device() == device,
                      op, ": argument 'queries' must be ", c10::toString(stream.scalar_type()),
                      "[K, ", p.dim, "] on ", device.str(), ", got ", describe(q));
    call.keep[4] = q.contiguous();
    p.b_width = q.size(0);
    p.b.data = bytes(call.keep[4]);
    p.b.item_stride = p.dim * es;
    p.b.row_count = groups;
    p.b.item_count = p.b_width;
  }
  allocate_outputs(call, stream.options());
  Run(call, op, "pending", "query");
  return {call.items, call.positions, call.slots, call.mask};
}

// Checks of one cache write (keys or values) and its raw view.
ragged::WriteParams prepare_write(const at::Tensor& cache, const at::Tensor& rows,
                                  const at::Tensor& slots, const at::Tensor& update,
                                  const char* cache_name, const char* update_name) {
  const char* op = kWriteKV;
  const at::Device device = rows.device();
  TORCH_CHECK_VALUE(cache.dim() == 4 && cache.is_contiguous() && cache.device() == device, op,
                    ": argument '", cache_name, "' must be a contiguous [B, H, S, D] tensor on ",
                    device.str(), ", got ", describe(cache));
  float_dtype(cache, cache_name, op);
  const int64_t groups = rows.size(0);
  const int64_t items = slots.size(1);
  TORCH_CHECK_VALUE(update.dim() == 4 && update.size(0) == groups && update.size(1) == cache.size(1) &&
                        update.size(2) == items && update.size(3) == cache.size(3) &&
                        update.scalar_type() == cache.scalar_type() && update.device() == device,
                    op, ": argument '", update_name, "' must be ", c10::toString(cache.scalar_type()),
                    "[", groups, ", ", cache.size(1), ", ", items, ", ", cache.size(3), "] on ",
                    device.str(), ", got ", describe(update));
  ragged::WriteParams p;
  p.groups = groups;
  p.heads = cache.size(1);
  p.items = items;
  p.head_dim = cache.size(3);
  p.elem_size = cache.element_size();
  p.batch = cache.size(0);
  p.seq = cache.size(2);
  p.dst = static_cast<char*>(cache.data_ptr());
  p.src = bytes(update);
  for (int d = 0; d < 4; ++d) p.src_stride[d] = update.stride(d);
  return p;
}

template <void (*Write)(const ragged::WriteParams&)>
void write_kv(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& rows,
              const at::Tensor& slots, const at::Tensor& new_keys, const at::Tensor& new_values) {
  const char* op = kWriteKV;
  TORCH_CHECK_VALUE(rows.dim() == 1 && rows.scalar_type() == at::kLong, op,
                    ": argument 'rows' must be int64[G], got ", describe(rows));
  const at::Device device = rows.device();
  TORCH_CHECK_VALUE(slots.dim() == 2 && slots.size(0) == rows.size(0) &&
                        slots.scalar_type() == at::kLong && slots.device() == device,
                    op, ": argument 'slots' must be int64[", rows.size(0), ", T] on ", device.str(),
                    ", got ", describe(slots));
  const at::Tensor rows_c = rows.contiguous();
  const at::Tensor slots_c = slots.contiguous();
  ragged::WriteParams k = prepare_write(keys, rows_c, slots_c, new_keys, "keys", "new_keys");
  ragged::WriteParams v = prepare_write(values, rows_c, slots_c, new_values, "values", "new_values");
  TORCH_CHECK_VALUE(keys.size(0) == values.size(0) && keys.size(2) == values.size(2), op,
                    ": arguments 'keys' and 'values' must share B and S, got ", describe(keys),
                    " and ", describe(values));
  k.rows = v.rows = rows_c.const_data_ptr<int64_t>();
  k.slots = v.slots = slots_c.const_data_ptr<int64_t>();
  Write(k);
  Write(v);
}

void write_cpu(const ragged::WriteParams& p) {
  const int64_t bad_row = cpu::first_token_out_of_range(p.rows, p.groups, p.batch);
  TORCH_CHECK_VALUE(bad_row < 0, kWriteKV, ": rows[", bad_row, "] = ", bad_row < 0 ? 0 : p.rows[bad_row],
                    " is outside the cache's ", p.batch, " rows");
  const int64_t bad_slot = cpu::first_token_out_of_range(p.slots, p.groups * p.items, p.seq);
  TORCH_CHECK_VALUE(bad_slot < 0, kWriteKV, ": slot ", bad_slot < 0 ? 0 : p.slots[bad_slot],
                    " is outside the cache's ", p.seq, " slots");
  const int64_t total = p.groups * p.heads * p.items;
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, p.head_dim));
  at::parallel_for(0, total, grain, [&](int64_t begin, int64_t end) { cpu::write_kv(p, begin, end); });
}

#ifdef MEMGEN_WITH_CUDA
void write_cuda(const ragged::WriteParams& p) {
  const cudaError_t err = cuda::write_kv(p, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kWriteKV, ": CUDA launch failed: ", cudaGetErrorString(err));
}

void write_kv_cuda(const at::Tensor& keys, const at::Tensor& values, const at::Tensor& rows,
                   const at::Tensor& slots, const at::Tensor& new_keys, const at::Tensor& new_values) {
  const c10::cuda::CUDAGuard guard(rows.device());
  write_kv<write_cuda>(keys, values, rows, slots, new_keys, new_values);
}
#endif

}  // namespace
}  // namespace memgen

TORCH_LIBRARY_IMPL(memgen, CPU, m) {
  m.impl("pack_step", &memgen::pack_step<memgen::run_pack_cpu>);
  m.impl("pack_ragged", &memgen::pack_ragged<memgen::run_pack_cpu>);
  m.impl("write_kv", &memgen::write_kv<memgen::write_cpu>);
}

#ifdef MEMGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(memgen, CUDA, m) {
  m.impl("pack_step", &memgen::pack_step<memgen::run_pack_cuda>);
  m.impl("pack_ragged", &memgen::pack_ragged<memgen::run_pack_cuda>);
  m.impl("write_kv", &memgen::write_kv_cuda);
}
#endif
