// Placeholder: the kv bindings are being written.
#include "bindings.h"

namespace lserve::bindings {

void bind_kv(pybind11::module_& m) {}

}  // namespace lserve::bindings
