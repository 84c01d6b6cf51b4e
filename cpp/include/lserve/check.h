// lserve::Error and the LSERVE_CHECK macros: every invalid input or internal failure in the
// C++ core raises lserve::Error with a message that says what and why, prefixed by file:line.
// The pybind11 module maps lserve::Error to Python's ValueError.
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <type_traits>

namespace lserve {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

// Messages are built without iostreams: numbers go through std::to_string / snprintf in the C
// locale. A process can hold a std::locale::global() set by a library with its own copy of
// libstdc++ (seen on the GPU machine, 2026-11-22: an ostringstream << long segfaulted in an
// error message after torch/transformers/pandas were imported); ostream number formatting
// looks its facets up in that foreign locale.
inline void append_one(std::string& out, const std::string& value) { out += value; }
inline void append_one(std::string& out, const char* value) { out += value ? value : "(null)"; }
inline void append_one(std::string& out, char value) { out += value; }
inline void append_one(std::string& out, bool value) { out += value ? "1" : "0"; }
template <typename T>
std::enable_if_t<std::is_integral_v<T>> append_one(std::string& out, T value) {
  out += std::to_string(value);
}
template <typename T>
std::enable_if_t<std::is_floating_point_v<T>> append_one(std::string& out, T value) {
  char buffer[64];
  std::snprintf(buffer, sizeof(buffer), "%g", static_cast<double>(value));
  out += buffer;
}
template <typename T>
std::enable_if_t<std::is_enum_v<T>> append_one(std::string& out, T value) {
  out += std::to_string(static_cast<std::underlying_type_t<T>>(value));
}

inline void append_all(std::string&) {}

template <typename T, typename... Rest>
void append_all(std::string& out, const T& value, const Rest&... rest) {
  if constexpr (std::is_array_v<T>) {
    append_one(out, static_cast<const char*>(value));
  } else {
    append_one(out, value);
  }
  append_all(out, rest...);
}

template <typename... Parts>
[[noreturn]] void throw_error(const char* file, int line, const Parts&... parts) {
  std::string message;
  append_all(message, parts...);
  message += " [";
  message += file;
  message += ":";
  message += std::to_string(line);
  message += "]";
  throw Error(message);
}

}  // namespace detail
}  // namespace lserve

// LSERVE_CHECK(cond, "message parts", value, ...): throws lserve::Error when cond is false.
#define LSERVE_CHECK(cond, ...)                                       \
  do {                                                                \
    if (!(cond)) {                                                    \
      ::lserve::detail::throw_error(__FILE__, __LINE__, __VA_ARGS__); \
    }                                                                 \
  } while (0)

#define LSERVE_THROW(...) ::lserve::detail::throw_error(__FILE__, __LINE__, __VA_ARGS__)
