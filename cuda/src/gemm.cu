// gemm on CUDA: output = input @ weight^T (+ bias) through cuBLASLt with float32 accumulation.
// The operands share the weight's dtype (an input of another dtype is converted first); the product
// goes straight to the output when it has the operand dtype or float32 and there is no bias, else
// to a float32 buffer that the bias epilogue rounds into the output once. Shapes cuBLASLt has no
// algorithm for run the SIMT fallback kernel.
#include "cublaslt.h"
#include "cuda_backend.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/gemm.cuh"

namespace lserve {

void cuda_gemm(CudaBackend& backend, const GemmArgs& args) {
  const int64_t num_tokens = args.input.size(0), in_features = args.input.size(1);
  const int64_t out_features = args.weight.size(0);
  if (num_tokens == 0 || out_features == 0) return;
  const DType operand = args.weight.dtype;

  const void* input = args.input.data;
  int64_t input_stride = args.input.stride(0);
  Tensor converted_input;
  if (args.input.dtype != operand) {
    converted_input = backend.empty({num_tokens, in_features}, operand);
    cuda_convert(backend, args.input.data, args.input.dtype, input_stride, converted_input.data(), operand,
                 in_features, num_tokens, in_features);
    input = converted_input.data();
    input_stride = in_features;
  }

  const bool direct = !args.bias.defined() && (args.output.dtype == operand || args.output.dtype == DType::kF32);
  Tensor product;
  void* output = args.output.data;
  int64_t output_stride = args.output.stride(0);
  DType output_dtype = args.output.dtype;
  if (!direct) {
    product = backend.empty({num_tokens, out_features}, DType::kF32);
    output = product.data();
    output_stride = out_features;
    output_dtype = DType::kF32;
  }

  CublasLtMatmulShape shape;
  shape.num_tokens = num_tokens;
  shape.in_features = in_features;
  shape.out_features = out_features;
  shape.input_stride = input_stride;
  shape.output_stride = output_stride;
  shape.operand_dtype = operand;
  shape.output_dtype = output_dtype;
  if (!backend.cublaslt().matmul(shape, input, args.weight.data, output, backend.stream())) {
    cuda::GemmFallbackParams params;
    params.input = input;
    params.weight = args.weight.data;
    params.output = output;
    params.num_tokens = num_tokens;
    params.in_features = in_features;
    params.out_features = out_features;
    params.input_stride = input_stride;
    params.output_stride = output_stride;
    dispatch_float(operand, "gemm", [&](auto operand_tag) {
      using T = decltype(operand_tag);
      dispatch_float(output_dtype, "gemm", [&](auto out_tag) {
        LSERVE_CUDA_CHECK((cuda::launch_gemm_fallback<T, T, decltype(out_tag)>(params, backend.stream())));
      });
    });
  }

  if (!direct) {
    cuda::BiasEpilogueParams params;
    params.product = static_cast<const float*>(output);
    params.bias = args.bias.defined() ? args.bias.data_ptr<float>() : nullptr;
    params.output = args.output.data;
    params.num_tokens = num_tokens;
    params.out_features = out_features;
    params.output_stride = args.output.stride(0);
    dispatch_float(args.output.dtype, "gemm", [&](auto out_tag) {
      LSERVE_CUDA_CHECK(cuda::launch_bias_epilogue<decltype(out_tag)>(params, backend.stream()));
    });
  }
}

}  // namespace lserve
