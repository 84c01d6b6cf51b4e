// Device-independent parts of Backend: allocation shapes, copy and fill validation, factory.
#include "lserve/backend.h"

namespace lserve {

Tensor Backend::empty(std::initializer_list<int64_t> shape, DType dtype) {
  std::array<int64_t, kMaxDims> dims{};
  int ndim = 0;
  for (int64_t extent : shape) {
    LSERVE_CHECK(ndim < kMaxDims, "tensor rank above ", kMaxDims);
    dims[ndim++] = extent;
  }
  return empty(dims.data(), ndim, dtype);
}

Tensor Backend::empty(const int64_t* shape, int ndim, DType dtype) {
  int64_t count = 1;
  for (int d = 0; d < ndim; ++d) {
    LSERVE_CHECK(shape[d] >= 0, "negative extent ", shape[d], " in tensor shape");
    count *= shape[d];
  }
  // Allocate at least one byte so an empty tensor still has a distinct, valid pointer.
  auto storage = allocate_bytes(std::max<size_t>(1, static_cast<size_t>(count) * dtype_size(dtype)));
  return Tensor(storage, TensorView::contiguous(storage.get(), dtype, shape, ndim, device()));
}

void Backend::copy(const TensorView& dst, const TensorView& src) {
  LSERVE_CHECK(dst.numel() == src.numel(), "copy: dst shape ", dst.shape_str(), " and src shape ",
               src.shape_str(), " differ in size");
  LSERVE_CHECK(dst.is_contiguous() && src.is_contiguous(), "copy: both tensors must be contiguous");
  auto is_float = [](DType d) { return d == DType::kF32 || d == DType::kBF16 || d == DType::kF16; };
  LSERVE_CHECK(dst.dtype == src.dtype || (is_float(dst.dtype) && is_float(src.dtype)), "copy: cannot convert ",
               dtype_name(src.dtype), " to ", dtype_name(dst.dtype));
  copy_impl(dst, src);
}

void Backend::fill_zero(const TensorView& dst) {
  LSERVE_CHECK(dst.device == device(), "fill_zero: tensor is on ", dst.device.str(), ", backend on ",
               device().str());
  LSERVE_CHECK(dst.is_contiguous(), "fill_zero: tensor must be contiguous");
  fill_zero_impl(dst);
}

void Backend::page_select_impl(const PageSelectArgs&) {
  LSERVE_THROW("the ", name(), " backend has no page_select yet (sparse decode)");
}

void Backend::page_stats_append_impl(const PageStatsAppendArgs&) {
  LSERVE_THROW("the ", name(), " backend has no page_stats_append yet (sparse decode)");
}

std::unique_ptr<Backend> make_backend(const std::string& device, int num_threads) {
  if (device == "cpu") return make_cpu_backend(num_threads);
  if (device.rfind("cuda", 0) == 0) {
    LSERVE_THROW("device '", device, "' requested, but this build of lserve has no CUDA backend "
                 "(rebuild with a CUDA toolkit and LSERVE_CUDA=ON)");
  }
  LSERVE_THROW("unknown device '", device, "' (expected 'cpu' or 'cuda')");
}

}  // namespace lserve
