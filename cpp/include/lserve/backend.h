// Backend: one public, validating entry per op (non-virtual interface) and one protected
// virtual <op>_impl per op that a device implements. CpuBackend (cpp/src/cpu/) is the
// reference every other backend is tested against; CudaBackend (cuda/src/) registers itself
// when linked in. No op synchronises the device.
//
// Activation dtypes: the tensors an op reads and writes between GEMMs (normed rows, q/k/v,
// attention output, MLP activations) may be float32, bfloat16 or float16 where an Args says
// so; a backend that computes in float32 only (the CPU reference) gets float32 copies of them
// from the public entry and its results rounded back, so every backend meets one contract:
// compute in float32, round once when storing a low-precision output.
#pragma once

#include <memory>
#include <string>
#include <utility>

#include "lserve/ops/attention.h"
#include "lserve/ops/embed.h"
#include "lserve/ops/gather_rows.h"
#include "lserve/ops/gemm.h"
#include "lserve/ops/logprobs.h"
#include "lserve/ops/page_select.h"
#include "lserve/ops/rms_norm.h"
#include "lserve/ops/rope_kv_append.h"
#include "lserve/ops/sample.h"
#include "lserve/ops/silu_mul.h"
#include "lserve/tensor.h"

namespace lserve {

// Every op of the Backend, as supports() names them.
enum class OpKind {
  kEmbed, kRmsNorm, kGemm, kSiluMul, kRopeKvAppend, kAttention, kGatherRows, kSample, kLogprobs, kPageSelect,
  kPageStatsAppend,
};
inline constexpr OpKind kAllOps[] = {
    OpKind::kEmbed,     OpKind::kRmsNorm, OpKind::kGemm,       OpKind::kSiluMul,    OpKind::kRopeKvAppend,
    OpKind::kAttention, OpKind::kGatherRows, OpKind::kSample,  OpKind::kLogprobs,   OpKind::kPageSelect,
    OpKind::kPageStatsAppend,
};
// "embed", "rms_norm", ... (the op's stem in every layer); op_kind_from_name raises lserve::Error.
const char* op_name(OpKind op);
OpKind op_kind_from_name(const std::string& name);

// The argument kinds backends differ on, for one op (what supports() is asked). Fields an op does not
// read are ignored. OpQuery::of(args) describes a call exactly.
struct OpQuery {
  OpKind op = OpKind::kEmbed;
  DType activation_dtype = DType::kF32;  // query / input / output rows (float32 | bfloat16 | float16)
  DType weight_dtype = DType::kF32;      // embed, rms_norm, gemm weights
  DType kv_cache_dtype = DType::kF32;    // rope_kv_append, attention caches
  int64_t head_dim = 0;                  // rope_kv_append, attention, page_select; 0: not asked
  // attention's block-iterator policy (ops/attention.h): Lambda windows, stream rings, a selection store.
  bool window = false;
  bool stream_ring = false;
  bool selection = false;
  GroupScore group_score = GroupScore::kSum;  // page_select

  static OpQuery of(const EmbedArgs& args);
  static OpQuery of(const RmsNormArgs& args);
  static OpQuery of(const GemmArgs& args);
  static OpQuery of(const RopeKvAppendArgs& args);
  static OpQuery of(const AttentionArgs& args);
  static OpQuery of(const PageSelectArgs& args);
  static OpQuery of(const PageStatsAppendArgs& args);
};

// supports()'s answer: yes, or no with a reason naming the argument, its value and the limit.
struct Support {
  bool supported = true;
  std::string reason;  // empty when supported
  explicit operator bool() const { return supported; }
  static Support yes() { return {}; }
  static Support no(std::string why) { return {false, std::move(why)}; }
};

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
  void synchronize() {
    note_isolation();
    synchronize_impl();
  }
  // (free, total) bytes of device memory, or (-1, -1) where unknown (the host).
  virtual std::pair<int64_t, int64_t> memory_info() { return {-1, -1}; }

  // Step isolation (STYLE.md 2b): a model's per-layer work runs between begin_isolated() and
  // end_isolated(), where nothing may allocate (empty), copy, fill or synchronise. Such calls still
  // run, and are counted: tests assert the count stays zero (on a device, a workspace growing on
  // the first step shows up here too).
  // The region is also the forward pass's extent: isolation_changed() tells the backend (the CPU
  // pool polls for jobs only inside it).
  void begin_isolated() {
    isolated_ = true;
    isolation_changed(true);
  }
  void end_isolated() {
    isolated_ = false;
    isolation_changed(false);
  }
  int64_t isolation_violations() const { return isolation_violations_; }

  // True when the *_impl ops take bfloat16/float16 activations themselves; otherwise the
  // public entries stage them through float32 copies (correct, slow; tests only).
  virtual bool low_precision_activations() const { return false; }
  // The activation dtype a model should use with weights of `weight_dtype` on this backend.
  DType activation_dtype(DType weight_dtype) const {
    return low_precision_activations() ? weight_dtype : DType::kF32;
  }

  // Graph capture (CUDA graphs for decode steps): the ops enqueued between begin_capture() and
  // end_capture() are recorded, not run, and replay_graph() runs them again on the same buffers.
  // While capturing nothing may allocate, copy to the host or synchronise. Backends without
  // graphs answer false to supports_graphs() and throw from the other three.
  virtual bool supports_graphs() const { return false; }
  virtual void begin_capture() { throw Error(name() + " backend: no graph capture"); }
  virtual std::shared_ptr<void> end_capture() { throw Error(name() + " backend: no graph capture"); }
  virtual void replay_graph(const std::shared_ptr<void>& graph) {
    (void)graph;
    throw Error(name() + " backend: no graph replay");
  }

  // Load-time weight preparation (once per weight, on the host, outside the isolated region): a copy of
  // a gemm weight in the layout this backend's gemm reads fastest (ops/gemm.h WeightLayout), for
  // GemmArgs::weight with GemmArgs::weight_layout. Returns that layout and sets *packed to the copy; or
  // returns WeightLayout::kRows, leaving *packed alone, where the backend serves `weight` as it is (CUDA:
  // every weight; the CPU: float weights). weight: (out_features, in_features), contiguous, host memory.
  WeightLayout pack_gemm_weight(const TensorView& weight, Tensor* packed);

  // Capability query (ggml's supports_op): can this backend run the op with these argument kinds?
  // First what the op's contract allows anywhere (ops/<op>.h), then supports_impl, this backend's
  // limits. The public op entries refuse what it refuses (after their Args' validate(), whose own
  // message comes first for what no contract allows), so an answer is never optimistic.
  // Device tests skip through it (tests/cuda/cuda_testing.py require()).
  Support supports(const OpQuery& query) const;

  // Ops: validate, refuse what supports() refuses (with its reason), stage low-precision
  // activations if this backend needs it, then run.
  void embed(const EmbedArgs& args);
  void rms_norm(const RmsNormArgs& args);
  void gemm(const GemmArgs& args);
  void silu_mul(const SiluMulArgs& args);
  void rope_kv_append(const RopeKvAppendArgs& args);
  void attention(const AttentionArgs& args);
  void gather_rows(const GatherRowsArgs& args);
  // One token per logits row on the device (ops/sample.h); float32 logits, used as scratch.
  void sample(const SampleArgs& args);
  // Logprobs of chosen tokens and the top tokens of raw logits rows (ops/logprobs.h).
  void logprobs(const LogprobsArgs& args);
  // Sparse attention (LServe): hierarchical page selection into the selector's store and the
  // kmax/kmin statistics (float32; queries and keys in the activation dtype).
  void page_select(const PageSelectArgs& args);
  void page_stats_append(const PageStatsAppendArgs& args);

 protected:
  void note_isolation() {
    if (isolated_) ++isolation_violations_;
  }
  virtual void synchronize_impl() {}
  // begin_isolated() (true) or end_isolated() (false) was called.
  virtual void isolation_changed(bool isolated) { (void)isolated; }
  // This backend's own limits beyond the op contracts; called by supports() for a query the
  // contract allows.
  virtual Support supports_impl(const OpQuery& query) const = 0;
  // Raises lserve::Error with supports()'s reason when the backend cannot run the call.
  void require_support(const OpQuery& query) const;
  virtual std::shared_ptr<void> allocate_bytes(size_t num_bytes) = 0;
  virtual void copy_impl(const TensorView& dst, const TensorView& src) = 0;
  virtual void fill_zero_impl(const TensorView& dst) = 0;
  // pack_gemm_weight's work; the default serves every weight as it is.
  virtual WeightLayout pack_gemm_weight_impl(const TensorView& weight, Tensor* packed) {
    (void)weight, (void)packed;
    return WeightLayout::kRows;
  }

  virtual void embed_impl(const EmbedArgs& args) = 0;
  virtual void rms_norm_impl(const RmsNormArgs& args) = 0;
  virtual void gemm_impl(const GemmArgs& args) = 0;
  virtual void silu_mul_impl(const SiluMulArgs& args) = 0;
  virtual void rope_kv_append_impl(const RopeKvAppendArgs& args) = 0;
  virtual void attention_impl(const AttentionArgs& args) = 0;
  virtual void gather_rows_impl(const GatherRowsArgs& args) = 0;
  virtual void sample_impl(const SampleArgs& args) = 0;
  virtual void logprobs_impl(const LogprobsArgs& args) = 0;
  virtual void page_select_impl(const PageSelectArgs& args) = 0;
  virtual void page_stats_append_impl(const PageStatsAppendArgs& args) = 0;

 private:
  bool isolated_ = false;
  int64_t isolation_violations_ = 0;
};

// The reference backend. num_threads <= 0 picks the hardware concurrency.
std::unique_ptr<Backend> make_cpu_backend(int num_threads = 0);

// Device backends other than the CPU live in their own libraries (lserve_cuda, linked into the
// Python module as objects) and register a factory for their device type at load time. A
// factory raises lserve::Error when the device cannot be used (no driver, no GPU, no cuBLASLt).
using BackendFactory = std::unique_ptr<Backend> (*)(int device_index);
bool register_backend_factory(DeviceType type, BackendFactory factory);
bool has_backend_factory(DeviceType type);

// "cpu" or "cuda[:N]"; "cuda" raises a clear lserve::Error when lserve was built without CUDA.
std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads = 0);

}  // namespace lserve
