// CpuBackend: host memory (64-byte aligned), copies with dtype conversion, the capability table,
// run-time ISA detection and the make_cpu_backend factory. The ops are in cpp/src/cpu/<op>.cpp.
#include "cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>

#include "convert.h"

namespace lserve::cpu {

namespace {

constexpr size_t kAlignment = 64;  // one cache line; also the widest vector load
constexpr int64_t kCopyGrain = 1 << 16;  // elements per chunk: below this a copy runs inline

template <typename Dst, typename Src>
void convert_range(Dst* dst, const Src* src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = from_float<Dst>(to_float(src[i]));
}

}  // namespace

bool detect_avx2_fma() {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#else
  return false;
#endif
}

CpuBackend::CpuBackend(int num_threads) : pool_(num_threads) {
  context_.pool = &pool_;
  // LSERVE_CPU_ISA=generic forces the portable kernels (tests use it to cover them on AVX2 hosts).
  const char* isa = std::getenv("LSERVE_CPU_ISA");
  const bool force_generic = isa != nullptr && std::string(isa) == "generic";
  context_.has_avx2_fma = !force_generic && detect_avx2_fma();
}

std::string CpuBackend::name() const {
  return std::string("cpu (") + std::to_string(pool_.num_threads()) + " threads, " +
         (context_.has_avx2_fma ? "avx2+fma" : "generic") + ")";
}

std::shared_ptr<void> CpuBackend::allocate_bytes(size_t num_bytes) {
  const size_t rounded = (std::max<size_t>(num_bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  void* data = std::aligned_alloc(kAlignment, rounded);
  LSERVE_CHECK(data != nullptr, "CpuBackend: failed to allocate ", num_bytes, " bytes");
  return std::shared_ptr<void>(data, [](void* pointer) { std::free(pointer); });
}

void CpuBackend::copy_impl(const TensorView& dst, const TensorView& src) { cpu::copy(context_, dst, src); }

void CpuBackend::fill_zero_impl(const TensorView& dst) { std::memset(dst.data, 0, dst.nbytes()); }

void copy(const CpuContext& context, const TensorView& dst, const TensorView& src) {
  LSERVE_CHECK(dst.device.type == DeviceType::kCPU && src.device.type == DeviceType::kCPU,
               "copy: the CPU backend copies host tensors only, got dst on ", dst.device.str(), " and src on ",
               src.device.str());
  const int64_t count = src.numel();
  if (dst.dtype == src.dtype && dtype_is_block(src.dtype)) {  // whole blocks, as bytes
    std::memmove(dst.data, src.data, src.nbytes());
    return;
  }
  if (dst.dtype == src.dtype) {
    const size_t element_bytes = dtype_size(src.dtype);
    context.pool->parallel_for(0, count, kCopyGrain, [&](int64_t begin, int64_t end, int) {
      std::memmove(static_cast<char*>(dst.data) + begin * element_bytes,
                   static_cast<const char*>(src.data) + begin * element_bytes, (end - begin) * element_bytes);
    });
    return;
  }
  dispatch_float(dst.dtype, dst.data, [&](auto* dst_data) {
    dispatch_float(src.dtype, src.data, [&](auto* src_data) {
      context.pool->parallel_for(0, count, kCopyGrain, [&](int64_t begin, int64_t end, int) {
        convert_range(dst_data + begin, src_data + begin, end - begin);
      });
    });
  });
}

}  // namespace lserve::cpu

namespace lserve {

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  return std::make_unique<cpu::CpuBackend>(num_threads);
}

}  // namespace lserve
