// gemm: output = input @ weight^T (+ bias), the nn.Linear convention (weight is (out, in)).
// fp32 accumulation whatever the dtypes; a bfloat16/float16 output is rounded once (after the
// bias). Input and weight of one low-precision dtype is the fast path on GPUs. On the CPU the
// weight may also be a ggml block format (q8_0 | q4_0 | q4_1, see tensor.h): the input rows are
// then quantised to 8-bit blocks of 32 and multiplied with integer dot products (cpu/gemm_quant.cpp).
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

// How a gemm weight's bytes are ordered. kRows: as tensor.h says (row after row). kInterleaved8 (CPU,
// block formats only; Backend::pack_gemm_weight makes it): the rows in groups of 8 (the last one
// padded with zero rows), each group block by block: for block b the 8 rows' f16 d, Q4_1's 8 f16 m,
// then the item bytes dword by dword, dword k of the 8 rows in row order (cpu/gemm_quant.cpp).
// The values, shapes and results are those of the same weight in kRows, bit for bit.
enum class WeightLayout : uint8_t { kRows, kInterleaved8 };

struct GemmArgs {
  TensorView input;   // (num_tokens, in_features) f32 | bf16 | f16, rows contiguous (row stride free)
  TensorView weight;  // (out_features, in_features) f32 | bf16 | f16 | (CPU) q8_0 | q4_0 | q4_1, contiguous
  TensorView bias;    // optional (out_features,) float32
  TensorView output;  // (num_tokens, out_features) f32 | bf16 | f16, rows contiguous; must not alias input
  WeightLayout weight_layout = WeightLayout::kRows;  // of weight's bytes; shape and dtype are the logical ones

  void validate(const Device& device) const {
    LSERVE_CHECK(weight_layout == WeightLayout::kRows || (dtype_is_block(weight.dtype) && device.type == DeviceType::kCPU),
                 "gemm: an interleaved weight layout is a CPU block-format one, got a ", dtype_name(weight.dtype),
                 " weight on ", device.str());
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
