// CpuBackend: the reference backend every other backend is tested against. Host memory,
// fp32 accumulation, plain loops; the hot kernels (GEMM, attention) also have AVX2+FMA builds,
// and the block-format GEMM AVX-512 ones, picked at run time (lserve/cpu_isa.h; never
// -march=native). Each op lives in cpp/src/cpu/<op>.cpp as a free function below; the
// Backend::<op>_impl overrides only forward to them.
#pragma once

#include <memory>
#include <string>

#include "lserve/backend.h"
#include "lserve/cpu_isa.h"
#include "parallel.h"
#include "weight_arena.h"

namespace lserve::cpu {

// What an op needs from the backend: the pool and the instruction-set level picked at start-up.
struct CpuContext {
  ThreadPool* pool = nullptr;
  // The highest level the kernels may use (the CPU runs it); an op runs its best kernel up to it.
  CpuIsa isa = CpuIsa::kGeneric;
  bool has_avx2_fma() const { return isa >= CpuIsa::kAvx2; }  // AVX2 + FMA + F16C
};

void embed(const CpuContext& context, const EmbedArgs& args);
void rms_norm(const CpuContext& context, const RmsNormArgs& args);
void gemm(const CpuContext& context, const GemmArgs& args);
// gemm with a q8_0 | q4_0 | q4_1 weight (cpp/src/cpu/gemm_quant.cpp); gemm() forwards to it.
void gemm_quant(const CpuContext& context, const GemmArgs& args);
// WeightLayout::kInterleaved8 (lserve/ops/gemm.h): rows in groups of kPackRows, block by block.
constexpr int64_t kPackRows = 8;
// Bytes of a packed (out_features, in_features) block-format weight (its last group padded to kPackRows rows).
size_t packed_weight_bytes(DType dtype, int64_t out_features, int64_t in_features);
// Writes the contiguous block-format `weight` (stored rows) to out, packed_weight_bytes() of it.
void pack_quant_weight(const TensorView& weight, uint8_t* out);
void silu_mul(const CpuContext& context, const SiluMulArgs& args);
void rope_kv_append(const CpuContext& context, const RopeKvAppendArgs& args);
void attention(const CpuContext& context, const AttentionArgs& args);
void gather_rows(const CpuContext& context, const GatherRowsArgs& args);
void sample(const CpuContext& context, const SampleArgs& args);
void logprobs(const CpuContext& context, const LogprobsArgs& args);
// Backend::copy for host tensors: same-dtype bytes, or float32/bfloat16/float16 conversion.
void copy(const CpuContext& context, const TensorView& dst, const TensorView& src);

class CpuBackend final : public Backend {
 public:
  // num_threads <= 0 picks the hardware concurrency. The environment variable LSERVE_CPU_ISA
  // (generic | avx2 | avx512 | avx512vnni) caps the kernels' level, read once, here; a level the
  // CPU lacks, or any other value, raises lserve::Error (select_cpu_isa).
  explicit CpuBackend(int num_threads);

  Device device() const override { return Device{DeviceType::kCPU, 0}; }
  std::string name() const override;
  int num_threads() const { return pool_.num_threads(); }
  CpuIsa isa() const { return context_.isa; }

 protected:
  // Every call the op contracts allow: any head_dim, every sparse policy and group score.
  Support supports_impl(const OpQuery&) const override { return Support::yes(); }
  std::shared_ptr<void> allocate_bytes(size_t num_bytes) override;
  void copy_impl(const TensorView& dst, const TensorView& src) override;
  // Block formats: WeightLayout::kInterleaved8 in the weight arena; float weights stay as they are.
  WeightLayout pack_gemm_weight_impl(const TensorView& weight, Tensor* packed) override;
  void fill_zero_impl(const TensorView& dst) override;

  void embed_impl(const EmbedArgs& args) override { cpu::embed(context_, args); }
  void rms_norm_impl(const RmsNormArgs& args) override { cpu::rms_norm(context_, args); }
  void gemm_impl(const GemmArgs& args) override { cpu::gemm(context_, args); }
  void silu_mul_impl(const SiluMulArgs& args) override { cpu::silu_mul(context_, args); }
  void rope_kv_append_impl(const RopeKvAppendArgs& args) override { cpu::rope_kv_append(context_, args); }
  void attention_impl(const AttentionArgs& args) override { cpu::attention(context_, args); }
  void gather_rows_impl(const GatherRowsArgs& args) override { cpu::gather_rows(context_, args); }
  void sample_impl(const SampleArgs& args) override { cpu::sample(context_, args); }
  void logprobs_impl(const LogprobsArgs& args) override { cpu::logprobs(context_, args); }
  void page_select_impl(const PageSelectArgs& args) override { cpu_page_select(args); }
  void page_stats_append_impl(const PageStatsAppendArgs& args) override { cpu_page_stats_append(args); }
  // The isolated region is the forward pass: the pool polls for jobs inside it (parallel.h).
  void isolation_changed(bool isolated) override { pool_.set_forward_pass(isolated); }

 private:
  ThreadPool pool_;
  CpuContext context_;
  WeightArena weight_arena_;
};

}  // namespace lserve::cpu
