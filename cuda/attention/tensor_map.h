// Host helpers for TMA tensor maps: the driver's cuTensorMapEncodeTiled through the runtime's
// entry-point query (no -lcuda), and a 16-bit, 128-byte-swizzle tiled map.
#pragma once

#include <cuda.h>
#include <cuda_runtime_api.h>

#include "attention_kernels.h"

namespace lserve::cuda {

// (cudaTypedefs.h is no help: CUTLASS includes it inside namespace cutlass.)
using TensorMapEncodeFn = decltype(&cuTensorMapEncodeTiled);

inline TensorMapEncodeFn tensor_map_encoder() {
  static TensorMapEncodeFn encode = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult status{};
    if (cudaGetDriverEntryPointByVersion("cuTensorMapEncodeTiled", &fn, 12000, cudaEnableDefault, &status) !=
            cudaSuccess ||
        status != cudaDriverEntryPointSuccess) {
      return static_cast<TensorMapEncodeFn>(nullptr);
    }
    return reinterpret_cast<TensorMapEncodeFn>(fn);
  }();
  return encode;
}

// A rank-N tiled map over 16-bit elements, 128-byte swizzle; dims/strides innermost first, strides
// in elements for dims 1..N-1.
template <int kRank>
inline bool encode_tensor_map(CUtensorMap* map, AttnDType dtype, const void* ptr, const uint64_t (&dims)[kRank],
                              const int64_t (&strides)[kRank - 1], const uint32_t (&box)[kRank]) {
  auto encode = tensor_map_encoder();
  if (encode == nullptr) return false;
  cuuint64_t global_dims[kRank];
  cuuint64_t global_strides[kRank - 1];
  cuuint32_t box_dims[kRank], element_strides[kRank];
  for (int i = 0; i < kRank; ++i) {
    global_dims[i] = dims[i];
    box_dims[i] = box[i];
    element_strides[i] = 1;
  }
  for (int i = 0; i < kRank - 1; ++i) {
    const int64_t bytes = strides[i] * 2;
    if (bytes <= 0 || bytes % 16 != 0 || bytes >= (int64_t(1) << 40)) return false;
    global_strides[i] = cuuint64_t(bytes);
  }
  const CUtensorMapDataType type =
      dtype == AttnDType::kBF16 ? CU_TENSOR_MAP_DATA_TYPE_BFLOAT16 : CU_TENSOR_MAP_DATA_TYPE_FLOAT16;
  return encode(map, type, kRank, const_cast<void*>(ptr), global_dims, global_strides, box_dims, element_strides,
                CU_TENSOR_MAP_INTERLEAVE_NONE, CU_TENSOR_MAP_SWIZZLE_128B, CU_TENSOR_MAP_L2_PROMOTION_L2_256B,
                CU_TENSOR_MAP_FLOAT_OOB_FILL_NONE) == CUDA_SUCCESS;
}

}  // namespace lserve::cuda
