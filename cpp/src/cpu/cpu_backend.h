// CpuBackend: the reference backend. Plain loops with fp32 accumulation; every other backend is
// tested against it. One free function per op (cpp/src/cpu/<op>.cpp).
#pragma once

#include "lserve/backend.h"

namespace lserve {

void cpu_embed(const EmbedArgs& args);
void cpu_rms_norm(const RmsNormArgs& args);
void cpu_gemm(const GemmArgs& args);
void cpu_silu_mul(const SiluMulArgs& args);
void cpu_rope_kv_append(const RopeKvAppendArgs& args);
void cpu_attention(const AttentionArgs& args);
void cpu_gather_rows(const GatherRowsArgs& args);

// Converts `count` elements of a float32/bfloat16/float16 array to float32.
void cpu_to_float(const void* src, DType dtype, float* dst, int64_t count);

class CpuBackend : public Backend {
 public:
  explicit CpuBackend(int num_threads) : num_threads_(num_threads) {}
  Device device() const override { return Device{DeviceType::kCPU, 0}; }
  std::string name() const override { return "cpu"; }
  bool supports(OpKind op, DType weight_dtype, DType kv_cache_dtype) const override;

 protected:
  std::shared_ptr<void> allocate_bytes(size_t num_bytes) override;
  void copy_impl(const TensorView& dst, const TensorView& src) override;
  void fill_zero_impl(const TensorView& dst) override;
  void embed_impl(const EmbedArgs& args) override { cpu_embed(args); }
  void rms_norm_impl(const RmsNormArgs& args) override { cpu_rms_norm(args); }
  void gemm_impl(const GemmArgs& args) override { cpu_gemm(args); }
  void silu_mul_impl(const SiluMulArgs& args) override { cpu_silu_mul(args); }
  void rope_kv_append_impl(const RopeKvAppendArgs& args) override { cpu_rope_kv_append(args); }
  void attention_impl(const AttentionArgs& args) override { cpu_attention(args); }
  void gather_rows_impl(const GatherRowsArgs& args) override { cpu_gather_rows(args); }

 private:
  int num_threads_;
};

}  // namespace lserve
