// lserve::Error and the LSERVE_CHECK macros: every invalid input or internal failure in the
// C++ core raises lserve::Error with a message that says what and why, prefixed by file:line.
// The pybind11 module maps lserve::Error to Python's ValueError.
#pragma once

#include <sstream>
#include <stdexcept>
#include <string>

namespace lserve {

class Error : public std::runtime_error {
 public:
  explicit Error(const std::string& message) : std::runtime_error(message) {}
};

namespace detail {

inline void append_all(std::ostringstream&) {}

template <typename T, typename... Rest>
void append_all(std::ostringstream& stream, const T& value, const Rest&... rest) {
  stream << value;
  append_all(stream, rest...);
}

template <typename... Parts>
[[noreturn]] void throw_error(const char* file, int line, const Parts&... parts) {
  std::ostringstream stream;
  append_all(stream, parts...);
  stream << " [" << file << ":" << line << "]";
  throw Error(stream.str());
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
