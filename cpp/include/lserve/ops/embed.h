// embed: output[t] = weight[token_ids[t]] (gathered rows, converted to float32; on the CPU a
// q8_0 | q4_0 | q4_1 table's rows are dequantised exactly as gguf-py's quants.dequantize).
#pragma once
#include "lserve/ops/common.h"

namespace lserve {

struct EmbedArgs {
  TensorView token_ids;  // (num_tokens,) int32, each in [0, vocab_size)
  TensorView weight;     // (vocab_size, hidden_size) f32 | bf16 | f16 | (CPU) q8_0 | q4_0 | q4_1, contiguous
  TensorView output;     // (num_tokens, hidden_size) float32, rows contiguous

  void validate(const Device& device) const {
    TensorCheck(token_ids, "embed", "token_ids").ndim(1).dtype(DType::kI32).device(device).contiguous();
    if (dtype_is_block(weight.dtype)) {
      LSERVE_CHECK(device.type == DeviceType::kCPU, "embed: 'weight' of dtype ", dtype_name(weight.dtype),
                   " runs on the CPU backend only");
      LSERVE_CHECK(weight.ndim == 2 && weight.size(1) % dtype_block_size(weight.dtype) == 0, "embed: 'weight' of ",
                   "dtype ", dtype_name(weight.dtype), " needs hidden_size a multiple of its block size ",
                   dtype_block_size(weight.dtype), ", got shape ", weight.shape_str());
      TensorCheck(weight, "embed", "weight").device(device).contiguous();
    } else {
      TensorCheck(weight, "embed", "weight").ndim(2).float_dtype()
          .device(device).contiguous();
    }
    TensorCheck(output, "embed", "output").ndim(2).dtype(DType::kF32).device(device).rows_contiguous()
        .size(0, token_ids.size(0)).size(1, weight.size(1));
  }
};

}  // namespace lserve
