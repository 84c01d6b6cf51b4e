// cuBLASLt loading (dlopen) and the cached-plan GEMM. See cublaslt.h.
#include "cublaslt.h"

#include <dlfcn.h>

#include <algorithm>
#include <cstdlib>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "cuda_check.h"

namespace lserve {

namespace {

// The entry points lserve calls, resolved from the shared library.
struct CublasLtApi {
  decltype(&cublasLtGetVersion) get_version = nullptr;
  decltype(&cublasLtCreate) create = nullptr;
  decltype(&cublasLtDestroy) destroy = nullptr;
  decltype(&cublasLtMatmulDescCreate) desc_create = nullptr;
  decltype(&cublasLtMatmulDescDestroy) desc_destroy = nullptr;
  decltype(&cublasLtMatmulDescSetAttribute) desc_set = nullptr;
  decltype(&cublasLtMatrixLayoutCreate) layout_create = nullptr;
  decltype(&cublasLtMatrixLayoutDestroy) layout_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceCreate) pref_create = nullptr;
  decltype(&cublasLtMatmulPreferenceDestroy) pref_destroy = nullptr;
  decltype(&cublasLtMatmulPreferenceSetAttribute) pref_set = nullptr;
  decltype(&cublasLtMatmulAlgoGetHeuristic) heuristic = nullptr;
  decltype(&cublasLtMatmul) matmul = nullptr;
};

template <typename Fn>
void resolve(void* library, const char* symbol, Fn& out, std::string& missing) {
  out = reinterpret_cast<Fn>(dlsym(library, symbol));
  if (out == nullptr) missing += std::string(missing.empty() ? "" : ", ") + symbol;
}

const CublasLtApi& cublaslt_api() {
  static std::mutex mutex;
  static CublasLtApi api;
  static bool loaded = false;
  std::lock_guard<std::mutex> lock(mutex);
  if (loaded) return api;

  const std::string soname = "libcublasLt.so." + std::to_string(CUBLAS_VER_MAJOR);
  std::vector<std::string> candidates;
  if (const char* explicit_path = std::getenv("LSERVE_CUBLASLT_LIBRARY")) candidates.push_back(explicit_path);
  candidates.push_back(soname);
  for (const char* variable : {"CUDA_HOME", "CUDA_PATH"}) {
    if (const char* root = std::getenv(variable)) candidates.push_back(std::string(root) + "/lib64/" + soname);
  }
  candidates.push_back("/usr/local/cuda/lib64/" + soname);
  void* library = nullptr;
  std::string tried;
  for (const std::string& candidate : candidates) {
    library = dlopen(candidate.c_str(), RTLD_NOW | RTLD_LOCAL);
    if (library != nullptr) break;
    const char* reason = dlerror();
    tried += "\n  " + candidate + ": " + (reason ? reason : "not found");
  }
  LSERVE_CHECK(library != nullptr, "the CUDA backend needs cuBLASLt (", soname, "), which could not be loaded; "
               "install the nvidia-cublas wheel or a CUDA ", CUBLAS_VER_MAJOR, " toolkit, or point "
               "LSERVE_CUBLASLT_LIBRARY at the library. Tried:", tried);

  std::string missing;
  resolve(library, "cublasLtGetVersion", api.get_version, missing);
  resolve(library, "cublasLtCreate", api.create, missing);
  resolve(library, "cublasLtDestroy", api.destroy, missing);
  resolve(library, "cublasLtMatmulDescCreate", api.desc_create, missing);
  resolve(library, "cublasLtMatmulDescDestroy", api.desc_destroy, missing);
  resolve(library, "cublasLtMatmulDescSetAttribute", api.desc_set, missing);
  resolve(library, "cublasLtMatrixLayoutCreate", api.layout_create, missing);
  resolve(library, "cublasLtMatrixLayoutDestroy", api.layout_destroy, missing);
  resolve(library, "cublasLtMatmulPreferenceCreate", api.pref_create, missing);
  resolve(library, "cublasLtMatmulPreferenceDestroy", api.pref_destroy, missing);
  resolve(library, "cublasLtMatmulPreferenceSetAttribute", api.pref_set, missing);
  resolve(library, "cublasLtMatmulAlgoGetHeuristic", api.heuristic, missing);
  resolve(library, "cublasLtMatmul", api.matmul, missing);
  LSERVE_CHECK(missing.empty(), "cuBLASLt library lacks: ", missing);
  const size_t version = api.get_version();
  LSERVE_CHECK(version / 10000 == CUBLAS_VER_MAJOR, "cuBLASLt version ", version, " does not match major ",
               CUBLAS_VER_MAJOR, " of the headers lserve was built with");
  loaded = true;  // the library stays loaded for the life of the process
  return api;
}

#define LSERVE_CUBLAS_CHECK(expr)                                                                 \
  do {                                                                                            \
    const cublasStatus_t lserve_cublas_status_ = (expr);                                          \
    LSERVE_CHECK(lserve_cublas_status_ == CUBLAS_STATUS_SUCCESS, "cuBLASLt error ",               \
                 static_cast<int>(lserve_cublas_status_), " from ", #expr);                       \
  } while (0)

cudaDataType_t cuda_data_type(DType dtype) {
  switch (dtype) {
    case DType::kF32: return CUDA_R_32F;
    case DType::kBF16: return CUDA_R_16BF;
    case DType::kF16: return CUDA_R_16F;
    default: LSERVE_THROW("cuBLASLt: unsupported dtype ", dtype_name(dtype));
  }
}

// Largest power of two (<= 256) dividing the address: what the heuristic may assume.
int pointer_alignment(const void* pointer) {
  const uintptr_t address = reinterpret_cast<uintptr_t>(pointer);
  int alignment = 256;
  while (alignment > 1 && address % alignment != 0) alignment /= 2;
  return alignment;
}

// 32 MiB: NVIDIA's recommended cuBLASLt workspace on Hopper.
constexpr size_t kWorkspaceBytes = 32u << 20;

}  // namespace

struct CublasLtGemm::Plan {
  cublasLtMatmulDesc_t desc = nullptr;
  cublasLtMatrixLayout_t weight_layout = nullptr, input_layout = nullptr, output_layout = nullptr;
  cublasLtMatmulAlgo_t algo{};
  bool found = false;
};

CublasLtGemm::CublasLtGemm(int device_index) {
  const CublasLtApi& api = cublaslt_api();
  LSERVE_CUDA_CHECK(cudaSetDevice(device_index));
  LSERVE_CUBLAS_CHECK(api.create(&handle_));
  LSERVE_CUDA_CHECK(cudaMalloc(&workspace_, kWorkspaceBytes));
  workspace_bytes_ = kWorkspaceBytes;
}

CublasLtGemm::~CublasLtGemm() {
  const CublasLtApi& api = cublaslt_api();
  for (auto& entry : plans_) {
    Plan* plan = entry.second;
    if (plan->desc) api.desc_destroy(plan->desc);
    if (plan->weight_layout) api.layout_destroy(plan->weight_layout);
    if (plan->input_layout) api.layout_destroy(plan->input_layout);
    if (plan->output_layout) api.layout_destroy(plan->output_layout);
    delete plan;
  }
  if (workspace_) cudaFree(workspace_);
  if (handle_) api.destroy(handle_);
}

// Row-major output (M, N) = input (M, K) @ weight (N, K)^T is, column-major, output^T (N, M) =
// weight^T... : A = weight stored (K, N) column-major with op T, B = input stored (K, M) column-
// major with op N, D = (N, M) column-major with leading dimension output_stride.
CublasLtGemm::Plan& CublasLtGemm::plan(const CublasLtMatmulShape& shape, int alignment) {
  const Key key{shape.num_tokens, shape.in_features, shape.out_features, shape.input_stride, shape.output_stride,
                static_cast<int>(shape.operand_dtype), static_cast<int>(shape.output_dtype), alignment};
  auto it = plans_.find(key);
  if (it != plans_.end()) return *it->second;
  const CublasLtApi& api = cublaslt_api();
  if (plans_.size() >= 4096) {  // decode shapes vary with the batch; keep the cache bounded
    for (auto& entry : plans_) {
      Plan* old = entry.second;
      api.desc_destroy(old->desc);
      api.layout_destroy(old->weight_layout);
      api.layout_destroy(old->input_layout);
      api.layout_destroy(old->output_layout);
      delete old;
    }
    plans_.clear();
  }
  auto plan = std::make_unique<Plan>();
  const cudaDataType_t operand = cuda_data_type(shape.operand_dtype), output = cuda_data_type(shape.output_dtype);
  LSERVE_CUBLAS_CHECK(api.desc_create(&plan->desc, CUBLAS_COMPUTE_32F, CUDA_R_32F));
  const cublasOperation_t transpose = CUBLAS_OP_T, no_transpose = CUBLAS_OP_N;
  LSERVE_CUBLAS_CHECK(api.desc_set(plan->desc, CUBLASLT_MATMUL_DESC_TRANSA, &transpose, sizeof(transpose)));
  LSERVE_CUBLAS_CHECK(api.desc_set(plan->desc, CUBLASLT_MATMUL_DESC_TRANSB, &no_transpose, sizeof(no_transpose)));
  LSERVE_CUBLAS_CHECK(api.layout_create(&plan->weight_layout, operand, shape.in_features, shape.out_features,
                                        shape.in_features));
  LSERVE_CUBLAS_CHECK(api.layout_create(&plan->input_layout, operand, shape.in_features, shape.num_tokens,
                                        shape.input_stride));
  LSERVE_CUBLAS_CHECK(api.layout_create(&plan->output_layout, output, shape.out_features, shape.num_tokens,
                                        shape.output_stride));
  cublasLtMatmulPreference_t preference = nullptr;
  LSERVE_CUBLAS_CHECK(api.pref_create(&preference));
  const uint64_t workspace = workspace_bytes_;
  const uint32_t align = static_cast<uint32_t>(alignment);
  api.pref_set(preference, CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES, &workspace, sizeof(workspace));
  api.pref_set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES, &align, sizeof(align));
  api.pref_set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES, &align, sizeof(align));
  api.pref_set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES, &align, sizeof(align));
  api.pref_set(preference, CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES, &align, sizeof(align));
  cublasLtMatmulHeuristicResult_t result{};
  int num_results = 0;
  const cublasStatus_t status = api.heuristic(handle_, plan->desc, plan->weight_layout, plan->input_layout,
                                              plan->output_layout, plan->output_layout, preference, 1, &result,
                                              &num_results);
  api.pref_destroy(preference);
  plan->found = status == CUBLAS_STATUS_SUCCESS && num_results > 0 && result.state == CUBLAS_STATUS_SUCCESS;
  if (plan->found) plan->algo = result.algo;
  Plan* raw = plan.release();
  plans_.emplace(key, raw);
  return *raw;
}

bool CublasLtGemm::matmul(const CublasLtMatmulShape& shape, const void* input, const void* weight, void* output,
                          cudaStream_t stream) {
  int alignment = std::min(pointer_alignment(input), std::min(pointer_alignment(weight), pointer_alignment(output)));
  const int element = static_cast<int>(dtype_size(shape.operand_dtype));
  // Leading dimensions count too: a row stride that is not a multiple of the alignment misaligns rows.
  while (alignment > element && ((shape.input_stride * element) % alignment != 0 ||
                                 (shape.in_features * element) % alignment != 0 ||
                                 (shape.output_stride * static_cast<int64_t>(dtype_size(shape.output_dtype))) %
                                         alignment != 0)) {
    alignment /= 2;
  }
  Plan& p = plan(shape, alignment);
  if (!p.found) return false;
  const float alpha = 1.0f, beta = 0.0f;
  LSERVE_CUBLAS_CHECK(cublaslt_api().matmul(handle_, p.desc, &alpha, weight, p.weight_layout, input, p.input_layout,
                                            &beta, output, p.output_layout, output, p.output_layout, &p.algo,
                                            workspace_, workspace_bytes_, stream));
  return true;
}

}  // namespace lserve
