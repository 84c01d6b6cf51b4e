// silu_mul: output = silu(input[:, :d]) * input[:, d:], d = intermediate_size (gate | up halves).
// float32 arithmetic; a bfloat16/float16 output is rounded once.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct SiluMulArgs {
  TensorView input;   // (num_tokens, 2 * intermediate_size) f32 | bf16 | f16, rows contiguous
  TensorView output;  // (num_tokens, intermediate_size) f32 | bf16 | f16, rows contiguous

  void validate(const Device& device) const {
    TensorCheck(input, "silu_mul", "input").ndim(2).float_dtype().device(device).rows_contiguous();
    LSERVE_CHECK(input.size(1) % 2 == 0, "silu_mul: input width ", input.size(1), " must be even");
    TensorCheck(output, "silu_mul", "output").ndim(2).float_dtype().device(device).rows_contiguous()
        .size(0, input.size(0)).size(1, input.size(1) / 2);
  }
};

}  // namespace lserve
