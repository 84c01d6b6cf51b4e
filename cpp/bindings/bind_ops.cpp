// Placeholder: the ops bindings are being written.
#include "bindings.h"

namespace lserve::bindings {

void bind_ops(pybind11::module_& m) {}

}  // namespace lserve::bindings
