// memgen compiled core: the per-row logic of every op, written once.
//
// Everything here is plain C++ that compiles for the host and, under nvcc, for the device: the
// CPU kernels (csrc/cpu), the CUDA kernels (csrc/cuda) and the C++ unit tests (csrc/tests) all
// call these functions, so the three can only disagree where summation order differs. No torch,
// no CUDA runtime headers.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#define MEMGEN_HD __host__ __device__ __forceinline__
#else
#define MEMGEN_HD inline
#endif

namespace memgen {

// ---------------------------------------------------------------------------------------------
// Floating-point storage types. The kernels read 16-bit floats as raw bits so that the headers
// need neither torch's nor CUDA's half types; arithmetic always happens in float32.
// ---------------------------------------------------------------------------------------------
enum class DType : int32_t { kFloat32 = 0, kBFloat16 = 1, kFloat16 = 2 };

struct BF16Bits {
  uint16_t bits;
};
struct F16Bits {
  uint16_t bits;
};

MEMGEN_HD float bits_to_float(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof(f));
  return f;
#endif
}

MEMGEN_HD float to_float(float v) { return v; }

MEMGEN_HD float to_float(BF16Bits v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }

// IEEE binary16 -> binary32, exact for every input (subnormals, infinities, NaN).
MEMGEN_HD float to_float(F16Bits v) {
  const uint32_t sign = (static_cast<uint32_t>(v.bits) & 0x8000u) << 16;
  const int exponent = (v.bits >> 10) & 0x1f;
  const int mantissa = v.bits & 0x3ff;
  float magnitude;
  if (exponent == 0x1f) {
    magnitude = mantissa == 0 ? INFINITY : NAN;
  } else if (exponent == 0) {
    magnitude = ldexpf(static_cast<float>(mantissa), -24);  // subnormal (or zero)
  } else {
    magnitude = ldexpf(static_cast<float>(mantissa | 0x400), exponent - 25);
  }
#if defined(__CUDA_ARCH__)
  const uint32_t magnitude_bits = __float_as_uint(magnitude);
#else
  uint32_t magnitude_bits;
  std::memcpy(&magnitude_bits, &magnitude, sizeof(magnitude_bits));
#endif
  return bits_to_float(sign | magnitude_bits);
}

// ---------------------------------------------------------------------------------------------
// Fused trigger scoring: the decision a row takes at one decode step.
// ---------------------------------------------------------------------------------------------
namespace trigger {

// Values of the decision (and of the augmentation mask that generation returns).
constexpr int8_t kNoDecision = -100;
constexpr int8_t kSkip = 0;
constexpr int8_t kInvoke = 1;

// Where the two trigger logits come from.
enum class Mode : int32_t {
  kAlways = 0,  // no logits: every decision point invokes
  kLogits = 1,  // the caller passes [skip, invoke] logits per row (`lora` trigger)
  kHead = 2,    // logits = hidden @ weight^T + bias, computed by the op (`head` trigger)
};

// A row is a decision point when it is unfinished and either this is the prompt step (no
// delimiter or budget rule there; the caller decides whether a prompt point exists at all), or
// its text ends with a delimiter and it has woven fewer than `budget` inference memories.
MEMGEN_HD bool is_decision_point(bool finished, bool prompt_step, bool ends_with_delimiter,
                                 int32_t count, int64_t budget) {
  if (finished) return false;
  if (prompt_step) return true;
  return ends_with_delimiter && static_cast<int64_t>(count) < budget;
}

// Greedy: argmax over [skip, invoke] with ties (and NaN) going to SKIP.
// Sampling: INVOKE when u < softmax(logits / temperature)[invoke], written as a sigmoid of the
// logit difference so that every backend evaluates the same expression.
MEMGEN_HD int8_t decide(float skip_logit, float invoke_logit, bool do_sample, float temperature,
                        float uniform) {
  if (!do_sample) return invoke_logit > skip_logit ? kInvoke : kSkip;
  const float p_invoke = 1.0f / (1.0f + expf((skip_logit - invoke_logit) / temperature));
  return uniform < p_invoke ? kInvoke : kSkip;
}

// Inference memories woven so far, after this step's decision. The prompt weave is not an
// inference memory and does not count against the budget.
MEMGEN_HD int32_t next_count(int32_t count, int8_t decision, bool prompt_step) {
  return (decision == kInvoke && !prompt_step) ? count + 1 : count;
}

// Partial dot product of one hidden row with one head weight row over elements
// begin, begin + stride, ... < size. The CPU kernel calls it once with stride 1; a CUDA warp
// calls it once per lane and reduces.
// Four independent accumulators: one serial chain of float adds is latency-bound on the CPU
// (measured: 161 us -> see benchmarks/results for 64 rows x 1536).
template <typename H, typename W>
MEMGEN_HD float partial_dot(const H* hidden_row, const W* weight_row, int64_t begin,
                            int64_t size, int64_t stride) {
  float acc0 = 0.0f, acc1 = 0.0f, acc2 = 0.0f, acc3 = 0.0f;
  int64_t j = begin;
  for (; j + 3 * stride < size; j += 4 * stride) {
    acc0 += to_float(hidden_row[j]) * to_float(weight_row[j]);
    acc1 += to_float(hidden_row[j + stride]) * to_float(weight_row[j + stride]);
    acc2 += to_float(hidden_row[j + 2 * stride]) * to_float(weight_row[j + 2 * stride]);
    acc3 += to_float(hidden_row[j + 3 * stride]) * to_float(weight_row[j + 3 * stride]);
  }
  for (; j < size; j += stride) {
    acc0 += to_float(hidden_row[j]) * to_float(weight_row[j]);
  }
  return (acc0 + acc1) + (acc2 + acc3);
}

// Raw-pointer view of one call. All tensors are contiguous; B rows; V vocabulary entries; H
// hidden size (head mode). Pointers that the mode does not use may be null.
struct Params {
  int64_t batch = 0;
  const int64_t* last_tokens = nullptr;      // [B] token chosen last
  const bool* delimiter_table = nullptr;     // [V] token id -> its text ends with a delimiter
  int64_t vocab_size = 0;                    // V
  int32_t* counts = nullptr;                 // [B] inference memories woven so far (in/out)
  int64_t budget = 0;                        // max_inference_aug_num
  const bool* finished = nullptr;            // [B] row has emitted EOS
  bool prompt_step = false;
  Mode mode = Mode::kAlways;
  const void* logits = nullptr;              // [B, 2] (kLogits), dtype logits_dtype
  DType logits_dtype = DType::kFloat32;
  const void* hidden = nullptr;              // [B, H] (kHead), dtype hidden_dtype
  DType hidden_dtype = DType::kFloat32;
  const void* head_weight = nullptr;         // [2, H] (kHead), dtype head_dtype
  const void* head_bias = nullptr;           // [2]    (kHead), dtype head_dtype
  DType head_dtype = DType::kFloat32;
  int64_t hidden_size = 0;                   // H
  bool do_sample = false;
  float temperature = 1.0f;
  const float* uniforms = nullptr;           // [B] pre-drawn U[0,1) (sampling, non-always modes)
  int8_t* decisions = nullptr;               // [B] output
};

// Whether `row` decides this step. The token must be in range (checked by the caller).
MEMGEN_HD bool row_is_decision_point(const Params& p, int64_t row) {
  const bool at_delimiter = !p.prompt_step && p.delimiter_table[p.last_tokens[row]];
  return is_decision_point(p.finished[row], p.prompt_step, at_delimiter, p.counts[row], p.budget);
}

// Writes the decision and the updated count of a decision-point row, given its two logits.
MEMGEN_HD void finish_row(const Params& p, int64_t row, float skip_logit, float invoke_logit) {
  const float u = p.uniforms != nullptr ? p.uniforms[row] : 0.0f;
  const int8_t decision = p.mode == Mode::kAlways
                              ? kInvoke
                              : decide(skip_logit, invoke_logit, p.do_sample, p.temperature, u);
  p.decisions[row] = decision;
  p.counts[row] = next_count(p.counts[row], decision, p.prompt_step);
}

template <typename T>
MEMGEN_HD float load_as_float(const void* base, int64_t index) {
  return to_float(static_cast<const T*>(base)[index]);
}

// The two logits of a kLogits row.
template <typename L>
MEMGEN_HD void row_logits(const Params& p, int64_t row, float* skip_logit, float* invoke_logit) {
  *skip_logit = load_as_float<L>(p.logits, 2 * row);
  *invoke_logit = load_as_float<L>(p.logits, 2 * row + 1);
}

// One row of the op, shared by every kernel. `dot(hidden_row, weight_row)` returns the full dot
// product over H (serial on the CPU, a warp reduction on CUDA); only the thread with `writer` set
// stores. Every thread reads the row's count before any writer stores it: on CUDA the head mode's
// warp reduction synchronises the lanes, and in the other modes non-writers only read.
template <typename L, typename H, typename W, typename Dot>
MEMGEN_HD void score_row(const Params& p, int64_t row, bool writer, Dot dot) {
  if (!row_is_decision_point(p, row)) {
    if (writer) p.decisions[row] = kNoDecision;
    return;
  }
  float skip_logit = 0.0f;
  float invoke_logit = 0.0f;
  if (p.mode == Mode::kLogits) {
    row_logits<L>(p, row, &skip_logit, &invoke_logit);
  } else if (p.mode == Mode::kHead) {
    const H* hidden_row = static_cast<const H*>(p.hidden) + row * p.hidden_size;
    const W* weight = static_cast<const W*>(p.head_weight);
    skip_logit = dot(hidden_row, weight) + load_as_float<W>(p.head_bias, 0);
    invoke_logit = dot(hidden_row, weight + p.hidden_size) + load_as_float<W>(p.head_bias, 1);
  }
  if (writer) finish_row(p, row, skip_logit, invoke_logit);
}

// Host side: calls f(L{}, H{}, W{}) with the storage types of the logits, hidden states and head
// this call's mode reads (float where unused), so each kernel is instantiated only for the
// combinations that can occur.
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

template <typename F>
void dispatch_storage_types(const Params& p, F&& f) {
  switch (p.mode) {
    case Mode::kLogits:
      with_storage_type(p.logits_dtype, [&](auto l) { f(l, float{}, float{}); });
      break;
    case Mode::kHead:
      with_storage_type(p.hidden_dtype, [&](auto h) {
        with_storage_type(p.head_dtype, [&](auto w) { f(float{}, h, w); });
      });
      break;
    case Mode::kAlways:
    default:
      f(float{}, float{}, float{});
      break;
  }
}

}  // namespace trigger

// ---------------------------------------------------------------------------------------------
// Ragged steps: packing the items of one decoder call for rows of different lengths, and
// writing the call's keys/values at per-row cache slots (latent-token injection and the batched
// weaver forward). Items are copied, never computed, so these kernels move raw bytes.
// ---------------------------------------------------------------------------------------------
namespace ragged {

// Where one packed item goes. Row g's real items are columns [0, n_a) of block A (width
// a_width) then columns [a_width, a_width + n_b) of block B; they take the row's next cache slots
// and positions, starting at its cache length. A real item at slot s attends to slots [0, s];
// padding writes the scratch slot `capacity`, which no mask exposes, and attends to the row's
// real slots (at least slot 0, so that its softmax stays finite).
struct Item {
  bool real;
  int64_t slot;
  int64_t position;
  int64_t visible;  // attends to slots [0, visible)
};

MEMGEN_HD Item layout_item(int64_t col, int64_t length, int64_t n_a, int64_t a_width,
                           int64_t n_b, int64_t capacity) {
  int64_t j = -1;
  if (col < a_width) {
    if (col < n_a) j = col;
  } else if (col - a_width < n_b) {
    j = n_a + (col - a_width);
  }
  if (j >= 0) return {true, length + j, length + j, length + j + 1};
  const int64_t end = length + n_a + n_b;
  return {false, capacity, end > 0 ? end - 1 : 0, end > 0 ? end : 1};
}

// Bits of the additive mask's two values: 0 (attend) and the dtype's lowest finite value
// (masked), as torch.finfo(dtype).min.
MEMGEN_HD uint32_t masked_bits(DType dtype) {
  switch (dtype) {
    case DType::kBFloat16:
      return 0xff7fu;
    case DType::kFloat16:
      return 0xfbffu;
    case DType::kFloat32:
    default:
      return 0xff7fffffu;
  }
}

MEMGEN_HD int64_t size_of(DType dtype) { return dtype == DType::kFloat32 ? 4 : 2; }

// Where item t of row g is copied from: row `row_index ? row_index[g] : g` of `data` (rows
// `row_stride` bytes apart), item `(start ? start[g] : 0) + t` within it (`item_stride` bytes
// apart; 0 repeats one item). `row_count` x `item_count` bound the indices (checked by the
// bindings on the CPU, asserted on the device).
struct Source {
  const char* data = nullptr;
  int64_t row_stride = 0;
  int64_t item_stride = 0;
  const int64_t* row_index = nullptr;
  const int32_t* start = nullptr;
  int64_t row_count = 0;
  int64_t item_count = 0;
};

MEMGEN_HD bool source_in_range(const Source& s, int64_t g, int64_t t) {
  const int64_t row = s.row_index != nullptr ? s.row_index[g] : g;
  const int64_t item = (s.start != nullptr ? static_cast<int64_t>(s.start[g]) : 0) + t;
  return row >= 0 && row < s.row_count && item >= 0 && item < s.item_count;
}

MEMGEN_HD const char* source_item(const Source& s, int64_t g, int64_t t) {
  const int64_t row = s.row_index != nullptr ? s.row_index[g] : g;
  const int64_t item = (s.start != nullptr ? static_cast<int64_t>(s.start[g]) : 0) + t;
  return s.data + row * s.row_stride + item * s.item_stride;
}

// Raw view of one packing call: G rows, `width` = a_width + b_width columns of `dim` elements.
struct PackParams {
  int64_t groups = 0, a_width = 0, b_width = 0, dim = 0;
  int64_t capacity = 0;                  // scratch slot index (= real slots per row)
  int64_t visible = 0;                   // mask width: slots [0, visible) of the cache
  DType dtype = DType::kFloat32;         // items' and mask's dtype
  const int32_t* lengths = nullptr;      // [G] cache length before the call
  const int32_t* n_a = nullptr;          // [G] real items of block A (null: all a_width)
  const int32_t* n_b = nullptr;          // [G] real items of block B (null: all b_width)
  Source a, b;
  char* items = nullptr;                 // [G, width, dim] output
  int64_t* positions = nullptr;          // [G, width] output
  int64_t* slots = nullptr;              // [G, width] output
  char* mask = nullptr;                  // [G, 1, width, visible] output
};

MEMGEN_HD int64_t width(const PackParams& p) { return p.a_width + p.b_width; }

MEMGEN_HD Item item_of(const PackParams& p, int64_t g, int64_t col) {
  const int64_t n_a = p.n_a != nullptr ? p.n_a[g] : p.a_width;
  const int64_t n_b = p.n_b != nullptr ? p.n_b[g] : p.b_width;
  return layout_item(col, p.lengths[g], n_a, p.a_width, n_b, p.capacity);
}

// Source bytes of column `col` of row g, or null for padding (written as zeros).
MEMGEN_HD const char* item_source(const PackParams& p, int64_t g, int64_t col, bool real) {
  if (!real) return nullptr;
  return col < p.a_width ? source_item(p.a, g, col) : source_item(p.b, g, col - p.a_width);
}

// Raw view of one cache write: dst[rows[g], h, slots[g, t], :] = src[g, h, t, :] for G rows,
// H heads, T items of D elements of `elem_size` bytes. dst is contiguous [B, H, S, D]; src has
// arbitrary element strides.
struct WriteParams {
  int64_t groups = 0, heads = 0, items = 0, head_dim = 0, elem_size = 4;
  int64_t batch = 0, seq = 0;
  const int64_t* rows = nullptr;   // [G]
  const int64_t* slots = nullptr;  // [G, T]
  char* dst = nullptr;
  const char* src = nullptr;
  int64_t src_stride[4] = {0, 0, 0, 0};  // elements, for (g, h, t, d)
};

MEMGEN_HD char* write_destination(const WriteParams& p, int64_t g, int64_t h, int64_t t) {
  const int64_t row = p.rows[g];
  const int64_t slot = p.slots[g * p.items + t];
  return p.dst + (((row * p.heads + h) * p.seq + slot) * p.head_dim) * p.elem_size;
}

MEMGEN_HD const char* write_source(const WriteParams& p, int64_t g, int64_t h, int64_t t) {
  return p.src + (g * p.src_stride[0] + h * p.src_stride[1] + t * p.src_stride[2]) * p.elem_size;
}

}  // namespace ragged
}  // namespace memgen
