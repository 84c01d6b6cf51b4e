// CPU embed: output[t] = float(weight[token_ids[t]]); block formats are dequantised as quant.h
// does. Token ids are checked on the host before any row is written. Reference:
// torch.nn.functional.embedding (block formats: gguf-py quants.dequantize).
#include "convert.h"
#include "cpu_backend.h"
#include "quant.h"

namespace lserve::cpu {

void embed(const CpuContext& context, const EmbedArgs& args) {
  const int64_t num_tokens = args.token_ids.size(0);
  const int64_t vocab_size = args.weight.size(0), hidden_size = args.weight.size(1);
  const int32_t* token_ids = args.token_ids.data_ptr<int32_t>();  // (num_tokens,)
  for (int64_t t = 0; t < num_tokens; ++t) {
    LSERVE_CHECK(token_ids[t] >= 0 && token_ids[t] < vocab_size, "embed: token_ids[", t, "] = ", token_ids[t],
                 " is out of range [0, ", vocab_size, ")");
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(hidden_size, 1));
  if (dtype_is_block(args.weight.dtype)) {  // (vocab_size, hidden_size) blocks: dequantise each row
    const size_t row_bytes = dtype_nbytes(args.weight.dtype, hidden_size);
    const auto* weight = static_cast<const uint8_t*>(args.weight.data);
    context.pool->parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        dequantize_row(args.weight.dtype, weight + static_cast<int64_t>(token_ids[t]) * row_bytes,
                       row_ptr<float>(args.output, t), hidden_size);
      }
    });
    return;
  }
  dispatch_float(args.weight.dtype, args.weight.data, [&](const auto* weight) {  // (vocab_size, hidden_size)
    context.pool->parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end, int) {
      for (int64_t t = begin; t < end; ++t) {
        load_row(weight + static_cast<int64_t>(token_ids[t]) * hidden_size, row_ptr<float>(args.output, t),
                 hidden_size);
      }
    });
  });
}

}  // namespace lserve::cpu
