// CudaBackend: device selection, the stream and memory pool, host<->device copies with dtype
// conversion, op entry points, and registration with make_backend().
#include "cuda_backend.h"

#include <cstring>
#include <limits>

#include "cublaslt.h"
#include "cuda_check.h"
#include "lserve/cuda/ops/convert.cuh"

namespace lserve {

CudaContext::~CudaContext() {
  // Errors are ignored here: at process exit the CUDA runtime may already be gone.
  cudaSetDevice(device_index);
  if (stream) cudaStreamSynchronize(stream);
  if (pool) cudaMemPoolDestroy(pool);
  if (stream) cudaStreamDestroy(stream);
}

CudaBackend::CudaBackend(int device_index) {
  int num_devices = 0;
  const cudaError_t status = cudaGetDeviceCount(&num_devices);
  if (status != cudaSuccess) {
    cudaGetLastError();
    LSERVE_THROW("device 'cuda:", device_index, "' requested, but no CUDA GPU is usable here: ",
                 cudaGetErrorString(status), " (", cudaGetErrorName(status), ")");
  }
  LSERVE_CHECK(device_index >= 0 && device_index < num_devices, "device 'cuda:", device_index,
               "' requested, but this machine has ", num_devices, " CUDA device(s)");
  LSERVE_CUDA_CHECK(cudaSetDevice(device_index));
  LSERVE_CUDA_CHECK(cudaDeviceGetAttribute(&num_sms_, cudaDevAttrMultiProcessorCount, device_index));
  auto context = std::make_shared<CudaContext>();
  context->device_index = device_index;
  LSERVE_CUDA_CHECK(cudaStreamCreateWithFlags(&context->stream, cudaStreamDefault));
  cudaMemPoolProps props{};
  props.allocType = cudaMemAllocationTypePinned;
  props.location.type = cudaMemLocationTypeDevice;
  props.location.id = device_index;
  LSERVE_CUDA_CHECK(cudaMemPoolCreate(&context->pool, &props));
  // Keep freed blocks: per-step buffers are reallocated every step.
  uint64_t threshold = std::numeric_limits<uint64_t>::max();
  LSERVE_CUDA_CHECK(cudaMemPoolSetAttribute(context->pool, cudaMemPoolAttrReleaseThreshold, &threshold));
  context_ = std::move(context);
  cublaslt_ = std::make_unique<CublasLtGemm>(device_index);
}

CudaBackend::~CudaBackend() {
  cudaSetDevice(context_->device_index);
  cudaStreamSynchronize(context_->stream);
  cublaslt_.reset();
}

void CudaBackend::activate() const { LSERVE_CUDA_CHECK(cudaSetDevice(context_->device_index)); }

Support CudaBackend::supports_impl(const OpQuery& query) const {
  // What the op contracts allow (Backend::supports) runs here too, except: attention's reference
  // kernel (attention_reference.cu: 2, 4 or 8 channels per lane) serves what the tensor-core kernels
  // (head_dim 64 or 128, every sparse policy) do not, up to head_dim 256; page_select implements the
  // "sum" and "max" group scores (page_select.cu); gemm and embed take float weights only (the ggml
  // block formats are the CPU backend's). Every other dtype the contracts allow is dispatched.
  switch (query.op) {
    case OpKind::kAttention:
      if (query.head_dim > kMaxAttentionHeadDim) {
        return Support::no("attention on CUDA: head_dim " + std::to_string(query.head_dim) + " is above " +
                           std::to_string(kMaxAttentionHeadDim) + " (the reference kernel's limit)");
      }
      return Support::yes();
    case OpKind::kPageSelect:
      if (query.group_score == GroupScore::kMass) {
        return Support::no("page_select on CUDA: group_score 'mass' runs on the CPU backend only (CUDA implements "
                           "'sum' and 'max')");
      }
      return Support::yes();
    case OpKind::kEmbed:
    case OpKind::kGemm:
      if (dtype_is_block(query.weight_dtype)) {
        return Support::no(std::string(op_name(query.op)) + " on CUDA: " + dtype_name(query.weight_dtype) +
                           " block weights run on the CPU backend only (load with a float dtype)");
      }
      return Support::yes();
    case OpKind::kRmsNorm:
    case OpKind::kSiluMul:
    case OpKind::kRopeKvAppend:
    case OpKind::kGatherRows:
    case OpKind::kSample:
    case OpKind::kLogprobs:
    case OpKind::kPageStatsAppend: return Support::yes();
  }
  return Support::no("unknown op " + std::to_string(static_cast<int>(query.op)));
}

void CudaBackend::synchronize_impl() {
  activate();
  LSERVE_CUDA_CHECK(cudaStreamSynchronize(context_->stream));
  LSERVE_CUDA_CHECK(cudaGetLastError());
}

std::pair<int64_t, int64_t> CudaBackend::memory_info() {
  synchronize();
  LSERVE_CUDA_CHECK(cudaMemPoolTrimTo(context_->pool, 0));  // cached blocks count as free
  size_t free_bytes = 0, total_bytes = 0;
  LSERVE_CUDA_CHECK(cudaMemGetInfo(&free_bytes, &total_bytes));
  return {static_cast<int64_t>(free_bytes), static_cast<int64_t>(total_bytes)};
}

std::shared_ptr<void> CudaBackend::allocate_bytes(size_t num_bytes) {
  activate();
  LSERVE_CHECK(!capturing_, "allocating ", num_bytes, " bytes of GPU memory while capturing a CUDA graph: every "
               "buffer a captured step uses must exist before capture");
  void* data = nullptr;
  cudaError_t status = cudaMallocFromPoolAsync(&data, num_bytes, context_->pool, context_->stream);
  if (status == cudaErrorMemoryAllocation) {  // give cached blocks back to the device and retry once
    cudaGetLastError();
    LSERVE_CUDA_CHECK(cudaStreamSynchronize(context_->stream));
    LSERVE_CUDA_CHECK(cudaMemPoolTrimTo(context_->pool, 0));
    status = cudaMallocFromPoolAsync(&data, num_bytes, context_->pool, context_->stream);
  }
  if (status == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    size_t free_bytes = 0, total_bytes = 0;
    cudaMemGetInfo(&free_bytes, &total_bytes);
    LSERVE_THROW("out of GPU memory allocating ", num_bytes, " bytes on cuda:", context_->device_index, " (",
                 free_bytes, " of ", total_bytes, " bytes free)");
  }
  LSERVE_CUDA_CHECK(status);
  std::shared_ptr<CudaContext> context = context_;
  return std::shared_ptr<void>(data, [context](void* pointer) {
    cudaSetDevice(context->device_index);
    cudaFreeAsync(pointer, context->stream);
  });
}

void cuda_convert(CudaBackend& backend, const void* src, DType src_dtype, int64_t src_stride, void* dst,
                  DType dst_dtype, int64_t dst_stride, int64_t num_rows, int64_t num_cols) {
  cuda::ConvertParams params;
  params.src = src;
  params.dst = dst;
  params.num_rows = num_rows;
  params.num_cols = num_cols;
  params.src_stride = src_stride;
  params.dst_stride = dst_stride;
  dispatch_float(src_dtype, "copy", [&](auto src_tag) {
    dispatch_float(dst_dtype, "copy", [&](auto dst_tag) {
      LSERVE_CUDA_CHECK((cuda::launch_convert<decltype(src_tag), decltype(dst_tag)>(params, backend.stream())));
    });
  });
}

void CudaBackend::copy_impl(const TensorView& dst, const TensorView& src) {
  activate();
  for (const TensorView* view : {&dst, &src}) {
    LSERVE_CHECK(view->device.type == DeviceType::kCPU || view->device == device(), "copy: tensor on ",
                 view->device.str(), " cannot be copied by the ", device().str(), " backend");
  }
  const bool dst_host = dst.device.type == DeviceType::kCPU, src_host = src.device.type == DeviceType::kCPU;
  const int64_t count = src.numel();
  if (count == 0) return;
  cudaStream_t stream = context_->stream;
  if (dst.dtype == src.dtype) {
    LSERVE_CUDA_CHECK(cudaMemcpyAsync(dst.data, src.data, src.nbytes(), cudaMemcpyDefault, stream));
    if (dst_host) LSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
    return;
  }
  // Conversions run on the device: upload the source as is, convert, download the result.
  Tensor src_staged, dst_staged;
  const void* device_src = src.data;
  if (src_host) {
    src_staged = empty({count}, src.dtype);
    LSERVE_CUDA_CHECK(cudaMemcpyAsync(src_staged.data(), src.data, src.nbytes(), cudaMemcpyHostToDevice, stream));
    device_src = src_staged.data();
  }
  void* device_dst = dst.data;
  if (dst_host) {
    dst_staged = empty({count}, dst.dtype);
    device_dst = dst_staged.data();
  }
  cuda_convert(*this, device_src, src.dtype, count, device_dst, dst.dtype, count, 1, count);
  if (dst_host) {
    LSERVE_CUDA_CHECK(cudaMemcpyAsync(dst.data, device_dst, dst.nbytes(), cudaMemcpyDeviceToHost, stream));
    LSERVE_CUDA_CHECK(cudaStreamSynchronize(stream));
  }
}

void CudaBackend::fill_zero_impl(const TensorView& dst) {
  activate();
  LSERVE_CUDA_CHECK(cudaMemsetAsync(dst.data, 0, dst.nbytes(), context_->stream));
}

void CudaBackend::embed_impl(const EmbedArgs& args) { activate(); cuda_embed(*this, args); }
void CudaBackend::rms_norm_impl(const RmsNormArgs& args) { activate(); cuda_rms_norm(*this, args); }
void CudaBackend::gemm_impl(const GemmArgs& args) { activate(); cuda_gemm(*this, args); }
void CudaBackend::silu_mul_impl(const SiluMulArgs& args) { activate(); cuda_silu_mul(*this, args); }
void CudaBackend::rope_kv_append_impl(const RopeKvAppendArgs& args) { activate(); cuda_rope_kv_append(*this, args); }
void CudaBackend::attention_impl(const AttentionArgs& args) { activate(); cuda_attention(*this, args); }
void CudaBackend::gather_rows_impl(const GatherRowsArgs& args) { activate(); cuda_gather_rows(*this, args); }
void CudaBackend::sample_impl(const SampleArgs& args) { activate(); cuda_sample(*this, args); }
void CudaBackend::logprobs_impl(const LogprobsArgs& args) { activate(); cuda_logprobs(*this, args); }
void CudaBackend::page_select_impl(const PageSelectArgs& args) { activate(); cuda_page_select(*this, args); }
void CudaBackend::page_stats_append_impl(const PageStatsAppendArgs& args) {
  activate();
  cuda_page_stats_append(*this, args);
}

std::unique_ptr<Backend> make_cuda_backend(int device_index) { return std::make_unique<CudaBackend>(device_index); }

namespace {
// Linked into the Python module as objects, so this runs at load time; it touches no CUDA API.
[[maybe_unused]] const bool kRegistered = register_backend_factory(DeviceType::kCUDA, &make_cuda_backend);
}  // namespace

}  // namespace lserve
