// PackedUpload: a step's small host arrays (batch metadata, sampling parameters) staged into one
// byte block, so that they reach the device in one copy instead of one copy each.
//
//   PackedUpload pack;
//   const int ids = pack.add(token_ids.data(), num_tokens, DType::kI32);
//   Tensor block = pack.upload(backend);          // one host -> device copy
//   TensorView device_ids = pack.view(ids, block); // typed views into the block
//
// Every array starts 16-byte aligned. `capacity` (>= count) reserves room for a larger array, so a
// block laid out once at its largest (CUDA graphs keep its addresses) has the same offsets at every
// step; copy_into() then refreshes such a persistent block with the bytes in use.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <vector>

#include "lserve/backend.h"

namespace lserve {

class PackedUpload {
 public:
  int add(const void* values, int64_t count, DType dtype, int64_t capacity = -1) {
    LSERVE_CHECK(count >= 0 && (capacity < 0 || capacity >= count), "PackedUpload: ", count,
                 " elements do not fit a capacity of ", capacity);
    const size_t offset = (host_.size() + 15) / 16 * 16;
    const size_t bytes = static_cast<size_t>(count) * dtype_size(dtype);
    const size_t reserved = static_cast<size_t>(capacity < 0 ? count : capacity) * dtype_size(dtype);
    host_.resize(offset + reserved, 0);
    if (bytes > 0) std::memcpy(host_.data() + offset, values, bytes);
    entries_.push_back({offset, count, capacity < 0 ? count : capacity, dtype});
    used_bytes_ = offset + bytes;
    return static_cast<int>(entries_.size()) - 1;
  }
  template <typename T>
  int add(const std::vector<T>& values, DType dtype, int64_t capacity = -1) {
    return add(values.data(), static_cast<int64_t>(values.size()), dtype, capacity);
  }

  // Bytes of the block (every reservation), and up to the end of the last array's values.
  int64_t num_bytes() const { return static_cast<int64_t>(host_.size()); }
  int64_t used_bytes() const { return static_cast<int64_t>(used_bytes_); }

  // A fresh device block holding every array (keep it alive while its views are in use).
  Tensor upload(Backend& backend) const {
    Tensor block = backend.empty({std::max<int64_t>(num_bytes(), 16)}, DType::kU8);
    copy_into(backend, block);
    return block;
  }
  // Copies the bytes in use into `block`, a device block laid out by the same sequence of add()s.
  void copy_into(Backend& backend, const Tensor& block) const {
    LSERVE_CHECK(block.nbytes() >= static_cast<size_t>(used_bytes()), "PackedUpload: a block of ", block.nbytes(),
                 " bytes cannot hold ", used_bytes());
    if (used_bytes() == 0) return;
    backend.copy(block.view().slice(0, 0, used_bytes()),
                 TensorView(const_cast<uint8_t*>(host_.data()), DType::kU8, {used_bytes()}));
  }
  // Array `index` as a 1-D view into `block`: its elements, or with full_capacity its reservation.
  TensorView view(int index, const Tensor& block, bool full_capacity = false) const {
    const Entry& entry = entries_.at(static_cast<size_t>(index));
    return TensorView(static_cast<uint8_t*>(block.data()) + entry.offset, entry.dtype,
                      {full_capacity ? entry.capacity : entry.count}, block.view().device);
  }

 private:
  struct Entry {
    size_t offset;
    int64_t count, capacity;
    DType dtype;
  };
  std::vector<uint8_t> host_;
  std::vector<Entry> entries_;
  size_t used_bytes_ = 0;
};

}  // namespace lserve
