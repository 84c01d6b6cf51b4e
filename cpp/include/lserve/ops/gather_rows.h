// gather_rows: output[i] = input[indices[i]] (picks the positions whose logits are needed),
// converted to the output's dtype.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct GatherRowsArgs {
  TensorView input;    // (num_rows, width) f32 | bf16 | f16, rows contiguous
  TensorView indices;  // (num_out,) int32, each in [0, num_rows)
  TensorView output;   // (num_out, width) f32 | bf16 | f16, rows contiguous

  void validate(const Device& device) const {
    TensorCheck(input, "gather_rows", "input").ndim(2).float_dtype().device(device).rows_contiguous();
    TensorCheck(indices, "gather_rows", "indices").ndim(1).dtype(DType::kI32).device(device).contiguous();
    TensorCheck(output, "gather_rows", "output").ndim(2).float_dtype().device(device).rows_contiguous()
        .size(0, indices.size(0)).size(1, input.size(1));
  }
};

}  // namespace lserve
