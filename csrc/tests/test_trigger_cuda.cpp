// The CUDA trigger-scoring kernel against the CPU kernel on random inputs (all modes, all float
// storage types). Exits 77, which ctest reports as skipped, where no GPU is present.
#include <cuda_runtime_api.h>

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <random>
#include <vector>

#include "check.h"
#include "cpu/kernels.h"
#include "cuda/kernels.cuh"

using namespace memgen;
using namespace memgen::trigger;

namespace {

template <typename T>
T* to_device(const std::vector<T>& host) {
  void* ptr = nullptr;
  CHECK(cudaMalloc(&ptr, host.size() * sizeof(T) + 1) == cudaSuccess);
  CHECK(cudaMemcpy(ptr, host.data(), host.size() * sizeof(T), cudaMemcpyHostToDevice) == cudaSuccess);
  return static_cast<T*>(ptr);
}

uint16_t float_to_bf16_bits(float f) {  // truncation is fine: both kernels read the same bits
  uint32_t u;
  std::memcpy(&u, &f, 4);
  return static_cast<uint16_t>(u >> 16);
}

void compare(Mode mode, DType dtype, bool do_sample, bool prompt_step, uint32_t seed) {
  const int64_t batch = 37, vocab = 101, hidden = 67;
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> unit(0.0f, 1.0f);
  std::normal_distribution<float> normal(0.0f, 1.0f);
  std::vector<int64_t> tokens(batch);
  std::vector<uint8_t> table(vocab), finished(batch);
  std::vector<int32_t> counts(batch);
  std::vector<float> uniforms(batch), logits(batch * 2), hid(batch * hidden), weight(2 * hidden), bias(2);
  for (auto& t : tokens) t = rng() % vocab;
  for (auto& t : table) t = unit(rng) < 0.5f;
  for (auto& f : finished) f = unit(rng) < 0.2f;
  for (auto& c : counts) c = rng() % 5;
  for (auto& u : uniforms) u = unit(rng);
  for (auto* v : {&logits, &hid, &weight, &bias})
    for (auto& x : *v) x = normal(rng);
  std::vector<uint16_t> logits16(logits.size()), hid16(hid.size());
  for (size_t i = 0; i < logits.size(); ++i) logits16[i] = float_to_bf16_bits(logits[i]);
  for (size_t i = 0; i < hid.size(); ++i) hid16[i] = float_to_bf16_bits(hid[i]);
  const bool half = dtype != DType::kFloat32;

  Params p;
  p.batch = batch;
  p.vocab_size = vocab;
  p.budget = 3;
  p.prompt_step = prompt_step;
  p.mode = mode;
  p.logits_dtype = p.hidden_dtype = dtype;
  p.hidden_size = hidden;
  p.do_sample = do_sample;
  p.temperature = 0.8f;

  std::vector<int8_t> cpu_decisions(batch);
  std::vector<int32_t> cpu_counts = counts;
  Params hp = p;
  hp.last_tokens = tokens.data();
  hp.delimiter_table = reinterpret_cast<const bool*>(table.data());
  hp.counts = cpu_counts.data();
  hp.finished = reinterpret_cast<const bool*>(finished.data());
  hp.logits = half ? static_cast<const void*>(logits16.data()) : logits.data();
  hp.hidden = half ? static_cast<const void*>(hid16.data()) : hid.data();
  hp.head_weight = weight.data();
  hp.head_bias = bias.data();
  hp.uniforms = uniforms.data();
  hp.decisions = cpu_decisions.data();
  cpu::trigger_scoring(hp, 0, batch);

  Params dp = p;
  dp.last_tokens = to_device(tokens);
  dp.delimiter_table = reinterpret_cast<const bool*>(to_device(table));
  int32_t* d_counts = to_device(counts);
  dp.counts = d_counts;
  dp.finished = reinterpret_cast<const bool*>(to_device(finished));
  dp.logits = half ? static_cast<const void*>(to_device(logits16)) : to_device(logits);
  dp.hidden = half ? static_cast<const void*>(to_device(hid16)) : to_device(hid);
  dp.head_weight = to_device(weight);
  dp.head_bias = to_device(bias);
  dp.uniforms = to_device(uniforms);
  int8_t* d_decisions = to_device(std::vector<int8_t>(batch, 42));
  dp.decisions = d_decisions;
  CHECK(cuda::trigger_scoring(dp, nullptr) == cudaSuccess);
  CHECK(cudaDeviceSynchronize() == cudaSuccess);
  std::vector<int8_t> gpu_decisions(batch);
  std::vector<int32_t> gpu_counts(batch);
  cudaMemcpy(gpu_decisions.data(), d_decisions, batch, cudaMemcpyDeviceToHost);
  cudaMemcpy(gpu_counts.data(), d_counts, batch * 4, cudaMemcpyDeviceToHost);
  for (int64_t r = 0; r < batch; ++r) {
    if (gpu_decisions[r] != cpu_decisions[r] || gpu_counts[r] != cpu_counts[r]) {
      std::fprintf(stderr, "mode %d dtype %d sample %d prompt %d seed %u row %lld: gpu (%d, %d) cpu (%d, %d)\n",
                   static_cast<int>(mode), static_cast<int>(dtype), do_sample, prompt_step, seed,
                   static_cast<long long>(r), gpu_decisions[r], gpu_counts[r], cpu_decisions[r], cpu_counts[r]);
      CHECK(false);
    }
  }
}

}  // namespace

int main() {
  int devices = 0;
  if (cudaGetDeviceCount(&devices) != cudaSuccess || devices == 0) {
    std::printf("no CUDA device: skipped\n");
    return 77;
  }
  for (Mode mode : {Mode::kAlways, Mode::kLogits, Mode::kHead})
    for (DType dtype : {DType::kFloat32, DType::kBFloat16})
      for (bool sample : {false, true})
        for (bool prompt : {false, true})
          for (uint32_t seed = 0; seed < 3; ++seed) compare(mode, dtype, sample, prompt, seed);
  return TEST_MAIN_RESULT();
}
