// cuBLASLt through dlopen: the library is looked up when a CudaBackend is created (never at import),
// so lserve loads on machines without a GPU, driver or cuBLAS. Search order: $LSERVE_CUBLASLT_LIBRARY,
// the soname libcublasLt.so.<major of the headers we built with> (already loaded by torch, or on
// the loader path), then $CUDA_HOME/lib64 and /usr/local/cuda/lib64.
// CublasLtGemm runs D = A @ W^T in row-major terms with float32 accumulation, caching the
// descriptors and the heuristic's algorithm per shape.
#pragma once

#include <cublasLt.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <map>
#include <tuple>

#include "lserve/tensor.h"

namespace lserve {

struct CublasLtMatmulShape {
  int64_t num_tokens = 0;    // M: rows of input and output
  int64_t in_features = 0;   // K
  int64_t out_features = 0;  // N
  int64_t input_stride = 0;  // row stride of the input, elements
  int64_t output_stride = 0; // row stride of the output, elements
  DType operand_dtype = DType::kBF16;  // input and weight
  DType output_dtype = DType::kBF16;   // operand_dtype or float32
};

class CublasLtGemm {
 public:
  CublasLtGemm(int device_index);  // loads the library; raises lserve::Error when it cannot
  ~CublasLtGemm();
  CublasLtGemm(const CublasLtGemm&) = delete;
  CublasLtGemm& operator=(const CublasLtGemm&) = delete;

  // output = input @ weight^T. Returns false (launching nothing) when cuBLASLt offers no algorithm
  // for this shape, dtype and alignment; raises on a failed launch.
  bool matmul(const CublasLtMatmulShape& shape, const void* input, const void* weight, void* output,
              cudaStream_t stream);

 private:
  struct Plan;
  using Key = std::tuple<int64_t, int64_t, int64_t, int64_t, int64_t, int, int, int>;
  Plan& plan(const CublasLtMatmulShape& shape, int alignment);

  cublasLtHandle_t handle_ = nullptr;
  void* workspace_ = nullptr;
  size_t workspace_bytes_ = 0;
  std::map<Key, Plan*> plans_;
};

}  // namespace lserve
