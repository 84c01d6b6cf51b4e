// gemm: output = input @ weight^T (+ bias), the nn.Linear convention (weight is (out, in)).
// fp32 accumulation whatever the dtypes; a bfloat16/float16 output is rounded once (after the
// bias). Input and weight of one low-precision dtype is the fast path on GPUs. On the CPU the
// weight may also be a ggml block format (q8_0 | q4_0 | q4_1, see tensor.h): the input rows are
// then quantised to 8-bit blocks of 32 and multiplied with integer dot products (cpu/gemm_quant.cpp).
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct GemmArgs {
  TensorView input;   // (num_tokens, in_features) f32 | bf16 | f16, rows contiguous (row stride free)
  TensorView weight;  // (out_features, in_features) f32 | bf16 | f16 | (CPU) q8_0 | q4_0 | q4_1, contiguous
  TensorView bias;    // optional (out_features,) float32
  TensorView output;  // (num_tokens, out_features) f32 | bf16 | f16, rows contiguous; must not alias input

  void validate(const Device& device) const {
    TensorCheck(input, "gemm", "input").ndim(2).float_dtype().device(device).rows_contiguous();
    if (dtype_is_block(weight.dtype)) {
      LSERVE_CHECK(device.type == DeviceType::kCPU, "gemm: 'weight' of dtype ", dtype_name(weight.dtype),
                   " runs on the CPU backend only (", device.str(), " takes float32, bfloat16 or float16)");
      const int64_t block = dtype_block_size(weight.dtype);
      LSERVE_CHECK(weight.ndim == 2 && weight.size(1) % block == 0 && input.size(1) % block == 0, "gemm: a ",
                   dtype_name(weight.dtype), " weight needs in_features a multiple of its block size ", block,
                   ", got input ", input.shape_str(), " and weight ", weight.shape_str());
      TensorCheck(weight, "gemm", "weight").device(device).contiguous().size(1, input.size(1));
    } else {
      TensorCheck(weight, "gemm", "weight").ndim(2).float_dtype()
          .device(device).contiguous().size(1, input.size(1));
    }
    if (bias.defined()) {
      TensorCheck(bias, "gemm", "bias").ndim(1).dtype(DType::kF32).device(device).contiguous()
          .size(0, weight.size(0));
    }
    TensorCheck(output, "gemm", "output").ndim(2).float_dtype().device(device).rows_contiguous()
        .size(0, input.size(0)).size(1, weight.size(0));
  }
};

}  // namespace lserve
