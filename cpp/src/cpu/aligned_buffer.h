// AlignedBuffer: an owning, uninitialised, 64-byte aligned scratch array for the CPU kernels
// (packed GEMM panels, attention tiles). Allocated per op call, so concurrent calls never share.
#pragma once

#include <cstddef>
#include <cstdlib>
#include <memory>

#include "lserve/check.h"

namespace lserve::cpu {

template <typename T>
class AlignedBuffer {
 public:
  AlignedBuffer() = default;
  explicit AlignedBuffer(size_t count) { resize(count); }

  // Discards the contents when count grows.
  void resize(size_t count) {
    if (count <= capacity_) return;
    const size_t num_bytes = (count * sizeof(T) + kAlignment - 1) / kAlignment * kAlignment;
    T* data = static_cast<T*>(std::aligned_alloc(kAlignment, num_bytes));
    LSERVE_CHECK(data != nullptr, "CPU backend: failed to allocate ", num_bytes, " bytes of scratch");
    data_.reset(data);
    capacity_ = count;
  }
  T* data() const { return data_.get(); }
  T& operator[](size_t index) const { return data_.get()[index]; }

 private:
  static constexpr size_t kAlignment = 64;
  struct Free {
    void operator()(T* pointer) const { std::free(pointer); }
  };
  std::unique_ptr<T, Free> data_;
  size_t capacity_ = 0;
};

}  // namespace lserve::cpu
