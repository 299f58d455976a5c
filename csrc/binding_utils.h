// Helpers shared by the torch-facing files (csrc/*.cpp): describing tensors and checking
// arguments with messages that name the op, the argument and the expected form. Input errors
// raise ValueError in Python (TORCH_CHECK_VALUE).
#pragma once

#include <ATen/ATen.h>

#include <string>

#include "ops.h"

namespace memgen {

inline std::string describe(const at::Tensor& t) {
  std::string s = std::string(c10::toString(t.scalar_type())) + "[";
  for (int64_t d = 0; d < t.dim(); ++d) {
    s += (d ? ", " : "") + std::to_string(t.size(d));
  }
  return s + "] on " + t.device().str();
}

inline void check_tensor(const at::Tensor& t, const char* name, at::ScalarType dtype,
                         at::IntArrayRef shape, const at::Device& device, const char* op) {
  TORCH_CHECK_VALUE(t.scalar_type() == dtype && t.sizes() == shape && t.device() == device, op,
                    ": argument '", name, "' must be ", c10::toString(dtype), shape, " on ",
                    device.str(), ", got ", describe(t));
}

inline DType float_dtype(const at::Tensor& t, const char* name, const char* op) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kBFloat16:
      return DType::kBFloat16;
    case at::kHalf:
      return DType::kFloat16;
    default:
      TORCH_CHECK_VALUE(false, op, ": argument '", name,
                        "' must be float32, bfloat16 or float16, got ", describe(t));
  }
}

}  // namespace memgen
