// Scalar argument conversion for the config bindings (scalars.h).
#include "scalars.h"

#include <cmath>
#include <limits>
#include <string>

#include "lserve/check.h"

namespace lserve::bindings {

namespace py = pybind11;

namespace {

std::string show(const py::handle& value) { return py::repr(value).cast<std::string>(); }

bool is_instance(const py::handle& value, const char* abc) {
  return py::isinstance(value, py::module_::import("numbers").attr(abc));
}

bool is_bool(const py::handle& value) {
  return PyBool_Check(value.ptr()) || py::isinstance(value, py::module_::import("numpy").attr("bool_"));
}

// The value of an int (a Python int, fast, or any numbers.Integral but bool, e.g. numpy.int64);
// *overflow is set when it is beyond a long long.
long long integral_value(const py::handle& value, const char* field, int* overflow) {
  if (PyLong_CheckExact(value.ptr())) return PyLong_AsLongLongAndOverflow(value.ptr(), overflow);
  LSERVE_CHECK(!is_bool(value) && is_instance(value, "Integral"), field, " must be an int, got ", show(value));
  const py::object number = py::reinterpret_steal<py::object>(PyNumber_Index(value.ptr()));
  if (!number) throw py::error_already_set();
  return PyLong_AsLongLongAndOverflow(number.ptr(), overflow);
}

}  // namespace

int64_t int64_arg(const py::handle& value, const char* field) {
  int overflow = 0;
  const long long result = integral_value(value, field, &overflow);
  LSERVE_CHECK(overflow == 0, field, " must fit a 64-bit int, got ", show(value));
  return static_cast<int64_t>(result);
}

int32_t int32_arg(const py::handle& value, const char* field) {
  int overflow = 0;
  const long long result = integral_value(value, field, &overflow);
  LSERVE_CHECK(overflow == 0 && result >= std::numeric_limits<int32_t>::min() &&
                   result <= std::numeric_limits<int32_t>::max(),
               field, " must fit a 32-bit int, got ", show(value));
  return static_cast<int32_t>(result);
}

std::optional<int> optional_int32_arg(const py::handle& value, const char* field) {
  if (value.is_none()) return std::nullopt;
  return int32_arg(value, field);
}

std::optional<int64_t> optional_int64_arg(const py::handle& value, const char* field) {
  if (value.is_none()) return std::nullopt;
  return int64_arg(value, field);
}

float float32_arg(const py::handle& value, const char* field) {
  LSERVE_CHECK(!is_bool(value) && is_instance(value, "Real"), field, " must be a real number, got ", show(value));
  const double number = py::float_(py::reinterpret_borrow<py::object>(value)).cast<double>();
  const float rounded = static_cast<float>(number);
  LSERVE_CHECK(!std::isfinite(number) || std::isfinite(rounded), field, " must stay finite as a 32-bit float, got ",
               show(value));
  return rounded;
}

double float64_arg(const py::handle& value, const char* field) {
  LSERVE_CHECK(!is_bool(value) && is_instance(value, "Real"), field, " must be a real number, got ", show(value));
  return py::float_(py::reinterpret_borrow<py::object>(value)).cast<double>();
}

std::string str_arg(const py::handle& value, const char* field) {
  LSERVE_CHECK(py::isinstance<py::str>(value), field, " must be a str, got ", show(value));
  return value.cast<std::string>();
}

bool bool_arg(const py::handle& value, const char* field) {
  LSERVE_CHECK(is_bool(value), field, " must be True or False, got ", show(value));
  return value.cast<bool>();
}

std::vector<int32_t> int32_list_arg(const py::handle& value, const char* field) {
  LSERVE_CHECK(!py::isinstance<py::str>(value) && !py::isinstance<py::bytes>(value) && py::hasattr(value, "__iter__"),
               field, " must be a list of ints, got ", show(value));
  std::vector<int32_t> result;
  if (py::hasattr(value, "__len__")) result.reserve(py::len(value));
  for (const py::handle item : value) {
    int overflow = 0;
    const long long id = PyLong_CheckExact(item.ptr()) ? PyLong_AsLongLongAndOverflow(item.ptr(), &overflow) : 0;
    if (PyLong_CheckExact(item.ptr()) && overflow == 0 && id >= std::numeric_limits<int32_t>::min() &&
        id <= std::numeric_limits<int32_t>::max()) {
      result.push_back(static_cast<int32_t>(id));  // the common case, without building a name
      continue;
    }
    const std::string name = std::string(field) + "[" + std::to_string(result.size()) + "]";
    result.push_back(int32_arg(item, name.c_str()));
  }
  return result;
}

}  // namespace lserve::bindings
