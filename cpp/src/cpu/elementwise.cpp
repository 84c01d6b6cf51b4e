// CPU reference of the row-wise ops: embed, rms_norm (fused residual add), silu_mul, gather_rows.
#include <cmath>
#include <cstring>
#include <vector>

#include "cpu/cpu_backend.h"

namespace lserve {

void cpu_embed(const EmbedArgs& args) {
  const int64_t num_tokens = args.token_ids.size(0), vocab_size = args.weight.size(0), hidden = args.weight.size(1);
  const int32_t* ids = args.token_ids.data_ptr<int32_t>();
  const char* weight = static_cast<const char*>(args.weight.data);
  const size_t row_bytes = static_cast<size_t>(hidden) * dtype_size(args.weight.dtype);
  for (int64_t t = 0; t < num_tokens; ++t) {
    LSERVE_CHECK(ids[t] >= 0 && ids[t] < vocab_size, "embed: token id ", ids[t], " at ", t,
                 " is outside the vocabulary [0, ", vocab_size, ")");
    cpu_to_float(weight + ids[t] * row_bytes, args.weight.dtype,
                 args.output.data_ptr<float>() + t * args.output.stride(0), hidden);
  }
}

void cpu_rms_norm(const RmsNormArgs& args) {
  const int64_t num_tokens = args.input.size(0), hidden = args.input.size(1);
  std::vector<float> weight(static_cast<size_t>(hidden));
  cpu_to_float(args.weight.data, args.weight.dtype, weight.data(), hidden);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* in = args.input.data_ptr<float>() + t * args.input.stride(0);
    const float* x = in;
    if (args.residual.defined()) {
      float* residual = args.residual.data_ptr<float>() + t * args.residual.stride(0);
      for (int64_t i = 0; i < hidden; ++i) residual[i] += in[i];
      x = residual;
    }
    float sum_sq = 0.0f;
    for (int64_t i = 0; i < hidden; ++i) sum_sq += x[i] * x[i];
    const float inv_rms = 1.0f / std::sqrt(sum_sq / static_cast<float>(hidden) + args.eps);
    float* out = args.output.data_ptr<float>() + t * args.output.stride(0);
    for (int64_t i = 0; i < hidden; ++i) out[i] = weight[i] * (x[i] * inv_rms);
  }
}

void cpu_silu_mul(const SiluMulArgs& args) {
  const int64_t num_tokens = args.input.size(0), width = args.output.size(1);
  for (int64_t t = 0; t < num_tokens; ++t) {
    const float* gate = args.input.data_ptr<float>() + t * args.input.stride(0);
    const float* up = gate + width;
    float* out = args.output.data_ptr<float>() + t * args.output.stride(0);
    for (int64_t i = 0; i < width; ++i) out[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
  }
}

void cpu_gather_rows(const GatherRowsArgs& args) {
  const int64_t num_rows = args.input.size(0), width = args.input.size(1), num_out = args.indices.size(0);
  const int32_t* indices = args.indices.data_ptr<int32_t>();
  for (int64_t i = 0; i < num_out; ++i) {
    LSERVE_CHECK(indices[i] >= 0 && indices[i] < num_rows, "gather_rows: index ", indices[i], " outside [0, ",
                 num_rows, ")");
    std::memcpy(args.output.data_ptr<float>() + i * args.output.stride(0),
                args.input.data_ptr<float>() + indices[i] * args.input.stride(0), static_cast<size_t>(width) * 4);
  }
}

}  // namespace lserve
