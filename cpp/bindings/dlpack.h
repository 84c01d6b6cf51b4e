// DLPack at the Python boundary: any object with __dlpack__ (numpy arrays, torch tensors)
// becomes a TensorView that stays valid while the DlpackTensor lives; float32 host results go
// back as numpy arrays. The structs below follow the DLPack ABI (dlpack.h, v0.8 legacy capsule).
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "lserve/tensor.h"

namespace lserve::bindings {

namespace py = pybind11;

extern "C" {
struct DLDevice {
  int32_t device_type;  // 1 = CPU, 2 = CUDA, 3 = CUDA host
  int32_t device_id;
};
struct DLDataType {
  uint8_t code;  // 0 int, 1 uint, 2 float, 4 bfloat
  uint8_t bits;
  uint16_t lanes;
};
struct DLTensor {
  void* data;
  DLDevice device;
  int32_t ndim;
  DLDataType dtype;
  int64_t* shape;
  int64_t* strides;  // in elements; null means compact row-major
  uint64_t byte_offset;
};
struct DLManagedTensor {
  DLTensor dl_tensor;
  void* manager_ctx;
  void (*deleter)(DLManagedTensor* self);
};
// DLPack >= 1.0: carries flags (bit 0: read-only), which lets numpy export read-only arrays.
struct DLPackVersion {
  uint32_t major;
  uint32_t minor;
};
struct DLManagedTensorVersioned {
  DLPackVersion version;
  void* manager_ctx;
  void (*deleter)(DLManagedTensorVersioned* self);
  uint64_t flags;
  DLTensor dl_tensor;
};
}

// Owns a consumed DLPack capsule; view() is valid until destruction.
class DlpackTensor {
 public:
  explicit DlpackTensor(const py::handle& object, const char* what = "tensor");
  DlpackTensor(const DlpackTensor&) = delete;
  DlpackTensor& operator=(const DlpackTensor&) = delete;
  DlpackTensor(DlpackTensor&& other) noexcept
      : managed_(other.managed_), versioned_(other.versioned_), read_only_(other.read_only_), view_(other.view_) {
    other.managed_ = nullptr;
    other.versioned_ = nullptr;
  }
  ~DlpackTensor();
  const TensorView& view() const { return view_; }
  // Outputs must be writable: raises naming the tensor when its producer marked it read-only.
  const TensorView& writable_view(const char* what) const;

 private:
  void set_view(const DLTensor& tensor, const char* what);
  DLManagedTensor* managed_ = nullptr;
  DLManagedTensorVersioned* versioned_ = nullptr;
  bool read_only_ = false;
  TensorView view_;
};

// Optional argument: None gives an absent (default) TensorView.
inline TensorView optional_view(const py::handle& object, std::vector<DlpackTensor>& keep, const char* what) {
  if (object.is_none()) return TensorView();
  keep.emplace_back(object, what);
  return keep.back().view();
}

// A ggml block-format weight handed over as its raw bytes: a contiguous uint8 array of shape
// (rows, row_bytes) becomes a (rows, row_bytes / block_bytes * 32) view of `dtype` (q8_0 | q4_0 |
// q4_1) over the same memory. Plain dtypes ("" or None) return `bytes` unchanged.
TensorView block_view(const TensorView& bytes, const std::string& dtype, const char* what);

py::array_t<float> to_numpy(const float* data, const std::vector<int64_t>& shape);

}  // namespace lserve::bindings
