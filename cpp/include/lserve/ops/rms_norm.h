// rms_norm: output = x / sqrt(mean(x^2) + eps) * weight, with an optional fused residual add:
// when `residual` is given, residual += input first and x = residual (vLLM's fused_add_rms_norm).
// float32 arithmetic whatever the dtypes; a bfloat16/float16 output is rounded once.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct RmsNormArgs {
  TensorView input;     // (num_tokens, hidden_size) f32 | bf16 | f16, rows contiguous
  TensorView residual;  // optional (num_tokens, hidden_size) float32, updated in place
  TensorView weight;    // (hidden_size,) f32 | bf16 | f16
  TensorView output;    // (num_tokens, hidden_size) f32 | bf16 | f16; may alias input
  float eps = 1e-6f;

  void validate(const Device& device) const {
    TensorCheck(input, "rms_norm", "input").ndim(2).float_dtype().device(device).rows_contiguous();
    const int64_t num_tokens = input.size(0), hidden_size = input.size(1);
    if (residual.defined()) {
      TensorCheck(residual, "rms_norm", "residual").ndim(2).dtype(DType::kF32).device(device)
          .rows_contiguous().size(0, num_tokens).size(1, hidden_size);
    }
    TensorCheck(weight, "rms_norm", "weight").ndim(1).float_dtype()
        .device(device).contiguous().size(0, hidden_size);
    TensorCheck(output, "rms_norm", "output").ndim(2).float_dtype().device(device).rows_contiguous()
        .size(0, num_tokens).size(1, hidden_size);
    LSERVE_CHECK(eps > 0.0f, "rms_norm: eps must be positive, got ", eps);
  }
};

}  // namespace lserve
