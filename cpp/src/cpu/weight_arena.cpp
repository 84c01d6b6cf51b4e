// WeightArena (weight_arena.h): 2 MiB-aligned anonymous chunks, MADV_HUGEPAGE, bump allocation.
#include "weight_arena.h"

#include <sys/mman.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstring>

#include "lserve/check.h"

namespace lserve::cpu {

std::shared_ptr<void> WeightArena::allocate(size_t num_bytes) {
  std::lock_guard<std::mutex> lock(mutex_);
  const size_t rounded = (std::max<size_t>(num_bytes, 1) + kAlignment - 1) / kAlignment * kAlignment;
  if (!chunk_ || chunk_bytes_ - used_ < rounded) {
    const size_t chunk_bytes = (std::max(rounded, kChunkBytes) + kHugePage - 1) / kHugePage * kHugePage;
    // Over-map by one huge page and trim both ends to a 2 MiB-aligned range.
    const size_t mapped = chunk_bytes + kHugePage;
    void* raw = ::mmap(nullptr, mapped, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    LSERVE_CHECK(raw != MAP_FAILED, "CpuBackend: failed to map ", mapped, " bytes for packed weights: ",
                 std::strerror(errno));
    const uintptr_t begin = reinterpret_cast<uintptr_t>(raw);
    const uintptr_t aligned = (begin + kHugePage - 1) / kHugePage * kHugePage;
    if (aligned > begin) ::munmap(raw, aligned - begin);
    const uintptr_t end = begin + mapped, aligned_end = aligned + chunk_bytes;
    if (end > aligned_end) ::munmap(reinterpret_cast<void*>(aligned_end), end - aligned_end);
    void* chunk = reinterpret_cast<void*>(aligned);
    ::madvise(chunk, chunk_bytes, MADV_HUGEPAGE);  // a hint: without THP (or with it off) small pages serve
    chunk_ = std::shared_ptr<void>(chunk, [chunk_bytes](void* pointer) { ::munmap(pointer, chunk_bytes); });
    chunk_bytes_ = chunk_bytes;
    used_ = 0;
  }
  void* data = static_cast<uint8_t*>(chunk_.get()) + used_;
  used_ += rounded;
  return std::shared_ptr<void>(chunk_, data);
}

}  // namespace lserve::cpu
