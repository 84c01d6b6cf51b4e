// Backend: one public, validating entry per op (non-virtual interface) and one protected
// virtual <op>_impl per op that a device implements. CpuBackend (cpp/src/cpu/) is the
// reference every other backend is tested against. No op synchronises the device.
#pragma once

#include <memory>
#include <string>

#include "lserve/ops/attention.h"
#include "lserve/ops/embed.h"
#include "lserve/ops/gather_rows.h"
#include "lserve/ops/gemm.h"
#include "lserve/ops/page_select.h"
#include "lserve/ops/rms_norm.h"
#include "lserve/ops/rope_kv_append.h"
#include "lserve/ops/silu_mul.h"
#include "lserve/tensor.h"

namespace lserve {

enum class OpKind { kEmbed, kRmsNorm, kGemm, kSiluMul, kRopeKvAppend, kAttention, kGatherRows };

class Backend {
 public:
  virtual ~Backend() = default;

  virtual Device device() const = 0;
  virtual std::string name() const = 0;

  // Memory. `empty` returns an uninitialised contiguous tensor on this backend's device.
  Tensor empty(std::initializer_list<int64_t> shape, DType dtype);
  Tensor empty(const int64_t* shape, int ndim, DType dtype);
  // Copies src into dst (same shape; either may live on the host or this device); converts
  // between float32, bfloat16 and float16 when the dtypes differ. dst must be contiguous.
  void copy(const TensorView& dst, const TensorView& src);
  void fill_zero(const TensorView& dst);
  virtual void synchronize() {}

  // Capability query: can this backend run `op` with these dtypes? (tests skip through it)
  virtual bool supports(OpKind op, DType weight_dtype, DType kv_cache_dtype) const = 0;

  // Ops: validate, then run.
  void embed(const EmbedArgs& args) { args.validate(device()); embed_impl(args); }
  void rms_norm(const RmsNormArgs& args) { args.validate(device()); rms_norm_impl(args); }
  void gemm(const GemmArgs& args) { args.validate(device()); gemm_impl(args); }
  void silu_mul(const SiluMulArgs& args) { args.validate(device()); silu_mul_impl(args); }
  void rope_kv_append(const RopeKvAppendArgs& args) { args.validate(device()); rope_kv_append_impl(args); }
  void attention(const AttentionArgs& args) { args.validate(device()); attention_impl(args); }
  void gather_rows(const GatherRowsArgs& args) { args.validate(device()); gather_rows_impl(args); }
  // Sparse attention (LServe): hierarchical page selection and the kmax/kmin statistics.
  void page_select(const PageSelectArgs& args) { args.validate(device()); page_select_impl(args); }
  void page_stats_append(const PageStatsAppendArgs& args) { args.validate(device()); page_stats_append_impl(args); }

 protected:
  virtual std::shared_ptr<void> allocate_bytes(size_t num_bytes) = 0;
  virtual void copy_impl(const TensorView& dst, const TensorView& src) = 0;
  virtual void fill_zero_impl(const TensorView& dst) = 0;

  virtual void embed_impl(const EmbedArgs& args) = 0;
  virtual void rms_norm_impl(const RmsNormArgs& args) = 0;
  virtual void gemm_impl(const GemmArgs& args) = 0;
  virtual void silu_mul_impl(const SiluMulArgs& args) = 0;
  virtual void rope_kv_append_impl(const RopeKvAppendArgs& args) = 0;
  virtual void attention_impl(const AttentionArgs& args) = 0;
  virtual void gather_rows_impl(const GatherRowsArgs& args) = 0;
  virtual void page_select_impl(const PageSelectArgs& args);
  virtual void page_stats_append_impl(const PageStatsAppendArgs& args);
};

// The reference backend. num_threads <= 0 picks the hardware concurrency.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

// "cpu" or "cuda[:N]"; "cuda" raises a clear lserve::Error when lserve was built without CUDA.
std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads = 0);

}  // namespace lserve
