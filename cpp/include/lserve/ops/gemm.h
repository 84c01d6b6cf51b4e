// gemm: output = input @ weight^T (+ bias), the nn.Linear convention (weight is (out, in)).
// fp32 accumulation whatever the weight dtype.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct GemmArgs {
  TensorView input;   // (num_tokens, in_features) float32, rows contiguous (row stride free)
  TensorView weight;  // (out_features, in_features) float32 | bfloat16 | float16, contiguous
  TensorView bias;    // optional (out_features,) float32
  TensorView output;  // (num_tokens, out_features) float32, rows contiguous; must not alias input

  void validate(const Device& device) const {
    TensorCheck(input, "gemm", "input").ndim(2).dtype(DType::kF32).device(device).rows_contiguous();
    TensorCheck(weight, "gemm", "weight").ndim(2).dtype_in({DType::kF32, DType::kBF16, DType::kF16})
        .device(device).contiguous().size(1, input.size(1));
    if (bias.defined()) {
      TensorCheck(bias, "gemm", "bias").ndim(1).dtype(DType::kF32).device(device).contiguous()
          .size(0, weight.size(0));
    }
    TensorCheck(output, "gemm", "output").ndim(2).dtype(DType::kF32).device(device).rows_contiguous()
        .size(0, input.size(0)).size(1, weight.size(0));
  }
};

}  // namespace lserve
