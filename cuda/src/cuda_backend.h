// CudaBackend: every Backend op on one NVIDIA GPU. One stream per backend (a blocking stream, so it
// orders itself with work on the legacy default stream, e.g. torch's); memory from a private
// stream-ordered pool that keeps freed blocks cached (cudaMallocAsync semantics); GEMMs through
// cuBLASLt, loaded with dlopen when the backend is created so that `import lserve` needs no driver
// and no cuBLAS. Activations may be float32, bfloat16 or float16 (low_precision_activations).
// One <op>.cu per op turns Args into a kernel's params (cuda/include/lserve/cuda/ops/<op>.cuh).
#pragma once

#include <cuda_runtime.h>

#include <memory>
#include <string>
#include <utility>

#include "lserve/backend.h"

namespace lserve {

class CublasLtGemm;

// What Tensors' deleters need after the backend object is gone: the stream and the pool.
struct CudaContext {
  int device_index = 0;
  cudaStream_t stream = nullptr;
  cudaMemPool_t pool = nullptr;
  ~CudaContext();
};

class CudaBackend : public Backend {
 public:
  explicit CudaBackend(int device_index);
  ~CudaBackend() override;

  Device device() const override { return Device{DeviceType::kCUDA, context_->device_index}; }
  std::string name() const override { return "cuda"; }
  void synchronize_impl() override;
  std::pair<int64_t, int64_t> memory_info() override;
  bool low_precision_activations() const override { return true; }
  // CUDA graphs (cuda_graph.cu): stream capture in relaxed mode on this backend's stream.
  bool supports_graphs() const override { return true; }
  void begin_capture() override;
  std::shared_ptr<void> end_capture() override;
  void replay_graph(const std::shared_ptr<void>& graph) override;
  bool capturing() const { return capturing_; }
  // At least num_bytes (16-byte aligned) of device scratch for one op's kernels: a buffer per
  // Workspace kept across calls, so steps allocate nothing once it has grown. It grows only outside
  // capture and before the first graph (graphs keep its address); past that, a larger request outside
  // capture gets a per-call buffer held by *scratch, and inside capture is an error.
  enum class Workspace { kDecodeAttention, kPageSelect };
  void* workspace(Workspace which, size_t num_bytes, Tensor* scratch);

  cudaStream_t stream() const { return context_->stream; }
  int num_sms() const { return num_sms_; }  // streaming multiprocessors (kernel grid heuristics)
  // Makes this backend's GPU current on the calling thread (engine steps may change threads).
  void activate() const;
  CublasLtGemm& cublaslt() { return *cublaslt_; }

 protected:
  Support supports_impl(const OpQuery& query) const override;
  std::shared_ptr<void> allocate_bytes(size_t num_bytes) override;
  void copy_impl(const TensorView& dst, const TensorView& src) override;
  void fill_zero_impl(const TensorView& dst) override;

  void embed_impl(const EmbedArgs& args) override;
  void rms_norm_impl(const RmsNormArgs& args) override;
  void gemm_impl(const GemmArgs& args) override;
  void silu_mul_impl(const SiluMulArgs& args) override;
  void rope_kv_append_impl(const RopeKvAppendArgs& args) override;
  void attention_impl(const AttentionArgs& args) override;
  void gather_rows_impl(const GatherRowsArgs& args) override;
  void sample_impl(const SampleArgs& args) override;
  void logprobs_impl(const LogprobsArgs& args) override;
  void page_select_impl(const PageSelectArgs& args) override;
  void page_stats_append_impl(const PageStatsAppendArgs& args) override;

 private:
  std::shared_ptr<CudaContext> context_;
  std::unique_ptr<CublasLtGemm> cublaslt_;
  int num_sms_ = 0;
  bool capturing_ = false;
  int num_graphs_ = 0;                   // graphs captured so far (they hold the workspace's address)
  Tensor workspaces_[2];  // by Workspace
};

// Per-op glue (cuda/src/<op>.cu): Args -> params, dtype dispatch, launch on backend.stream().
void cuda_embed(CudaBackend& backend, const EmbedArgs& args);
void cuda_rms_norm(CudaBackend& backend, const RmsNormArgs& args);
void cuda_gemm(CudaBackend& backend, const GemmArgs& args);
void cuda_silu_mul(CudaBackend& backend, const SiluMulArgs& args);
void cuda_rope_kv_append(CudaBackend& backend, const RopeKvAppendArgs& args);
void cuda_attention(CudaBackend& backend, const AttentionArgs& args);
void cuda_gather_rows(CudaBackend& backend, const GatherRowsArgs& args);
void cuda_sample(CudaBackend& backend, const SampleArgs& args);
void cuda_logprobs(CudaBackend& backend, const LogprobsArgs& args);
void cuda_page_select(CudaBackend& backend, const PageSelectArgs& args);
void cuda_page_stats_append(CudaBackend& backend, const PageStatsAppendArgs& args);
// The simple paged attention every faster kernel is checked against (attention_reference.cu), for
// head_dim <= kMaxAttentionHeadDim.
constexpr int64_t kMaxAttentionHeadDim = 256;
void cuda_attention_reference(CudaBackend& backend, const AttentionArgs& args);
// dst = src over (num_rows, num_cols) matrices with row strides, converting dtypes, on the device.
void cuda_convert(CudaBackend& backend, const void* src, DType src_dtype, int64_t src_stride, void* dst,
                  DType dst_dtype, int64_t dst_stride, int64_t num_rows, int64_t num_cols);

std::unique_ptr<Backend> make_cuda_backend(int device_index);

}  // namespace lserve
