// CPU gather_rows: output[i] = input[indices[i]] (exact copy). Indices are checked on the host
// before anything is written.
#include <algorithm>
#include <cstring>

#include "convert.h"
#include "cpu_backend.h"

namespace lserve::cpu {

void gather_rows(const CpuContext& context, const GatherRowsArgs& args) {
  const int64_t num_rows = args.input.size(0), width = args.input.size(1);
  const int64_t num_out = args.indices.size(0);
  const int32_t* indices = args.indices.data_ptr<int32_t>();  // (num_out,)
  for (int64_t i = 0; i < num_out; ++i) {
    LSERVE_CHECK(indices[i] >= 0 && indices[i] < num_rows, "gather_rows: indices[", i, "] = ", indices[i],
                 " is out of range [0, ", num_rows, ")");
  }
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(width, 1));
  context.pool->parallel_for(0, num_out, grain, [&](int64_t begin, int64_t end, int) {
    for (int64_t i = begin; i < end; ++i) {
      std::memcpy(row_ptr<float>(args.output, i), row_ptr<const float>(args.input, indices[i]),
                  static_cast<size_t>(width) * sizeof(float));
    }
  });
}

}  // namespace lserve::cpu
