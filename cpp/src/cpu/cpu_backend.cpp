// CpuBackend: host memory (64-byte aligned), copies with dtype conversion, the capability table,
// run-time ISA detection and LSERVE_CPU_ISA (lserve/cpu_isa.h) and the make_cpu_backend factory.
// The ops are in cpp/src/cpu/<op>.cpp.
#include "cpu_backend.h"

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "convert.h"
#include "lserve/cpu_isa.h"

namespace lserve::cpu {

namespace {

constexpr size_t kAlignment = 64;  // one cache line; also the widest vector load
constexpr int64_t kCopyGrain = 1 << 16;  // elements per chunk: below this a copy runs inline

template <typename Dst, typename Src>
void convert_range(Dst* dst, const Src* src, int64_t count) {
  for (int64_t i = 0; i < count; ++i) dst[i] = from_float<Dst>(to_float(src[i]));
}

}  // namespace

CpuBackend::CpuBackend(int num_threads) : pool_(num_threads) {
  context_.pool = &pool_;
  context_.isa = select_cpu_isa();
}

std::string CpuBackend::name() const {
  return std::string("cpu (") + std::to_string(pool_.num_threads()) + " threads, " + pool_.polling_policy() + ", " +
         cpu_isa_name(context_.isa) + ")";
}

std::shared_ptr<void> CpuBackend::allocate_bytes(size_t num_bytes) {
  const size_t rounded = (std::max<size_t>(num_bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  void* data = std::aligned_alloc(kAlignment, rounded);
  LSERVE_CHECK(data != nullptr, "CpuBackend: failed to allocate ", num_bytes, " bytes");
  return std::shared_ptr<void>(data, [](void* pointer) { std::free(pointer); });
}

WeightLayout CpuBackend::pack_gemm_weight_impl(const TensorView& weight, Tensor* packed) {
  if (!dtype_is_block(weight.dtype)) return WeightLayout::kRows;
  std::shared_ptr<void> storage =
      weight_arena_.allocate(packed_weight_bytes(weight.dtype, weight.size(0), weight.size(1)));
  pack_quant_weight(weight, static_cast<uint8_t*>(storage.get()));
  const TensorView view = TensorView::contiguous(storage.get(), weight.dtype, weight.shape.data(), 2);
  *packed = Tensor(std::move(storage), view);
  return WeightLayout::kInterleaved8;
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

namespace {

constexpr CpuIsa kAllCpuIsas[] = {CpuIsa::kGeneric, CpuIsa::kAvx2, CpuIsa::kAvx512, CpuIsa::kAvx512Vnni};

struct CpuFeature {
  const char* name;
  bool present;
};

// __builtin_cpu_supports takes a string literal, hence the macro. It also asks the OS: AVX-512
// counts as present only when XCR0 says the kernel saves the zmm and mask registers.
#if defined(__x86_64__) || defined(__i386__)
#define LSERVE_CPU_FEATURE(name) CpuFeature{name, __builtin_cpu_supports(name) != 0}
#else
#define LSERVE_CPU_FEATURE(name) CpuFeature{name, false}
#endif

// The features `isa` adds to the level below it.
std::vector<CpuFeature> features_added_by(CpuIsa isa) {
#if defined(__x86_64__) || defined(__i386__)
  __builtin_cpu_init();
#endif
  switch (isa) {
    case CpuIsa::kGeneric: return {};
    case CpuIsa::kAvx2: return {LSERVE_CPU_FEATURE("avx2"), LSERVE_CPU_FEATURE("fma"), LSERVE_CPU_FEATURE("f16c")};
    case CpuIsa::kAvx512:
      return {LSERVE_CPU_FEATURE("avx512f"), LSERVE_CPU_FEATURE("avx512bw"), LSERVE_CPU_FEATURE("avx512vl")};
    case CpuIsa::kAvx512Vnni: return {LSERVE_CPU_FEATURE("avx512vnni")};
  }
  return {};
}
#undef LSERVE_CPU_FEATURE

}  // namespace

const char* cpu_isa_name(CpuIsa isa) {
  switch (isa) {
    case CpuIsa::kGeneric: return "generic";
    case CpuIsa::kAvx2: return "avx2";
    case CpuIsa::kAvx512: return "avx512";
    case CpuIsa::kAvx512Vnni: return "avx512vnni";
  }
  return "?";
}

std::vector<std::string> missing_cpu_features(CpuIsa isa) {
  std::vector<std::string> missing;
  for (CpuIsa level : kAllCpuIsas) {
    if (level > isa) break;
    for (const CpuFeature& feature : features_added_by(level)) {
      if (!feature.present) missing.emplace_back(feature.name);
    }
  }
  return missing;
}

std::vector<CpuIsa> supported_cpu_isas() {
  std::vector<CpuIsa> supported;
  for (CpuIsa isa : kAllCpuIsas) {
    if (missing_cpu_features(isa).empty()) supported.push_back(isa);
  }
  return supported;
}

CpuIsa select_cpu_isa() {
  const std::vector<CpuIsa> supported = supported_cpu_isas();
  const char* value = std::getenv("LSERVE_CPU_ISA");
  if (value == nullptr || value[0] == '\0') return supported.back();
  const std::string requested(value);
  // Comma-separated names, for the error messages only.
  const auto join = [](const auto& items, auto&& name) {
    std::string text;
    for (const auto& item : items) text += (text.empty() ? "" : ", ") + std::string(name(item));
    return text;
  };
  const std::string supported_names = join(supported, cpu_isa_name);
  for (CpuIsa isa : kAllCpuIsas) {
    if (requested != cpu_isa_name(isa)) continue;
    const std::vector<std::string> missing = missing_cpu_features(isa);
    if (missing.empty()) return isa;
    LSERVE_THROW("LSERVE_CPU_ISA=", requested, " asks for kernels this CPU cannot run: it lacks ",
                 join(missing, [](const std::string& feature) { return feature; }), " (it runs ", supported_names,
                 "; unset the variable for the best of them)");
  }
  LSERVE_THROW("LSERVE_CPU_ISA='", requested, "' is not a CPU kernel level: expected one of ",
               join(kAllCpuIsas, cpu_isa_name), " (this CPU runs ", supported_names,
               "), or unset for the best it runs");
}

std::unique_ptr<Backend> make_cpu_backend(int num_threads) {
  return std::make_unique<cpu::CpuBackend>(num_threads);
}

}  // namespace lserve
