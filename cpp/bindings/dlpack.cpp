// DLPack capsule consumption and conversion to TensorView.
#include "dlpack.h"

#include <string>

namespace lserve::bindings {

namespace {

DType to_dtype(const DLDataType& dtype, const char* what) {
  LSERVE_CHECK(dtype.lanes == 1, what, ": vector dtypes (lanes=", dtype.lanes, ") are not supported");
  if (dtype.code == 2 && dtype.bits == 32) return DType::kF32;
  if (dtype.code == 2 && dtype.bits == 16) return DType::kF16;
  if (dtype.code == 4 && dtype.bits == 16) return DType::kBF16;
  if (dtype.code == 0 && dtype.bits == 32) return DType::kI32;
  if (dtype.code == 0 && dtype.bits == 64) return DType::kI64;
  if (dtype.code == 1 && dtype.bits == 8) return DType::kU8;
  LSERVE_THROW(what, ": unsupported dtype (DLPack code ", int(dtype.code), ", bits ", int(dtype.bits),
               "); expected float32, float16, bfloat16, int32, int64 or uint8");
}

}  // namespace

DlpackTensor::DlpackTensor(const py::handle& object, const char* what) {
  if (!py::hasattr(object, "__dlpack__")) {
    throw py::type_error(std::string(what) + ": expected a numpy array or torch tensor (an object with "
                         "__dlpack__), got " + std::string(py::str(py::type::of(object))));
  }
  // Ask for a versioned capsule first (it can carry read-only arrays); older producers reject
  // the keyword and give the legacy one.
  py::object capsule;
  try {
    capsule = object.attr("__dlpack__")(py::arg("max_version") = py::make_tuple(1, 0));
  } catch (py::error_already_set& error) {
    if (!error.matches(PyExc_TypeError)) throw;
    capsule = object.attr("__dlpack__")();
  }
  PyObject* raw = capsule.ptr();
  if (PyCapsule_IsValid(raw, "dltensor_versioned")) {
    versioned_ = static_cast<DLManagedTensorVersioned*>(PyCapsule_GetPointer(raw, "dltensor_versioned"));
    PyCapsule_SetName(raw, "used_dltensor_versioned");  // consumed: this object calls the deleter
    read_only_ = (versioned_->flags & 1u) != 0;
    set_view(versioned_->dl_tensor, what);
  } else {
    LSERVE_CHECK(PyCapsule_IsValid(raw, "dltensor"), what, ": __dlpack__ did not return a DLPack capsule");
    managed_ = static_cast<DLManagedTensor*>(PyCapsule_GetPointer(raw, "dltensor"));
    PyCapsule_SetName(raw, "used_dltensor");
    set_view(managed_->dl_tensor, what);
  }
}

void DlpackTensor::set_view(const DLTensor& tensor, const char* what) {
  LSERVE_CHECK(tensor.ndim >= 1 && tensor.ndim <= kMaxDims, what, ": rank ", tensor.ndim, " not in [1, ",
               kMaxDims, "]");
  view_.dtype = to_dtype(tensor.dtype, what);
  view_.data = static_cast<char*>(tensor.data) + tensor.byte_offset;
  if (tensor.device.device_type == 1 || tensor.device.device_type == 3) {
    view_.device = Device{DeviceType::kCPU, 0};
  } else if (tensor.device.device_type == 2) {
    view_.device = Device{DeviceType::kCUDA, tensor.device.device_id};
  } else {
    LSERVE_THROW(what, ": unsupported DLPack device type ", tensor.device.device_type);
  }
  view_.ndim = tensor.ndim;
  int64_t stride_acc = 1;
  for (int d = tensor.ndim - 1; d >= 0; --d) {
    view_.shape[d] = tensor.shape[d];
    view_.strides[d] = tensor.strides ? tensor.strides[d] : stride_acc;
    stride_acc *= tensor.shape[d];
  }
}

const TensorView& DlpackTensor::writable_view(const char* what) const {
  LSERVE_CHECK(!read_only_, what, ": the output array is read-only");
  return view_;
}

DlpackTensor::~DlpackTensor() {
  if (managed_ && managed_->deleter) managed_->deleter(managed_);
  if (versioned_ && versioned_->deleter) versioned_->deleter(versioned_);
}

py::array_t<float> to_numpy(const float* data, const std::vector<int64_t>& shape) {
  py::array_t<float> out(std::vector<py::ssize_t>(shape.begin(), shape.end()));
  int64_t count = 1;
  for (int64_t extent : shape) count *= extent;
  std::memcpy(out.mutable_data(), data, static_cast<size_t>(count) * sizeof(float));
  return out;
}

TensorView block_view(const TensorView& bytes, const std::string& dtype, const char* what) {
  if (dtype.empty()) return bytes;
  const DType block_dtype = dtype_from_string(dtype);
  LSERVE_CHECK(dtype_is_block(block_dtype), "'", what, "': weight_dtype must be q8_0, q4_0 or q4_1, got '", dtype, "'");
  LSERVE_CHECK(bytes.dtype == DType::kU8 && bytes.ndim == 2 && bytes.is_contiguous(), "'", what,
               "': a ", dtype, " weight is passed as a contiguous 2-D uint8 array of its blocks, got ",
               dtype_name(bytes.dtype), " of shape ", bytes.shape_str());
  const int64_t block_bytes = static_cast<int64_t>(dtype_block_bytes(block_dtype));
  LSERVE_CHECK(bytes.size(1) % block_bytes == 0, "'", what, "': rows of ", bytes.size(1), " bytes are not whole ",
               dtype, " blocks of ", block_bytes, " bytes");
  const int64_t shape[2] = {bytes.size(0), bytes.size(1) / block_bytes * dtype_block_size(block_dtype)};
  return TensorView::contiguous(bytes.data, block_dtype, shape, 2, bytes.device);
}

}  // namespace lserve::bindings
