// CPU rms_norm: x = input (or residual += input; x = residual), output = x * rsqrt(mean(x^2) + eps)
// * weight, fp32 throughout. Reference: transformers' LlamaRMSNorm and vLLM's fused_add_rms_norm.
#include <algorithm>
#include <cmath>
#include <vector>

#include "cpu_backend.h"
#include "vec.h"

namespace lserve::cpu {

void rms_norm(const CpuContext& context, const RmsNormArgs& args) {
  const int64_t num_tokens = args.input.size(0), hidden_size = args.input.size(1);
  std::vector<float> weight(hidden_size);  // (hidden_size,) converted once
  dispatch_float(args.weight.dtype, args.weight.data,
                 [&](const auto* data) { load_row(data, weight.data(), hidden_size); });
  const bool has_residual = args.residual.defined();
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(hidden_size, 1));
  context.pool->parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const float* input = row_ptr<const float>(args.input, t);  // (hidden_size,)
      float* output = row_ptr<float>(args.output, t);            // (hidden_size,), may alias input
      const float* x = input;
      if (has_residual) {
        float* residual = row_ptr<float>(args.residual, t);  // (hidden_size,)
        for (int64_t i = 0; i < hidden_size; ++i) residual[i] += input[i];
        x = residual;
      }
      const float mean_square = sum_squares(x, hidden_size) / static_cast<float>(hidden_size);
      const float inv_rms = 1.0f / std::sqrt(mean_square + args.eps);
      for (int64_t i = 0; i < hidden_size; ++i) output[i] = x[i] * inv_rms * weight[i];
    }
  });
}

}  // namespace lserve::cpu
