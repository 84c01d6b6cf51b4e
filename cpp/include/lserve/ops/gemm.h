// gemm: output = input @ weight^T (+ bias), the nn.Linear convention (weight is (out, in)).
// fp32 accumulation whatever the dtypes; a bfloat16/float16 output is rounded once (after the
// bias). Input and weight of one low-precision dtype is the fast path on GPUs.
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct GemmArgs {
  TensorView input;   // (num_tokens, in_features) f32 | bf16 | f16, rows contiguous (row stride free)
  TensorView weight;  // (out_features, in_features) f32 | bf16 | f16, contiguous
  TensorView bias;    // optional (out_features,) float32
  TensorView output;  // (num_tokens, out_features) f32 | bf16 | f16, rows contiguous; must not alias input

  void validate(const Device& device) const {
    TensorCheck(input, "gemm", "input").ndim(2).float_dtype().device(device).rows_contiguous();
    TensorCheck(weight, "gemm", "weight").ndim(2).float_dtype()
        .device(device).contiguous().size(1, input.size(1));
    if (bias.defined()) {
      TensorCheck(bias, "gemm", "bias").ndim(1).dtype(DType::kF32).device(device).contiguous()
          .size(0, weight.size(0));
    }
    TensorCheck(output, "gemm", "output").ndim(2).float_dtype().device(device).rows_contiguous()
        .size(0, input.size(0)).size(1, weight.size(0));
  }
};

}  // namespace lserve
