// Python scalars -> the C++ fields of config structs (SamplingParams, SparsityConfig). A value of the
// wrong kind (a str, a bool for a number, a float for an int) or one the field cannot hold (beyond
// int32, or a finite real that overflows float32) raises lserve::Error (ValueError) naming the field and
// the value, so Python never re-checks what the C++ validate() rules say; ranges stay there.
#pragma once

#include <pybind11/pybind11.h>

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

namespace lserve::bindings {

// An int (numbers.Integral, not bool) as int64 / int32.
int64_t int64_arg(const pybind11::handle& value, const char* field);
int32_t int32_arg(const pybind11::handle& value, const char* field);
// None or an int32 / int64.
std::optional<int> optional_int32_arg(const pybind11::handle& value, const char* field);
std::optional<int64_t> optional_int64_arg(const pybind11::handle& value, const char* field);
// A real number (numbers.Real, not bool) as float32; a finite input must stay finite (a nan or inf is
// passed on for validate() to name, as is a value that rounds to a range's bound).
float float32_arg(const pybind11::handle& value, const char* field);
// A real number as float64.
double float64_arg(const pybind11::handle& value, const char* field);
// A str.
std::string str_arg(const pybind11::handle& value, const char* field);
// True or False (bool or numpy.bool_).
bool bool_arg(const pybind11::handle& value, const char* field);
// An iterable of ints (not a str or bytes) as int32s.
std::vector<int32_t> int32_list_arg(const pybind11::handle& value, const char* field);

}  // namespace lserve::bindings
