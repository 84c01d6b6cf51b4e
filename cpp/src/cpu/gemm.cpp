// CPU reference GEMM: output = input @ weight^T (+ bias), fp32 accumulation. Each weight row is
// converted to float32 once and dotted with every input row; eight partial sums let the compiler
// vectorise the reduction without -ffast-math.
#include <vector>

#include "cpu/cpu_backend.h"

namespace lserve {

namespace {

inline float dot(const float* a, const float* b, int64_t count) {
  float partial[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= count; i += 8) {
    for (int j = 0; j < 8; ++j) partial[j] += a[i + j] * b[i + j];
  }
  float sum = ((partial[0] + partial[1]) + (partial[2] + partial[3])) +
              ((partial[4] + partial[5]) + (partial[6] + partial[7]));
  for (; i < count; ++i) sum += a[i] * b[i];
  return sum;
}

}  // namespace

void cpu_gemm(const GemmArgs& args) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  const char* weight = static_cast<const char*>(args.weight.data);
  const size_t row_bytes = static_cast<size_t>(in_features) * dtype_size(args.weight.dtype);
  const float* bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;
  std::vector<float> row(static_cast<size_t>(in_features));
  for (int64_t n = 0; n < out_features; ++n) {
    const float* w = reinterpret_cast<const float*>(weight + n * row_bytes);
    if (args.weight.dtype != DType::kF32) {
      cpu_to_float(weight + n * row_bytes, args.weight.dtype, row.data(), in_features);
      w = row.data();
    }
    for (int64_t m = 0; m < num_tokens; ++m) {
      const float* x = args.input.data_ptr<float>() + m * args.input.stride(0);
      args.output.data_ptr<float>()[m * args.output.stride(0) + n] = dot(x, w, in_features) + (bias ? bias[n] : 0.0f);
    }
  }
}

}  // namespace lserve
