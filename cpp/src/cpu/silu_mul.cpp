// CPU silu_mul: output = silu(gate) * up with input = [gate | up] along the row.
// Reference: transformers' LlamaMLP, act_fn(gate_proj(x)) * up_proj(x).
#include <algorithm>
#include <cmath>

#include "convert.h"
#include "cpu_backend.h"

namespace lserve::cpu {

void silu_mul(const CpuContext& context, const SiluMulArgs& args) {
  const int64_t num_tokens = args.input.size(0), intermediate_size = args.output.size(1);
  const int64_t grain = std::max<int64_t>(1, 8192 / std::max<int64_t>(intermediate_size, 1));
  context.pool->parallel_for(0, num_tokens, grain, [&](int64_t begin, int64_t end, int) {
    for (int64_t t = begin; t < end; ++t) {
      const float* gate = row_ptr<const float>(args.input, t);  // (intermediate_size,)
      const float* up = gate + intermediate_size;               // (intermediate_size,)
      float* output = row_ptr<float>(args.output, t);           // (intermediate_size,)
      for (int64_t i = 0; i < intermediate_size; ++i) {
        output[i] = gate[i] / (1.0f + std::exp(-gate[i])) * up[i];
      }
    }
  });
}

}  // namespace lserve::cpu
