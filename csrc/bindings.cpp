// Input errors raise ValueError in Python (TORCH_CHECK_VALUE), naming the argument and the
// expected form; a failed launch raises RuntimeError.
//
// The one torch-facing layer of memgen's compiled core: op schemas (TORCH_LIBRARY), input checks
// with messages naming the argument, and dispatch to the torch-free CPU kernels and CUDA
// launchers. Kernels never see a tensor; this file never sees a launch configuration.
#include <Python.h>

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <string>

#include "binding_utils.h"
#include "cpu/kernels.h"

#ifdef MEMGEN_WITH_CUDA
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>

#include "cuda/kernels.cuh"
#endif

namespace memgen {
namespace {

constexpr const char* kOp = "memgen::trigger_scoring";

trigger::Mode parse_mode(c10::string_view mode) {
  if (mode == "always") return trigger::Mode::kAlways;
  if (mode == "lora") return trigger::Mode::kLogits;
  if (mode == "head") return trigger::Mode::kHead;
  TORCH_CHECK_VALUE(false, kOp, ": argument 'trigger_mode' must be 'always', 'lora' or 'head', got '",
              std::string(mode), "'");
}

void check_absent(const c10::optional<at::Tensor>& t, const char* name, c10::string_view mode) {
  TORCH_CHECK_VALUE(!t.has_value(), kOp, ": argument '", name, "' must be None in trigger_mode '",
              std::string(mode), "'");
}

const at::Tensor& require(const c10::optional<at::Tensor>& t, const char* name,
                          c10::string_view mode) {
  TORCH_CHECK_VALUE(t.has_value(), kOp, ": argument '", name, "' is required in trigger_mode '",
              std::string(mode), "'");
  return *t;
}

// Inputs kept alive (contiguous copies where needed) for as long as the kernel runs.
struct Prepared {
  trigger::Params params;
  at::Tensor last_tokens, table, finished, logits, hidden, weight, bias, uniforms, decisions;
};

// Checks every argument, then fills the kernel's raw view. Nothing is written before this
// returns, so bad input fails before any work is done.
Prepared prepare(const at::Tensor& last_tokens, const at::Tensor& delimiter_table,
                 const at::Tensor& counts, int64_t budget, const at::Tensor& finished,
                 bool prompt_step, c10::string_view mode,
                 const c10::optional<at::Tensor>& logits, const c10::optional<at::Tensor>& hidden,
                 const c10::optional<at::Tensor>& head_weight,
                 const c10::optional<at::Tensor>& head_bias, bool do_sample, double temperature,
                 const c10::optional<at::Tensor>& uniforms) {
  TORCH_CHECK_VALUE(last_tokens.dim() == 1, kOp, ": argument 'last_tokens' must be int64[B], got ",
              describe(last_tokens));
  const int64_t batch = last_tokens.size(0);
  const at::Device device = last_tokens.device();
  check_tensor(last_tokens, "last_tokens", at::kLong, {batch}, device, kOp);
  TORCH_CHECK_VALUE(delimiter_table.dim() == 1 && delimiter_table.scalar_type() == at::kBool &&
                  delimiter_table.device() == device,
              kOp, ": argument 'delimiter_table' must be bool[V] on ", device.str(), ", got ",
              describe(delimiter_table));
  check_tensor(counts, "counts", at::kInt, {batch}, device, kOp);
  TORCH_CHECK_VALUE(counts.is_contiguous(), kOp,
              ": argument 'counts' is updated in place and must be contiguous");
  TORCH_CHECK_VALUE(budget >= 0, kOp, ": argument 'budget' must be >= 0, got ", budget);
  check_tensor(finished, "finished", at::kBool, {batch}, device, kOp);
  TORCH_CHECK_VALUE(!do_sample || (std::isfinite(temperature) && temperature > 0.0), kOp,
              ": argument 'temperature' must be a finite number > 0 when sampling, got ",
              temperature);

  Prepared out;
  trigger::Params& p = out.params;
  p.mode = parse_mode(mode);
  if (p.mode == trigger::Mode::kLogits) {
    const at::Tensor& l = require(logits, "logits", mode);
    TORCH_CHECK_VALUE(l.dim() == 2 && l.size(0) == batch && l.size(1) == 2 && l.device() == device, kOp,
                ": argument 'logits' must be a float tensor [", batch, ", 2] on ", device.str(),
                ", got ", describe(l));
    p.logits_dtype = float_dtype(l, "logits", kOp);
    out.logits = l.contiguous();
    p.logits = out.logits.const_data_ptr();
  } else {
    check_absent(logits, "logits", mode);
  }
  if (p.mode == trigger::Mode::kHead) {
    const at::Tensor& h = require(hidden, "hidden", mode);
    const at::Tensor& w = require(head_weight, "head_weight", mode);
    const at::Tensor& b = require(head_bias, "head_bias", mode);
    TORCH_CHECK_VALUE(h.dim() == 2 && h.size(0) == batch && h.device() == device, kOp,
                ": argument 'hidden' must be a float tensor [", batch, ", H] on ", device.str(),
                ", got ", describe(h));
    const int64_t hidden_size = h.size(1);
    TORCH_CHECK_VALUE(w.dim() == 2 && w.size(0) == 2 && w.size(1) == hidden_size && w.device() == device,
                kOp, ": argument 'head_weight' must be a float tensor [2, ", hidden_size, "] on ",
                device.str(), ", got ", describe(w));
    TORCH_CHECK_VALUE(b.dim() == 1 && b.size(0) == 2 && b.device() == device, kOp,
                ": argument 'head_bias' must be a float tensor [2] on ", device.str(), ", got ",
                describe(b));
    TORCH_CHECK_VALUE(w.scalar_type() == b.scalar_type(), kOp,
                ": arguments 'head_weight' and 'head_bias' must share a dtype, got ",
                describe(w), " and ", describe(b));
    p.hidden_dtype = float_dtype(h, "hidden", kOp);
    p.head_dtype = float_dtype(w, "head_weight", kOp);
    p.hidden_size = hidden_size;
    out.hidden = h.contiguous();
    out.weight = w.contiguous();
    out.bias = b.contiguous();
    p.hidden = out.hidden.const_data_ptr();
    p.head_weight = out.weight.const_data_ptr();
    p.head_bias = out.bias.const_data_ptr();
  } else {
    check_absent(hidden, "hidden", mode);
    check_absent(head_weight, "head_weight", mode);
    check_absent(head_bias, "head_bias", mode);
  }
  if (uniforms.has_value()) {
    check_tensor(*uniforms, "uniforms", at::kFloat, {batch}, device, kOp);
    out.uniforms = uniforms->contiguous();
    p.uniforms = out.uniforms.const_data_ptr<float>();
  } else {
    TORCH_CHECK_VALUE(!do_sample || p.mode == trigger::Mode::kAlways, kOp,
                ": argument 'uniforms' (float32[B], pre-drawn U[0, 1)) is required when sampling "
                "in trigger_mode '", std::string(mode), "'");
  }

  out.last_tokens = last_tokens.contiguous();
  out.table = delimiter_table.contiguous();
  out.finished = finished.contiguous();
  out.decisions = at::empty({batch}, last_tokens.options().dtype(at::kChar));
  p.batch = batch;
  p.last_tokens = out.last_tokens.const_data_ptr<int64_t>();
  p.delimiter_table = out.table.const_data_ptr<bool>();
  p.vocab_size = delimiter_table.size(0);
  p.counts = counts.data_ptr<int32_t>();
  p.budget = budget;
  p.finished = out.finished.const_data_ptr<bool>();
  p.prompt_step = prompt_step;
  p.do_sample = do_sample;
  p.temperature = static_cast<float>(temperature);
  p.decisions = out.decisions.data_ptr<int8_t>();
  return out;
}

void run_cpu(const Prepared& in) {
  const trigger::Params& p = in.params;
  const int64_t bad = cpu::first_token_out_of_range(p.last_tokens, p.batch, p.vocab_size);
  TORCH_CHECK_VALUE(bad < 0, kOp, ": last_tokens[", bad, "] = ", (bad < 0 ? 0 : p.last_tokens[bad]),
                    " lies outside the delimiter table (size ", p.vocab_size,
                    "); build the table for the model's full vocabulary");
  // A row costs a few operations, or two dot products of length H in head mode: split only
  // batches whose work exceeds ~32k multiply-adds per thread (below that threads cost more).
  const int64_t grain = std::max<int64_t>(1, 32768 / std::max<int64_t>(1, 2 * p.hidden_size));
  at::parallel_for(0, p.batch, grain,
                   [&](int64_t begin, int64_t end) { cpu::trigger_scoring(p, begin, end); });
}

#ifdef MEMGEN_WITH_CUDA
void run_cuda(const Prepared& in) {
  const c10::cuda::CUDAGuard guard(in.last_tokens.device());
  const cudaError_t err =
      cuda::trigger_scoring(in.params, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(err == cudaSuccess, kOp, ": CUDA launch failed: ", cudaGetErrorString(err));
}
#endif

// The registered kernel of one device: check and prepare, then run.
template <void (*Run)(const Prepared&)>
at::Tensor trigger_scoring(const at::Tensor& last_tokens, const at::Tensor& delimiter_table,
                           const at::Tensor& counts, int64_t budget, const at::Tensor& finished,
                           bool prompt_step, c10::string_view mode,
                           const c10::optional<at::Tensor>& logits,
                           const c10::optional<at::Tensor>& hidden,
                           const c10::optional<at::Tensor>& head_weight,
                           const c10::optional<at::Tensor>& head_bias, bool do_sample,
                           double temperature, const c10::optional<at::Tensor>& uniforms) {
  const Prepared in = prepare(last_tokens, delimiter_table, counts, budget, finished, prompt_step,
                              mode, logits, hidden, head_weight, head_bias, do_sample,
                              temperature, uniforms);
  Run(in);
  return in.decisions;
}

}  // namespace
}  // namespace memgen

TORCH_LIBRARY(memgen, m) {
  m.def(
      "trigger_scoring(Tensor last_tokens, Tensor delimiter_table, Tensor(a!) counts, int budget, "
      "Tensor finished, bool prompt_step, str trigger_mode, Tensor? logits=None, Tensor? hidden=None, "
      "Tensor? head_weight=None, Tensor? head_bias=None, bool do_sample=False, "
      "float temperature=1.0, Tensor? uniforms=None) -> Tensor");
  // Latent-token injection: pack one reasoner step (pending tokens, then latents) for a ragged
  // batch, and write a call's keys/values at per-row cache slots (csrc/ragged_bindings.cpp).
  m.def(
      "pack_step(Tensor? tokens, Tensor embed_weight, Tensor? latents, Tensor? n_latents, "
      "Tensor lengths, int capacity, int visible) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def(
      "write_kv(Tensor(a!) keys, Tensor(b!) values, Tensor rows, Tensor slots, Tensor new_keys, "
      "Tensor new_values) -> ()");
  // Batched weaver forward: pack the stream items each row's cache has not seen, then the queries.
  m.def(
      "pack_ragged(Tensor stream, Tensor rows, Tensor lengths, Tensor pending, int width, "
      "Tensor? queries, int capacity, int visible) -> (Tensor, Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(memgen, CPU, m) {
  m.impl("trigger_scoring", &memgen::trigger_scoring<memgen::run_cpu>);
}

#ifdef MEMGEN_WITH_CUDA
TORCH_LIBRARY_IMPL(memgen, CUDA, m) {
  m.impl("trigger_scoring", &memgen::trigger_scoring<memgen::run_cuda>);
}
#endif

// `import memgen._C` loads this library (and so runs the registrations above); the module itself
// has no Python-level members.
static struct PyModuleDef memgen_c_module = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&memgen_c_module); }
