// Shape/dtype/device validation shared by every <Op>Args::validate(): a fluent checker that
// binds sizes across tensors and names the tensor and the rule in its error.
#pragma once

#include <initializer_list>
#include <string>

#include "lserve/check.h"
#include "lserve/tensor.h"

namespace lserve {

class TensorCheck {
 public:
  TensorCheck(const TensorView& view, const char* op, const char* name) : view_(view), op_(op), name_(name) {
    LSERVE_CHECK(view.defined(), op_, ": tensor '", name_, "' is required");
  }
  TensorCheck& ndim(int expected) {
    LSERVE_CHECK(view_.ndim == expected, op_, ": '", name_, "' must have ", expected, " dims, got shape ",
                 view_.shape_str());
    return *this;
  }
  // size(dim) == expected; a negative expected binds nothing.
  TensorCheck& size(int dim, int64_t expected) {
    LSERVE_CHECK(view_.size(dim) == expected, op_, ": '", name_, "' dim ", dim, " must be ", expected,
                 ", got shape ", view_.shape_str());
    return *this;
  }
  TensorCheck& dtype(DType expected) {
    LSERVE_CHECK(view_.dtype == expected, op_, ": '", name_, "' must be ", dtype_name(expected), ", got ",
                 dtype_name(view_.dtype));
    return *this;
  }
  TensorCheck& dtype_in(std::initializer_list<DType> allowed) {
    bool found = false;
    for (DType d : allowed) found = found || d == view_.dtype;
    LSERVE_CHECK(found, op_, ": '", name_, "' has unsupported dtype ", dtype_name(view_.dtype));
    return *this;
  }
  // float32, bfloat16 or float16.
  TensorCheck& float_dtype() { return dtype_in({DType::kF32, DType::kBF16, DType::kF16}); }
  TensorCheck& device(const Device& expected) {
    LSERVE_CHECK(view_.device == expected, op_, ": '", name_, "' is on ", view_.device.str(), ", expected ",
                 expected.str());
    return *this;
  }
  TensorCheck& contiguous() {
    LSERVE_CHECK(view_.is_contiguous(), op_, ": '", name_, "' must be contiguous");
    return *this;
  }
  // Inner dimensions contiguous; the first dimension may have any stride >= the row width.
  TensorCheck& rows_contiguous() {
    LSERVE_CHECK(view_.rows_contiguous(), op_, ": '", name_, "' must be contiguous past dim 0");
    return *this;
  }

 private:
  const TensorView& view_;
  const char* op_;
  const char* name_;
};

}  // namespace lserve
